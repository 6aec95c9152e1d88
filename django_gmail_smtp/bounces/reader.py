"""The bounce reader: for each account, read the reports that reached its inbox since the last
run, record each bounced recipient once, mark the outbox row, and send ``email_bounced``.

Where it stands in each inbox (the last UID looked at, under the mailbox's UIDVALIDITY) is kept
in :class:`~django_gmail_smtp.models.BounceMailbox`, with the IMAP login's health, apart from the
account's own: an inbox that cannot be read never holds back the account's mail. A report is
recorded once per recipient (keyed by the report's Message-ID), so reading it again, or the
whole inbox again after a UIDVALIDITY change, counts nothing twice.

Other mail in the same inbox can be acted on by handlers another app registers
(:func:`register_inbox_handler`): the newsletters sub-app, when installed, registers one for the
unsubscribe emails that ``List-Unsubscribe``'s mailto sends. The core knows nothing of them.
"""

from __future__ import annotations

import email
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from datetime import timezone as dt_timezone
from email import policy
from email.message import EmailMessage
from email.utils import getaddresses

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from ..conf import get_setting
from ..enums import BounceKind, Health
from ..models import Bounce, BounceMailbox, GmailAccount, OutboundEmail, normalize_address
from ..signals import email_bounced
from .imap import IMAPError, Inbox
from .parse import (
    BounceReport,
    FailedRecipient,
    MalformedReport,
    NotABounce,
    normalize_message_id,
    parse_report,
)

logger = logging.getLogger(__name__)

__all__ = [
    "InboxHandler",
    "ReadResult",
    "inbox_handlers",
    "read_account",
    "read_all",
    "record_report",
    "register_inbox_handler",
    "unregister_inbox_handler",
]

#: reports handled between two saves of the cursor
BATCH = 50


@dataclass(frozen=True)
class InboxHandler:
    """Mail other than delivery reports that the reader acts on in each inbox it reads.

    ``search``: IMAP SEARCH criteria finding the candidates among the new messages (such as
    ``SUBJECT "unsubscribe"``). ``handle(account, message)`` gets each candidate, parsed
    (``email.policy.default``); it returns True when it acted on it (the message is then
    labelled or moved like a report, when ``BOUNCE_ACTION`` says so, and counted as
    ``label`` in the run's summary), False to leave it as it is. What it raises is logged,
    and the other messages are still read.
    """

    name: str
    search: str
    handle: Callable[[GmailAccount, EmailMessage], bool]
    label: str = "other message(s) acted on"


_handlers: dict[str, InboxHandler] = {}


def register_inbox_handler(handler: InboxHandler) -> None:
    """Have the reader act on the mail ``handler`` finds (registered again under the same
    name, it replaces the earlier one). Call it from an app's ``ready()``."""
    _handlers[handler.name] = handler


def unregister_inbox_handler(name: str) -> None:
    """Stop acting on the mail of the handler registered as ``name`` (if any)."""
    _handlers.pop(name, None)


def inbox_handlers() -> list[InboxHandler]:
    """The registered handlers, in the order they were registered."""
    return list(_handlers.values())


@dataclass
class ReadResult:
    """What one run did for one account."""

    account: str
    ok: bool = True
    #: why the inbox could not be read (``ok`` False)
    detail: str = ""
    #: messages that looked like reports and were read
    reports: int = 0
    #: bounces recorded by this run (``hard`` + ``soft``)
    bounces: int = 0
    hard: int = 0
    soft: int = 0
    #: reports about mail that is not in the outbox, or only delay notices
    ignored: int = 0
    #: bounces already recorded by an earlier run
    duplicates: int = 0
    #: reports that could not be read (left in the inbox as they are)
    malformed: int = 0
    #: other mail the registered handlers acted on, by their labels
    handled: Counter = field(default_factory=Counter)

    @property
    def text(self) -> str:
        """One line for people (the command, the task's log)."""
        if not self.ok:
            return f"{self.account}: not read. {self.detail}"
        parts = [f"{self.reports} report(s) read", f"{self.bounces} new bounce(s)"]
        if self.bounces:
            parts[-1] += f" ({self.hard} hard, {self.soft} soft)"
        for name in ("ignored", "duplicates", "malformed"):
            count = getattr(self, name)
            if count:
                parts.append(f"{count} {name}")
        parts.extend(f"{count} {label}" for label, count in self.handled.items() if count)
        return f"{self.account}: " + ", ".join(parts)


def read_all(accounts: Iterable[GmailAccount] | None = None) -> list[ReadResult]:
    """Read the bounces of ``accounts`` (default: every active account), one after the other;
    one account's failure never stops the others."""
    if accounts is None:
        accounts = GmailAccount.objects.active().order_by("pk")
    results = []
    for account in accounts:
        try:
            results.append(read_account(account))
        except Exception as exc:  # a bug or a database error: the other accounts still run
            logger.exception("Reading the bounces of %s failed", account.email)
            results.append(ReadResult(account.email, ok=False, detail=f"{type(exc).__name__}"))
    return results


