from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class NewslettersConfig(AppConfig):
    name = "django_gmail_smtp.newsletters"
    label = "gmail_smtp_newsletters"
    verbose_name = _("Gmail newsletters")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks; connects the outbox's and the bounce reader's signals.
        from . import bounce_receivers, checks, receivers  # noqa: F401
