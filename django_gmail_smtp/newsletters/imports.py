"""Subscribers from a CSV file: :func:`import_csv` adds and updates them and says what it skipped.

The file needs a header row naming its columns: ``email`` (required), ``name``, and any others,
which become merge fields (``{{ subscriber.fields.city }}``). It is UTF-8, with or without a
byte-order mark (what spreadsheets write as "CSV UTF-8"), separated by commas or semicolons.
It is read line by line, so a file of 100,000 rows needs no more memory than one of 100.

Addresses are deduplicated within the file and against the list; suppressed, invalid,
unsubscribed and bounced addresses are skipped, each with its reason in the report. The admin
and the ``gmail_smtp newsletter import`` command only parse their input and show the report.

People added awaiting confirmation can be sent the confirmation mail at once
(``send_confirmations``), once the import is saved; the report counts what was sent and what
could not be.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from django.core.exceptions import ValidationError
from django.core.files.base import File
from django.core.validators import validate_email
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..models import normalize_address
from .models import MailingList, Subscriber, Suppression

__all__ = ["ImportLine", "ImportProblem", "ImportReport", "SkipReason", "import_csv"]

#: how many skipped lines the report keeps, with their reasons (the counts cover all of them)
MAX_LINES = 100
#: addresses looked up and written together
BATCH = 500
#: how often (in rows) the progress callback hears from the import
PROGRESS_EVERY = 1000
EMAIL_COLUMNS = ("email", "e_mail", "email_address", "mail")
NAME_COLUMNS = ("name", "full_name")
MAX_EMAIL = 320
UPDATED_FIELDS = (
    "name",
    "fields",
    "status",
    "consent_at",
    "consent_method",
    "consent_source",
    "updated_at",
)


class ImportProblem(ValueError):
    """The file as a whole cannot be imported (no header, no email column, not UTF-8);
    nothing was changed. The message says what to fix."""


class SkipReason(models.TextChoices):
    """Why a line of the file added or changed nobody."""

    EMPTY = "empty", _("no email address")
    INVALID = "invalid", _("not a valid email address")
    DUPLICATE = "duplicate", _("the same address is on an earlier line")
    SUPPRESSED = "suppressed", _("on the suppression list")
    UNSUBSCRIBED = "unsubscribed", _("unsubscribed from this list (an import does not re-add)")
    BOUNCED = "bounced", _("bounced on this list (an import does not re-add)")
    EXTRA_VALUES = "extra_values", _("more values than the header has columns")


@dataclass(frozen=True)
class ImportLine:
    """One skipped line: where it is in the file, its address as written, and why."""

    line: int
    email: str
    reason: SkipReason
    detail: str = ""

    @property
    def text(self) -> str:
        return f"{self.reason.label}{f' ({self.detail})' if self.detail else ''}"


@dataclass
class ImportReport:
    """What an import did: counts, and the first :data:`MAX_LINES` skipped lines."""

    source: str
    activate: bool
    rows: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: Counter = field(default_factory=Counter)  # SkipReason -> count
    lines: list[ImportLine] = field(default_factory=list)
    merge_fields: list[str] = field(default_factory=list)
    #: whether the people added awaiting confirmation were sent the confirmation mail
    send_confirmations: bool = False
    confirmations_sent: int = 0
    confirmations_failed: int = 0
    #: the first :data:`MAX_LINES` confirmation mails not sent: "address: the error"
    confirmation_errors: list[str] = field(default_factory=list)
    #: the addresses added awaiting confirmation (to be sent the mail)
    _awaiting: list[str] = field(default_factory=list, repr=False)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def more_lines(self) -> int:
        """Skipped lines counted but not listed in :attr:`lines`."""
        return self.skipped_total - len(self.lines)

    def skipped_by_reason(self) -> list[tuple[SkipReason, int]]:
        """(reason, count), most frequent first."""
        return [(SkipReason(reason), count) for reason, count in self.skipped.most_common()]

    def summary(self) -> str:
        """One sentence: the counts."""
        status = "active" if self.activate else "awaiting confirmation"
        text = (
            f"{self.rows:,} row(s) read: {self.added:,} added ({status}), {self.updated:,} "
            f"updated, {self.unchanged:,} already on the list unchanged, "
            f"{self.skipped_total:,} skipped."
        )
        if self.send_confirmations:
            text += f" Confirmation mail sent to {self.confirmations_sent:,}"
            if self.confirmations_failed:
                text += f", not sent to {self.confirmations_failed:,} (see below)"
            text += "."
        return text

    def _skip(self, line: int, email: str, reason: SkipReason, detail: str = "") -> None:
        self.skipped[reason.value] += 1
        if len(self.lines) < MAX_LINES:
            self.lines.append(ImportLine(line, email, reason, detail))


@dataclass
class _Row:
    line: int
    email: str
    name: str
    fields: dict[str, str]


def import_csv(
    mailing_list: MailingList,
    file: File | IO[bytes] | IO[str],
    *,
    activate: bool,
    source: str,
    progress: Callable[[int], None] | None = None,
    send_confirmations: bool = False,
) -> ImportReport:
    """Add the file's people to ``mailing_list`` and update the ones already on it.

    ``activate``: new subscribers are active at once (the site holds their consent) instead
    of awaiting confirmation. ``source``: the consent record's source, such as "people.csv,
    imported by alice on 2026-01-31 10:00 UTC". ``progress`` is called with the number of rows
    read so far, every :data:`PROGRESS_EVERY` rows and at the end. ``send_confirmations``
    (without ``activate``): once the import is saved, each person it added awaiting
    confirmation is sent the confirmation mail (:func:`.subscribers.send_confirmation_mail`,
    through the site's email backend); a mail that cannot be sent is counted in the report
    with its error, and the others still go.

    Raises :class:`ImportProblem` (nothing changed) when the file cannot be read as CSV with a
    header row and an email column, and ValueError for ``activate`` with
    ``send_confirmations``.
    """
    if activate and send_confirmations:
        raise ValueError(
            "Choose one: subscribe the people at once (activate), or send them the "
            "confirmation mail; not both."
        )
    report = ImportReport(source=source, activate=activate, send_confirmations=send_confirmations)
    lines = _text_lines(file)
    header_line = next(lines, None)
    if header_line is None or not header_line.strip():
        raise ImportProblem(
            "The file is empty. Its first line must name the columns, such as: email,name"
        )
    delimiter = ";" if header_line.count(";") > header_line.count(",") else ","
    reader = csv.reader(itertools.chain([header_line], lines), delimiter=delimiter)
    columns = [_column_name(name) for name in next(reader)]
    email_at = _find(columns, EMAIL_COLUMNS)
    if email_at is None:
        shown = ", ".join(c for c in columns if c) or "nothing"
        raise ImportProblem(
            f"The file has no email column; its first line names: {shown}. The first line must "
            "name the columns, such as: email,name,city"
        )
    name_at = _find(columns, NAME_COLUMNS)
    extra = [(i, c) for i, c in enumerate(columns) if c and i not in (email_at, name_at)]
    report.merge_fields = [c for _i, c in extra]

    seen: dict[str, int] = {}  # address -> the line it was first on
    batch: list[_Row] = []
    with transaction.atomic():
        try:
            for values in reader:
                line = reader.line_num
                if not any(v.strip() for v in values):
                    continue  # blank lines are not rows
                report.rows += 1
                if progress and report.rows % PROGRESS_EVERY == 0:
                    progress(report.rows)
                row = _parse(report, line, values, columns, email_at, name_at, extra)
                if row is None:
                    continue
                if row.email in seen:
                    detail = f"line {seen[row.email]}"
                    report._skip(line, row.email, SkipReason.DUPLICATE, detail)
                    continue
                seen[row.email] = line
                batch.append(row)
                if len(batch) >= BATCH:
                    _write(mailing_list, batch, report)
                    batch = []
        except csv.Error as exc:
            raise ImportProblem(
                f"Line {reader.line_num} cannot be read as CSV ({exc}), so nothing was imported."
            ) from None
        if batch:
            _write(mailing_list, batch, report)
    if progress:
        progress(report.rows)
    if send_confirmations:
        _send_confirmations(mailing_list, report)
    return report


def _send_confirmations(mailing_list: MailingList, report: ImportReport) -> None:
    """Mail each subscriber the import added awaiting confirmation its confirmation link."""
    from .subscribers import send_confirmation_mail

    awaiting, report._awaiting = report._awaiting, []
    for start in range(0, len(awaiting), BATCH):
        chunk = awaiting[start : start + BATCH]
        people = mailing_list.subscribers.filter(
            email__in=chunk, status=Subscriber.Status.PENDING
        ).order_by("email")
        for subscriber in people:
            subscriber.mailing_list = mailing_list
            try:
                send_confirmation_mail(subscriber)
            except Exception as exc:  # the backend's error, in its words, per address
                report.confirmations_failed += 1
                if len(report.confirmation_errors) < MAX_LINES:
                    text = " ".join(str(exc).split()) or type(exc).__name__
                    report.confirmation_errors.append(f"{subscriber.email}: {text}")
            else:
                report.confirmations_sent += 1


# --- reading -------------------------------------------------------------------------------------


def _text_lines(file: Any) -> Iterator[str]:
    """The file's lines as text, read lazily; the first without its byte-order mark."""
    if isinstance(file, File):
        raw: Iterable[Any] = file
    elif hasattr(file, "read"):
        raw = File(file)
    else:
        raw = file
    for number, line in enumerate(raw, start=1):
        if isinstance(line, bytes):
            try:
                text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                # Raised inside import_csv's transaction: what was written is rolled back.
                raise ImportProblem(
                    f"Line {number} of the file is not UTF-8 text, so nothing was imported. "
                    'Save the file as "CSV UTF-8" (or UTF-8 text) and import it again.'
                ) from None
        else:
            text = line.lstrip("\ufeff") if number == 1 else line
        yield text


def _column_name(header: str) -> str:
    """``City``, `` e-mail `` and ``Email Address`` as template-friendly names."""
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", header.strip().lstrip("\ufeff")).strip("_").lower()
    return name


def _find(columns: list[str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in columns:
            return columns.index(name)
    return None


def _parse(
    report: ImportReport,
    line: int,
    values: list[str],
    columns: list[str],
    email_at: int,
    name_at: int | None,
    extra: list[tuple[int, str]],
) -> _Row | None:
    """The row, or None once the report says why it is skipped."""
    written = values[email_at].strip() if email_at < len(values) else ""
    if not written:
        report._skip(line, "", SkipReason.EMPTY)
        return None
    if len(values) > len(columns):
        # A name with an unquoted comma shifts every value after it: better skipped than wrong.
        detail = f"{len(values)} values, {len(columns)} columns"
        report._skip(line, written, SkipReason.EXTRA_VALUES, detail)
        return None
    email = normalize_address(written)
    try:
        if len(email) > MAX_EMAIL:
            raise ValidationError("too long")
        validate_email(email)
    except ValidationError:
        report._skip(line, written, SkipReason.INVALID)
        return None
    name = values[name_at].strip() if name_at is not None and name_at < len(values) else ""
    fields = {key: values[i].strip() for i, key in extra if i < len(values) and values[i].strip()}
    return _Row(line, email, name[:200], fields)


# --- writing -------------------------------------------------------------------------------------


def _write(mailing_list: MailingList, batch: list[_Row], report: ImportReport) -> None:
    emails = [row.email for row in batch]
    suppressed = set(
        Suppression.objects.filter(email__in=emails)
        .filter(Q(mailing_list__isnull=True) | Q(mailing_list=mailing_list))
        .values_list("email", flat=True)
    )
    existing = {s.email: s for s in mailing_list.subscribers.filter(email__in=emails)}
    now = timezone.now()
    new: list[Subscriber] = []
    changed: list[Subscriber] = []
    for row in batch:
        if row.email in suppressed:
            report._skip(row.line, row.email, SkipReason.SUPPRESSED)
            continue
        subscriber = existing.get(row.email)
        if subscriber is None:
            new.append(_new_subscriber(mailing_list, row, report, now))
            continue
        if subscriber.status == Subscriber.Status.UNSUBSCRIBED:
            report._skip(row.line, row.email, SkipReason.UNSUBSCRIBED)
        elif subscriber.status == Subscriber.Status.BOUNCED:
            report._skip(row.line, row.email, SkipReason.BOUNCED)
        elif _update(subscriber, row, report, now):
            changed.append(subscriber)
            report.updated += 1
        else:
            report.unchanged += 1
    Subscriber.objects.bulk_create(new)
    report.added += len(new)
    if report.send_confirmations:
        report._awaiting.extend(s.email for s in new if s.status == Subscriber.Status.PENDING)
    if changed:
        # bulk_update skips auto_now: _update() set updated_at.
        Subscriber.objects.bulk_update(changed, UPDATED_FIELDS)


def _new_subscriber(
    mailing_list: MailingList, row: _Row, report: ImportReport, now: Any
) -> Subscriber:
    # bulk_create skips save(): the address is already normalized (_parse).
    return Subscriber(
        mailing_list=mailing_list,
        email=row.email,
        name=row.name,
        fields=row.fields,
        status=Subscriber.Status.ACTIVE if report.activate else Subscriber.Status.PENDING,
        consent_at=now if report.activate else None,
        consent_method=Subscriber.Consent.IMPORT,
        consent_source=report.source[:500],
    )


def _update(subscriber: Subscriber, row: _Row, report: ImportReport, now: Any) -> bool:
    """Apply the row to a subscriber already on the list; True if anything changed.

    A name or a merge field the file leaves empty keeps its value; an import never turns an
    active subscriber back into one awaiting confirmation."""
    changed = False
    if row.name and row.name != subscriber.name:
        subscriber.name = row.name
        changed = True
    fields = dict(subscriber.fields or {})
    merged = {**fields, **row.fields}
    if merged != fields:
        subscriber.fields = merged
        changed = True
    if report.activate and subscriber.status == Subscriber.Status.PENDING:
        subscriber.status = Subscriber.Status.ACTIVE
        subscriber.consent_at = now
        subscriber.consent_method = Subscriber.Consent.IMPORT
        subscriber.consent_source = report.source[:500]
        changed = True
    if changed:
        subscriber.updated_at = now
    return changed