def read_account(account: GmailAccount) -> ReadResult:
    """Read the new reports in ``account``'s inbox; never raises for an IMAP problem (it is
    recorded on the account's :class:`BounceMailbox` and returned)."""
    if account.pk is None:
        raise ValueError(
            f"{account.email} is not a saved account (EMAIL_HOST_USER): its place in the inbox "
            "cannot be remembered. Add it as a Gmail account to read its bounces."
        )
    mailbox, _ = BounceMailbox.objects.get_or_create(account=account)
    action = get_setting("BOUNCE_ACTION") or None
    label = str(get_setting("BOUNCE_LABEL"))
    result = ReadResult(account.email)
    try:
        with Inbox(account) as inbox:
            state = inbox.select("INBOX", readonly=action is None)
            if state.uid_validity != mailbox.uid_validity:
                if mailbox.uid_validity is not None:
                    logger.info(
                        "The inbox of %s has a new UIDVALIDITY: reading it again from the "
                        "start (bounces already recorded are not counted again)",
                        account.email,
                    )
                mailbox.uid_validity, mailbox.last_uid = state.uid_validity, 0
            reports = set(inbox.report_uids(mailbox.last_uid))
            others = _other_uids(inbox, account, mailbox.last_uid)
            uids = sorted(reports | set(others))
            for start in range(0, len(uids), BATCH):
                batch = uids[start : start + BATCH]
                processed = []
                for uid, raw in inbox.fetch(batch):
                    done = uid in reports and _handle(account, mailbox, uid, raw, result)
                    if not done and uid in others:
                        done = _handle_other(account, uid, raw, others[uid], result)
                    if done:
                        processed.append(uid)
                if action and processed:
                    inbox.file(processed, action, label)
                mailbox.last_uid = max(mailbox.last_uid, batch[-1])
                _save_cursor(mailbox)
            if state.uid_next:
                # Everything below UIDNEXT existed when the search ran: nothing to look at again.
                mailbox.last_uid = max(mailbox.last_uid, state.uid_next - 1)
            _save_cursor(mailbox)
    except IMAPError as exc:
        mailbox.mark_health(exc.health or mailbox.health, exc.detail)
        logger.warning("Bounces of %s not read: %s", account.email, exc.detail)
        result.ok, result.detail = False, exc.detail
        return result
    if mailbox.health != Health.OK or mailbox.health_detail:
        mailbox.mark_health(Health.OK, "")
    BounceMailbox.objects.filter(pk=mailbox.pk).update(last_read_at=timezone.now())
    if result.reports or result.malformed:
        logger.info("Bounce reader: %s", result.text)
    return result


def _other_uids(inbox: Inbox, account: GmailAccount, after: int) -> dict[int, list[InboxHandler]]:
    """The new messages each registered handler's search finds: UID -> its handlers."""
    found: dict[int, list[InboxHandler]] = {}
    for handler in inbox_handlers():
        try:
            uids = inbox.search_uids(after, handler.search)
        except IMAPError as exc:  # a broken connection fails the next command too
            logger.warning(
                "The inbox of %s could not be searched for %s (%s); the reports are still read",
                account.email,
                handler.label,
                exc.detail,
            )
            continue
        for uid in uids:
            found.setdefault(uid, []).append(handler)
    return found


def _handle_other(
    account: GmailAccount,
    uid: int,
    raw: bytes,
    handlers: list[InboxHandler],
    result: ReadResult,
) -> bool:
    """Give one message to the handlers whose search found it; True once one acted on it."""
    try:
        message = email.message_from_bytes(raw, policy=policy.default)
    except Exception:  # a message the email package chokes on must not stop the others
        logger.exception("UID %s in the inbox of %s cannot be parsed", uid, account.email)
        return False
    for handler in handlers:
        try:
            acted = handler.handle(account, message)
        except Exception:
            logger.exception(
                "The inbox handler %r failed on UID %s in the inbox of %s; it is left as it is",
                handler.name,
                uid,
                account.email,
            )
            continue
        if acted:
            result.handled[handler.label] += 1
            return True
    return False


def _save_cursor(mailbox: BounceMailbox) -> None:
    BounceMailbox.objects.filter(pk=mailbox.pk).update(
        uid_validity=mailbox.uid_validity, last_uid=mailbox.last_uid
    )


def _handle(
    account: GmailAccount, mailbox: BounceMailbox, uid: int, raw: bytes, result: ReadResult
) -> bool:
    """Read and record one message; True when it was a report that was processed (it may be
    labelled or moved), False when it is not one or cannot be read (it stays as it is)."""
    try:
        report = parse_report(raw)
    except NotABounce as exc:
        logger.debug("UID %s in the inbox of %s is not a report (%s)", uid, account.email, exc)
        return False
    except MalformedReport as exc:
        result.malformed += 1
        logger.warning(
            "A delivery report in the inbox of %s (UID %s) cannot be read: %s. It is left as "
            "it is.",
            account.email,
            uid,
            exc,
        )
        return False
    except Exception:  # a report the email package chokes on must not stop the others
        result.malformed += 1
        logger.exception(
            "A delivery report in the inbox of %s (UID %s) cannot be read; it is left as it is",
            account.email,
            uid,
        )
        return False
    result.reports += 1
    record_report(account, report, key=report.key(mailbox.uid_validity, uid), result=result)
    return True


