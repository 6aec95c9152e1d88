"""A local Gmail sandbox: an SMTP server that answers like smtp.gmail.com and a Google-compatible
OAuth token endpoint, for tests and offline development.

    from django_gmail_smtp.testing import GmailSandbox

    with GmailSandbox() as sb:
        sb.add_user("me@example.com", app_password="abcd efgh ijkl mnop")
        ...

Importing this package does not import Django. It needs the ``sandbox`` extra
(``pip install "django-gmail-smtp[sandbox]"``), which brings aiosmtpd.
"""

try:
    import aiosmtpd  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a venv without the extra
    raise ImportError(
        "The Gmail sandbox (django_gmail_smtp.testing, manage.py gmail_sandbox) needs aiosmtpd, "
        "which is not installed. Install the extra: pip install 'django-gmail-smtp[sandbox]'"
    ) from exc

from .certs import CertificateFiles, client_ssl_context, ensure_certificates
from .replies import GMAIL_MAX_RECIPIENTS, GMAIL_SIZE_LIMIT, Replies, xoauth2_initial_response
from .sandbox import GmailSandbox
from .state import PHASES, Delivered, Fault, SandboxStats
from .tokens import MAIL_SCOPE

__all__ = [
    "GMAIL_MAX_RECIPIENTS",
    "GMAIL_SIZE_LIMIT",
    "MAIL_SCOPE",
    "PHASES",
    "CertificateFiles",
    "Delivered",
    "Fault",
    "GmailSandbox",
    "Replies",
    "SandboxStats",
    "client_ssl_context",
    "ensure_certificates",
    "xoauth2_initial_response",
]
