"""The public subscribe form."""

from __future__ import annotations

from django import forms
from django.utils.translation import gettext_lazy as _


class SubscribeForm(forms.Form):
    """An address and an optional name; ``website`` is a trap for bots (hidden from people)."""

    email = forms.EmailField(label=_("Email address"), max_length=320)
    name = forms.CharField(label=_("Name (optional)"), max_length=200, required=False)
    # People never see this field (the template hides it); bots that fill every field do.
    website = forms.CharField(label=_("Leave this empty"), required=False)

    def is_bot(self) -> bool:
        """True when the hidden trap field was filled in."""
        return bool(self.cleaned_data.get("website"))
