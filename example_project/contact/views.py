"""The contact form: a visitor writes to the site's staff (settings.MANAGERS)."""

from email.utils import formataddr

import django
from django.conf import settings
from django.contrib import messages
from django.core.mail import EmailMultiAlternatives
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string

from .forms import ContactForm


def contact(request: HttpRequest) -> HttpResponse:
    form = ContactForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        send_contact_message(**form.cleaned_data)
        messages.success(request, "Thank you, your message was sent to the site's staff.")
        return redirect("contact:form")
    return render(request, "contact/contact_form.html", {"form": form})


def send_contact_message(*, name: str, email: str, message: str) -> None:
    """Mail the message to the staff, text and HTML, with Reply-To set to the visitor.

    It goes through the "contact" mailer (settings.MAILERS; before Django 6.1,
    settings.CONTACT_EMAIL_BACKEND when set, else EMAIL_BACKEND): e.g. the Celery backend, so
    the visitor never waits on Gmail.
    """
    name = " ".join(name.split())  # a line break in a header would be refused
    context = {"name": name, "email": email, "message": message}
    mail = EmailMultiAlternatives(
        subject=f"Contact form: message from {name}",
        body=render_to_string("contact/email/contact_message.txt", context),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[address for _, address in settings.MANAGERS],
        reply_to=[formataddr((name, email))],
    )
    mail.attach_alternative(
        render_to_string("contact/email/contact_message.html", context), "text/html"
    )
    if django.VERSION >= (6, 1):
        mail.send(using="contact")
    else:  # Django < 6.1: no MAILERS, a connection to the backend CONTACT_EMAIL_BACKEND names
        from django.core.mail import get_connection

        mail.connection = get_connection(getattr(settings, "CONTACT_EMAIL_BACKEND", None))
        mail.send()
