from django.apps import AppConfig


class GmailSMTPConfig(AppConfig):
    name = "django_gmail_smtp"
    verbose_name = "Gmail SMTP"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