def record_report(
    account: GmailAccount, report: BounceReport, *, key: str, result: ReadResult | None = None
) -> list[Bounce]:
    """Record the bounces ``report`` tells of (mail sent from ``account``); return the new
    ones. A report about mail not in the outbox, or only about a delay, records nothing."""
    result = result if result is not None else ReadResult(account.email)
    failed = [r for r in report.recipients if r.failed]
    if not failed:
        result.ignored += 1
        logger.info(
            "A report in the inbox of %s only says delivery to %s is delayed: ignored",
            account.email,
            ", ".join(r.address for r in report.recipients),
        )
        return []
    rows = _outbox_rows(account, report.original_message_id)
    if not rows:
        result.ignored += 1
        logger.info(
            "A report in the inbox of %s is about %s, which is not in the outbox: ignored",
            account.email,
            report.original_message_id or "a message it does not identify (no Message-ID)",
        )
        return []
    created_bounces = []
    for recipient in failed:
        row, address = _match(rows, recipient)
        if row is None:
            result.ignored += 1
            logger.info(
                "A report in the inbox of %s names %s, not a recipient of %s: ignored",
                account.email,
                recipient.address,
                report.original_message_id,
            )
            continue
        bounce = _store(account, report, key, row, recipient, address)
        if bounce is None:
            result.duplicates += 1
            continue
        created_bounces.append(bounce)
        result.bounces += 1
        if bounce.kind == BounceKind.HARD:
            result.hard += 1
        else:
            result.soft += 1
        logger.info(
            "%s bounce of %s (%s) for outbox row %s, sent from %s",
            bounce.get_kind_display().capitalize(),
            address,
            bounce.code or "no status code",
            row.pk,
            account.email,
        )
        for receiver, response in email_bounced.send_robust(
            sender=Bounce, bounce=bounce, outbound=row, account=account
        ):
            if isinstance(response, Exception):
                logger.error(
                    "A receiver of email_bounced (%r) failed for the bounce of %s",
                    receiver,
                    address,
                    exc_info=response,
                )
    return created_bounces


def _outbox_rows(account: GmailAccount, message_id: str) -> list[OutboundEmail]:
    message_id = normalize_message_id(message_id)
    if not message_id:
        return []
    ids = {message_id, message_id[1:-1]}
    sent_by = Q(account=account) | Q(account_email=normalize_address(account.email))
    return list(
        OutboundEmail.objects.filter(sent_by, message_id__in=ids)
        .defer("mime", "draft")
        .order_by("-created_at", "-pk")
    )


def _match(
    rows: list[OutboundEmail], recipient: FailedRecipient
) -> tuple[OutboundEmail | None, str]:
    """The outbox row (of those with the bounced Message-ID) that was sent to the recipient,
    and the address as it was sent to."""
    for address in (recipient.address, recipient.original):
        if not address:
            continue
        for row in rows:
            if address in _recipients(row):
                return row, address
    # Mail forwarded on by its recipient bounces at the forward target: the report names that
    # address. A row sent to one recipient alone can only be about that recipient.
    if len(rows) == 1 and len(_recipients(rows[0])) == 1:
        return rows[0], _recipients(rows[0])[0]
    return None, ""


def _recipients(row: OutboundEmail) -> list[str]:
    return [normalize_address(a) for _n, a in getaddresses([str(r) for r in row.recipients]) if a]


def _store(
    account: GmailAccount,
    report: BounceReport,
    key: str,
    row: OutboundEmail,
    recipient: FailedRecipient,
    address: str,
) -> Bounce | None:
    """Create the Bounce and mark the row, at once; None if it was recorded before."""
    diagnostic = recipient.diagnostic
    if address != recipient.address:
        diagnostic = f"(reported for {recipient.address}) {diagnostic}".strip()
    with transaction.atomic():
        bounce, created = Bounce.objects.get_or_create(
            account=account,
            report_id=key,
            recipient=address,
            defaults={
                "outbound": row,
                "kind": recipient.kind,
                "code": recipient.code[:16],
                "diagnostic": diagnostic,
                "report": report.text,
                "original_message_id": report.original_message_id[:998],
                "reported_at": _aware(report.date),
            },
        )
        if created:
            OutboundEmail.objects.filter(pk=row.pk, bounced_at__isnull=True).update(
                bounced_at=bounce.created_at
            )
    return bounce if created else None


def _aware(moment: datetime | None) -> datetime | None:
    """The report's Date as Django stores times (aware with USE_TZ, naive local without)."""
    if moment is None:
        return None
    if timezone.is_naive(moment):
        moment = moment.replace(tzinfo=dt_timezone.utc)
    return moment if settings.USE_TZ else timezone.make_naive(moment)
