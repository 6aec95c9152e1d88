"""System checks of the newsletters: ids ``gmail_smtp_newsletters.E0xx`` / ``W0xx``."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.checks import Error, Warning, register
from django.utils.module_loading import import_string

from ..conf import get_setting
from ..exceptions import GmailConfigurationError


@register()
def check_site_url(app_configs: Any = None, **kwargs: Any) -> list:
    """Newsletter mail needs absolute links: SITE_URL, or the sites framework."""
    try:
        site_url = get_setting("SITE_URL")
    except GmailConfigurationError:
        return []  # the main app's settings check reports the bad value
    if not site_url:
        if apps.is_installed("django.contrib.sites"):
            return []
        return [
            Error(
                "Newsletter mail needs absolute links (unsubscribe, archive, confirm), and "
                'neither GMAIL_SMTP["SITE_URL"] is set nor django.contrib.sites installed.',
                hint='Set GMAIL_SMTP["SITE_URL"] to your site\'s address, such as '
                '"https://www.example.com".',
                id="gmail_smtp_newsletters.E001",
            )
        ]
    if str(site_url).lower().startswith("http://"):
        return [
            Warning(
                f'GMAIL_SMTP["SITE_URL"] is {site_url!r}: Gmail expects the one-click unsubscribe '
                "link (List-Unsubscribe) to be HTTPS.",
                hint="Use the https:// address of the site.",
                id="gmail_smtp_newsletters.W001",
            )
        ]
    return []


@register()
def check_audiences(app_configs: Any = None, **kwargs: Any) -> list:
    """Each ``NEWSLETTER_AUDIENCES`` path imports and is callable (called only at start: it may
    query the database, which a check must not)."""
    try:
        audiences = get_setting("NEWSLETTER_AUDIENCES") or {}
    except GmailConfigurationError:
        return []  # the main app's settings check reports the bad value
    problems = []
    for name, path in sorted(audiences.items()):
        try:
            target = import_string(path)
        except Exception as exc:  # ImportError, or the module's own error at import
            problems.append(
                Error(
                    f'GMAIL_SMTP["NEWSLETTER_AUDIENCES"][{name!r}] is {path!r}, which cannot be '
                    f"imported ({exc}); campaigns to this audience could not start.",
                    hint="Give the dotted path of a function that returns a queryset of a model "
                    "with an email field, such as 'myapp.audiences.active_users'.",
                    id="gmail_smtp_newsletters.E002",
                )
            )
            continue
        if not callable(target):
            problems.append(
                Error(
                    f'GMAIL_SMTP["NEWSLETTER_AUDIENCES"][{name!r}] is {path!r}, which is a '
                    f"{type(target).__name__}, not a function returning a queryset.",
                    hint="Point it at a function (no arguments) that returns the queryset.",
                    id="gmail_smtp_newsletters.E003",
                )
            )
    return problems
