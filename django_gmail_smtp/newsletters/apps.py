from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class NewslettersConfig(AppConfig):
    name = "django_gmail_smtp.newsletters"
    label = "gmail_smtp_newsletters"
    verbose_name = _("Gmail newsletters")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks; connects the outbox's and the bounce reader's signals;
        # has the bounce reader act on the unsubscribe emails of List-Unsubscribe's mailto.
        from . import bounce_receivers, checks, mailto, receivers  # noqa: F401

        mailto.register()
