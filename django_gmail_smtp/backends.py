"""Django email backends.

``GmailSMTPBackend`` sends now, in the calling process. Both backends are usable as
``EMAIL_BACKEND`` (Django 4.2-6.0) and as the ``BACKEND`` of a Django 6.1 ``MAILERS`` entry,
whose ``OPTIONS`` arrive here as keyword arguments (``host``, ``port``, ``security``,
``timeout``, ``ca_file``, ``ehlo_hostname``, ``strict_from``, ``account``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import django
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.views.decorators.debug import sensitive_variables

from . import quota, signals
from .conf import ensure_valid_options, get_setting
from .exceptions import GmailSMTPError, InvalidMessage, QuotaExceeded
from .models import GmailAccount, normalize_address, normalize_app_password
from .routing import Router, account_key
from .transport import ConnectionPool, SendResult

logger = logging.getLogger(__name__)

#: backend options that map to GMAIL_SMTP keys (lower case here, upper case there)
OPTION_NAMES = (
    "host",
    "port",
    "security",
    "timeout",
    "ca_file",
    "ehlo_hostname",
    "strict_from",
    "quota_database",
    "max_recipients_per_message",
    "reserved_share",
    "max_message_size",
)

DJANGO_61 = django.VERSION >= (6, 1)


class GmailSMTPBackend(BaseEmailBackend):
    """Send each message now over one verified, authenticated connection per account.

    A whole ``send_messages`` batch shares the connection(s); used as a context manager
    (``with backend:``) the connections stay open across calls until ``close()``.
    After sending, each message has a ``gmail_status`` dict: ``account``, ``reply`` (Gmail's
    250 text), ``message_id`` and ``refused`` (recipients Gmail refused while accepting others).
    """

    @sensitive_variables("password", "kwargs")
    def __init__(
        self,
        fail_silently: bool = False,
        *,
        alias: str | None = None,
        account: str | None = None,
        priority: str | None = None,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool | None = None,
        use_ssl: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.options: dict[str, Any] = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
        # A bad MAILERS option fails here, when the mailer is created, not at the first send.
        ensure_valid_options(
            self.options, source=f'MAILERS["{alias}"]["OPTIONS"]' if alias else "backend options"
        )
        if use_ssl:
            self.options.setdefault("security", "ssl")
        elif use_tls:
            self.options.setdefault("security", "starttls")
        self.fail_silently = bool(fail_silently)
        if DJANGO_61:
            super().__init__(alias=alias, **kwargs)
        else:  # Django < 6.1
            super().__init__(fail_silently=fail_silently, **kwargs)
            self.alias = alias
        self.account_address = account
        self.priority = priority or get_setting("PRIORITY", self.options)
        if self.priority not in quota.PRIORITIES:
            from .exceptions import GmailConfigurationError

            raise GmailConfigurationError(
                f"priority must be 'transactional' or 'bulk', not {self.priority!r}."
            )
        self._login_override = (username, password) if username else None
        self._pool = ConnectionPool(self.options)
        self._keep_open = False
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} alias={self.alias!r} {self._pool!r}>"

    # --- connection lifecycle ------------------------------------------------------------------
    def open(self) -> bool:
        """Keep connections open across ``send_messages`` calls until :meth:`close`.

        Connections are opened lazily, one per sending account, since the account depends on
        each message's From address. Returns True when this call started keeping them open.
        """
        if self._keep_open:
            return False
        self._keep_open = True
        return True

    def close(self) -> None:
        """Close every open connection (QUIT); never raises."""
        with self._lock:
            self._keep_open = False
            self._pool.close()

    # --- sending ---------------------------------------------------------------------------------
    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Send the messages; return how many Gmail accepted."""
        if not email_messages:
            return 0
        with self._lock:
            started = self.open()
            sent = 0
            router = self._router()
            try:
                for message in email_messages:
                    try:
                        self._send(router, message)
                    except InvalidMessage:
                        raise  # like Django's BadHeaderError: never hidden by fail_silently
                    except GmailSMTPError:
                        if not self.fail_silently:
                            raise
                        logger.warning("Message not sent (fail_silently=True)", exc_info=True)
                    else:
                        sent += 1
            finally:
                if started:
                    self.close()
        return sent

    def _router(self) -> Router:
        router = Router(
            account=self.account_address,
            options=self.options,
            include_paused=isinstance(self, CeleryGmailBackend),
        )
        if self._login_override is not None:
            account = _explicit_account(*self._login_override)
            router._accounts = [account]
            router.forced = account.email
        return router

    def _send(self, router: Router, message: EmailMessage) -> SendResult:
        """Route, reserve quota, send, record: failing over to another account on quota."""
        from .outbox import refuse_oversized

        priority = quota.message_priority(message, self.priority)
        envelope = router.route(message)
        assert envelope is not None
        refuse_oversized(envelope, self.options, action="sent")
        tried: list[Any] = []
        while True:
            assert envelope is not None
            try:
                reservation = quota.reserve(
                    envelope.account,
                    len(envelope.recipients),
                    priority=priority,
                    options=self.options,
                )
                try:
                    result = self._pool.send(envelope)
                except BaseException as exc:
                    # Not counted unless Gmail may have kept it (no reply to the final ".").
                    if not getattr(exc, "maybe_delivered", False):
                        reservation.release()
                    raise
                break
            except QuotaExceeded as exc:
                if exc.limit == "gmail" and exc.phase != "quota":
                    # Gmail's 550 5.4.5: the exception tells when sending can resume.
                    exc.next_slot_at = quota.mark_exhausted(
                        envelope.account, exc.reply, self.options
                    )
                tried.append(account_key(envelope.account))
                alternative = router.route(message, exclude=tried)
                if alternative is None:
                    raise
                logger.info(
                    "%s has no quota left; sending from %s instead",
                    envelope.account.email,
                    alternative.account.email,
                )
                envelope = alternative
        envelope.account.mark_sent()
        message.gmail_status = {
            "account": envelope.account.email,
            "reply": result.reply,
            "message_id": result.message_id,
            "refused": result.refused,
            "from_rewritten": envelope.from_rewritten,
        }
        signals.email_sent.send(
            type(self),
            message=message,
            account=envelope.account,
            result=result,
            outbound=None,
            follow_up=None,  # refused recipients are in message.gmail_status["refused"]
        )
        return result


