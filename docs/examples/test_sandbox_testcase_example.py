"""The sandbox from a Django TestCase, without pytest fixtures (docs/sandbox-testing.md)."""

from django.conf import settings
from django.core.mail import send_mail
from django.test import TestCase, override_settings

from django_gmail_smtp.models import GmailAccount
from django_gmail_smtp.testing import GmailSandbox


class WelcomeMailTests(TestCase):
    def test_welcome(self):
        with GmailSandbox(security="starttls") as sandbox:  # 127.0.0.1, a free port
            sandbox.add_user("site@example.com", app_password="abcdefghijklmnop")
            GmailAccount.objects.create(
                email="site@example.com", app_password="abcdefghijklmnop", is_default=True
            )
            with override_settings(
                # Django 6.1 with MAILERS: MAILERS={"default": {"BACKEND": "django_gmail_smtp..."}}
                EMAIL_BACKEND="django_gmail_smtp.backends.GmailSMTPBackend",
                # Keep the project's keys (ENCRYPTION_KEYS...): only the server changes.
                GMAIL_SMTP={**getattr(settings, "GMAIL_SMTP", {}), **sandbox.settings()},
            ):
                send_mail("Welcome", "Hello!", "site@example.com", ["ada@example.org"])
            [delivered] = sandbox.wait_for(1, timeout=10)
        self.assertEqual(delivered.rcpt_tos, ["ada@example.org"])
