"""Django email backends: thin siblings over :class:`GmailBackendBase`.

``GmailSMTPBackend`` sends now, in the calling process; ``CeleryGmailBackend`` queues in the
outbox for a Celery worker. Both are usable as ``EMAIL_BACKEND`` (Django 4.2-6.0) and as the
``BACKEND`` of a Django 6.1 ``MAILERS`` entry, whose ``OPTIONS`` arrive here as keyword
arguments (``host``, ``port``, ``security``, ``timeout``, ``ca_file``, ``quota_database``,
``transport_class``, ... see :data:`OPTION_NAMES`; and ``account``, ``username``,
``password``). The options are resolved once into a
:class:`~django_gmail_smtp.conf.MailerSettings`; the work is done by the delivery pipeline
(:mod:`django_gmail_smtp.pipeline`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import django
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.views.decorators.debug import sensitive_variables

from .conf import MAILER_OPTIONS, MailerSettings, for_mailer, resolve_cached
from .exceptions import GmailConfigurationError, GmailSMTPError, InvalidMessage
from .outbox import OutboxWriter
from .pipeline import Pipeline
from .routing import Router
from .transport import make_transport

logger = logging.getLogger(__name__)

#: backend options that map to GMAIL_SMTP keys (lower case here, upper case there); ``priority``
#: is one too, but a named argument
OPTION_NAMES = tuple(name for name in MAILER_OPTIONS if name != "priority")

DJANGO_61 = django.VERSION >= (6, 1)


class GmailBackendBase(BaseEmailBackend):
    """What both backends share: options resolved once into :attr:`settings`, one
    :class:`~django_gmail_smtp.pipeline.Pipeline`, ``fail_silently`` and the router.

    A subclass implements :meth:`handle` (one routed message) and may set
    :attr:`include_paused` (whether paused accounts may be chosen, their mail waiting).
    """

    #: paused accounts may be chosen (after active ones); their mail then waits for them
    include_paused: ClassVar[bool] = False
    #: the verb of the fail_silently warning: "sent" or "queued"
    action: ClassVar[str] = "sent"

    @sensitive_variables("password", "kwargs", "options")
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
        options = {name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs}
        options.update(
            account=account,
            priority=priority,
            username=username,
            password=password,
            use_tls=use_tls,
            use_ssl=use_ssl,
        )
        # A bad option fails here, when the mailer is created, not at the first send.
        self.settings: MailerSettings = resolve_cached(options, alias=alias or "")
        self.fail_silently = bool(fail_silently)
        if DJANGO_61:
            super().__init__(alias=alias, **kwargs)
        else:  # Django < 6.1
            super().__init__(fail_silently=fail_silently, **kwargs)
            self.alias = alias
        self.account_address = self.settings.account
        self.priority = self.settings.priority
        self.pipeline = Pipeline(self.settings, transport=self._transport(), sender=type(self))
        self._keep_open = False
        self._lock = threading.RLock()

    def _transport(self) -> Any:
        return make_transport(self.settings)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} alias={self.alias!r} {self.pipeline.transport!r}>"

    @property
    def options(self) -> MailerSettings:
        """This mailer's settings (named ``options`` when they were a dict)."""
        return self.settings

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
            self.pipeline.transport.close()

    # --- sending -------------------------------------------------------------------------------
    def router(self) -> Router:
        """A router for one batch, with this mailer's options."""
        return self.pipeline.router(include_paused=self.include_paused)

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Handle each message; return how many were sent (or queued).

        Bad input (header injection, no recipients, ...) always raises, like Django's
        ``BadHeaderError``; other sending errors are logged instead when ``fail_silently``.
        """
        if not email_messages:
            return 0
        with self._lock:
            started = self.open()
            try:
                router = self.router()
                done = 0
                for message in email_messages:
                    try:
                        self.handle(router, message)
                    except InvalidMessage:
                        raise  # never hidden by fail_silently
                    except GmailSMTPError:
                        if not self.fail_silently:
                            raise
                        logger.warning(
                            "Message not %s (fail_silently=True)", self.action, exc_info=True
                        )
                    else:
                        done += 1
                return done
            finally:
                if started:
                    self.close()

    def handle(self, router: Router, message: EmailMessage) -> None:  # pragma: no cover
        raise NotImplementedError


class GmailSMTPBackend(GmailBackendBase):
    """Send each message now over one verified, authenticated connection per account.

    A whole ``send_messages`` batch shares the connection(s); used as a context manager
    (``with backend:``) the connections stay open across calls until ``close()``.
    After sending, each message has a ``gmail_status`` dict: ``account``, ``reply`` (Gmail's
    250 text), ``message_id`` and ``refused`` (recipients Gmail refused while accepting others).
    """

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Send the messages now; those of one account are streamed over one connection
        (RFC 2920 pipelining: each body goes out with the next message's envelope). Return
        how many were sent; bad input raises, other errors too unless ``fail_silently``."""
        if not email_messages:
            return 0
        with self._lock:
            started = self.open()
            try:
                return self.pipeline.send_many(
                    self.router(), email_messages, self.priority, fail_silently=self.fail_silently
                )
            finally:
                if started:
                    self.close()

    def handle(self, router: Router, message: EmailMessage) -> None:
        self.pipeline.send_now(router, message, self.priority)


