"""The Django admin: sender accounts (health, quota, Connect with Google), the outbox, a dashboard.

- ``accounts``: :class:`GmailAccountAdmin` and its write-only credentials form;
- ``outbox``: :class:`OutboundEmailAdmin` and the attempt log;
- ``bounces``: :class:`BounceAdmin`, the bounces read back from the accounts' inboxes;
- ``views``: the accounts admin's own pages (operation buttons, OAuth connect and callback,
  the dashboard);
- ``widgets``: the quota bar, moments and error texts; ``lookups``: the query-string guard.

Every operation goes through :mod:`django_gmail_smtp.services`. Secrets are write-only.
Changelists accept only the query-string filters they offer.
"""

from __future__ import annotations

from django.contrib import admin

from ..models import Bounce, GmailAccount, OutboundEmail
from ..services import MAX_PENDING_CONNECTS, PENDING_CONNECT_LIFETIME, SESSION_KEY
from .accounts import GmailAccountAdmin, GmailAccountForm
from .bounces import BounceAdmin
from .lookups import OfferedLookupsOnly
from .outbox import AttemptInline, OutboundEmailAdmin, WaitingTooLong
from .widgets import SecretTextarea, render_quota_bar

admin.site.register(GmailAccount, GmailAccountAdmin)
admin.site.register(OutboundEmail, OutboundEmailAdmin)
admin.site.register(Bounce, BounceAdmin)

__all__ = [
    "MAX_PENDING_CONNECTS",
    "PENDING_CONNECT_LIFETIME",
    "SESSION_KEY",
    "AttemptInline",
    "BounceAdmin",
    "GmailAccountAdmin",
    "GmailAccountForm",
    "OfferedLookupsOnly",
    "OutboundEmailAdmin",
    "SecretTextarea",
    "WaitingTooLong",
    "render_quota_bar",
]
