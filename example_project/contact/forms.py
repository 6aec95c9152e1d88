from django import forms


class ContactForm(forms.Form):
    name = forms.CharField(max_length=100)
    email = forms.EmailField(label="Your email")
    message = forms.CharField(widget=forms.Textarea(attrs={"rows": 6}), max_length=5000)