class CeleryGmailBackend(GmailBackendBase):
    """Queue each message in the outbox, inside the caller's transaction; a Celery worker sends it.

    ``send_messages`` writes one :class:`~django_gmail_smtp.models.OutboundEmail` per message
    (routed, with its exact bytes and this mailer's ``MAILERS`` alias) and, when the transaction
    commits, hands only the row id to ``django_gmail_smtp.tasks.send_outbound_email``. A
    rolled-back transaction sends nothing; a broker that is down leaves the row queued for the
    sweeper. Returns the number queued. Bad input (header injection, too many recipients, an
    unknown From with STRICT_FROM, a message over ``MAX_MESSAGE_SIZE``) is refused here, at
    once, as with the sync backend.

    The worker sends with the settings of the mailer that queued the row, which it reads from
    ``MAILERS[alias]["OPTIONS"]`` (or GMAIL_SMTP for a backend without an alias): never from
    the task, which carries only the row id, so credentials never pass through the broker.
    Options the worker cannot see that way (keyword arguments that are not those of the
    ``MAILERS`` entry, or connection options without an alias) are refused here with
    :class:`~django_gmail_smtp.exceptions.GmailConfigurationError`, rather than sent with other
    settings than asked for. Options used only while queueing (``priority``, ``account``,
    ``strict_from``, ``max_recipients_per_message``, ``max_message_size``) may differ.
    """

    include_paused = True
    action = "queued"
    #: options applied while queueing, which the worker does not need to see
    QUEUE_TIME_OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"priority", "account", "strict_from", "max_recipients_per_message", "max_message_size"}
    )

    def __init__(self, *args: Any, using: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.using = using
        self._refuse_options_the_worker_cannot_see()

    def _transport(self) -> Any:
        self.settings.transport()  # a transport_class that cannot be imported fails now
        return None  # nothing to send with here: the worker holds the connections

    def __repr__(self) -> str:
        return f"<{type(self).__name__} alias={self.alias!r}>"

    def open(self) -> bool:
        return False  # nothing to open: the worker holds the connections

    def close(self) -> None:
        return None

    def router(self) -> Router:
        """A router on the process's account list (cached for ``routing.ACCOUNTS_TTL``
        seconds): queueing only routes, it never logs in with the accounts."""
        return Router(options=self.settings, include_paused=True, cached=True, unbuilt=True)

    def send_messages(self, email_messages: Iterable[EmailMessage]) -> int:
        """Route each message and store it in the outbox; return how many were queued.

        The rows are written :data:`~django_gmail_smtp.outbox.QUEUE_CHUNK` at a time (one
        INSERT each) and their ids handed to Celery once per chunk when the transaction commits
        (with one broker connection). ``email_messages`` may be any iterable: a generator keeps
        memory flat however many messages there are. Bad input raises at once (the messages
        before it are queued); other errors are logged instead when ``fail_silently``.
        """
        if not email_messages:
            return 0
        with self._lock:
            router = self.router()
            done = 0
            with OutboxWriter(mailer=self.settings.alias, using=self.using) as writer:
                for message in email_messages:
                    try:
                        envelope, priority = self.pipeline.route(
                            router, message, self.priority, action=self.action
                        )
                    except InvalidMessage:
                        raise  # never hidden by fail_silently
                    except GmailSMTPError:
                        if not self.fail_silently:
                            raise
                        logger.warning(
                            "Message not %s (fail_silently=True)", self.action, exc_info=True
                        )
                    else:
                        writer.add(envelope, message, priority)
                        done += 1
            return done

    def handle(self, router: Router, message: EmailMessage) -> None:
        """Queue one routed message now (one INSERT; its id handed to Celery on commit)."""
        self.pipeline.queue(router, message, self.priority, using=self.using)

    def _refuse_options_the_worker_cannot_see(self) -> None:
        alias = self.settings.alias
        name = type(self).__name__
        try:
            worker = for_mailer(alias)
        except GmailConfigurationError as exc:
            raise GmailConfigurationError(
                f"{name}(alias={alias!r}) cannot queue mail: its Celery worker reads the "
                f"mailer's options from MAILERS by that alias, and {exc}"
            ) from None
        ignored = set(self.QUEUE_TIME_OPTIONS)
        if not self.settings.password:
            # A username alone routes to the active account of that address: the row names it.
            ignored |= {"username", "password"}
        differ = [
            f.name
            for f in dataclasses.fields(MailerSettings)
            if f.compare
            and f.name not in ignored
            and getattr(worker, f.name) != getattr(self.settings, f.name)
        ]
        if differ:
            where = f'MAILERS["{alias}"]["OPTIONS"]' if alias else "GMAIL_SMTP"
            raise GmailConfigurationError(
                f"{name} was given {', '.join(differ)} other than in {where}, but its Celery "
                f"worker sends with the options in {where}: the task carries only the outbox "
                "row's id (and the row the mailer's alias), never options or credentials. Put "
                "these options in a MAILERS entry (Django 6.1) and send through that mailer, or "
                "set them in GMAIL_SMTP."
            )