class CeleryGmailBackend(GmailSMTPBackend):
    """Queue each message in the outbox, inside the caller's transaction; a Celery worker sends it.

    ``send_messages`` writes one :class:`~django_gmail_smtp.models.OutboundEmail` per message
    (routed, with its exact bytes) and, when the transaction commits, hands only the row id to
    ``django_gmail_smtp.tasks.send_outbound_email``. A rolled-back transaction sends nothing;
    a broker that is down leaves the row queued for the sweeper. Returns the number queued.
    Bad input (header injection, too many recipients, an unknown From with STRICT_FROM, a
    message over ``MAX_MESSAGE_SIZE``) is refused here, at once, as with the sync backend.
    """

    def __init__(self, *args: Any, using: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.using = using

    def open(self) -> bool:
        return False  # nothing to open: the worker holds the connections

    def close(self) -> None:
        return None

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        from . import outbox

        if not email_messages:
            return 0
        queued = 0
        router = self._router()
        for message in email_messages:
            try:
                outbox.queue_messages(
                    [message],
                    router=router,
                    priority=self.priority,
                    using=self.using,
                    options=self.options,
                )
            except InvalidMessage:
                raise
            except GmailSMTPError:
                if not self.fail_silently:
                    raise
                logger.warning("Message not queued (fail_silently=True)", exc_info=True)
            else:
                queued += 1
        return queued


@sensitive_variables("password")
def _explicit_account(username: str, password: str | None) -> GmailAccount:
    """``get_connection(username=..., password=...)`` as Django's SMTP backend accepts it."""
    account = GmailAccount.objects.active().filter(email=normalize_address(username)).first()
    if account is not None and not password:
        return account
    account = GmailAccount(
        email=normalize_address(username),
        auth_method=GmailAccount.AuthMethod.APP_PASSWORD,
        app_password=normalize_app_password(password or ""),
        is_default=True,
    )
    account.from_settings = True
    return account
