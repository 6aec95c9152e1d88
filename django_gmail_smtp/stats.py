"""Numbers and pictures for the admin: sending history per account, charts, message previews.

Charts are server-rendered SVG (no scripts, no external files).
"""

from __future__ import annotations

import email
import email.policy
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from django.db.models import Count, Q
from django.utils import timezone
from django.utils.html import escape, format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from . import quota
from .conf import format_time, get_setting, local
from .enums import BounceKind
from .exceptions import InvalidMessage
from .models import Bounce, GmailAccount, OutboundEmail, QuotaBucket, QuotaDay, SenderQuota
from .routing import build_draft

#: How people read a moment in the admin and the command: one format everywhere.
TIME_FORMAT = "%Y-%m-%d %H:%M"


@dataclass
class AccountStats:
    account: GmailAccount
    status: quota.QuotaStatus
    hourly: list[tuple[datetime, int, int]]  # (hour, messages, recipients), oldest first
    daily: list[tuple[date, int, int]]  # (day, messages, recipients), oldest first
    outbox: dict[str, int] = field(default_factory=dict)
    #: bounces read back from the account's inbox: (day, hard, soft), oldest first
    bounces_daily: list[tuple[date, int, int]] = field(default_factory=list)

    @property
    def bounces_total(self) -> int:
        return sum(hard + soft for _d, hard, soft in self.bounces_daily)

    @property
    def bounce_chart(self) -> SafeString:
        return bar_chart(
            [(f"{d:%d %b}", hard, soft) for d, hard, soft in self.bounces_daily],
            title=f"Hard and soft bounces per day, last 30 days ({self.account.email})",
            names=("hard bounces", "soft bounces"),
        )

    @property
    def at_limit(self) -> bool:
        """Nothing can be sent from the account now (see :func:`at_limit`)."""
        return at_limit(self.status)

    @property
    def next_slot_text(self) -> str:
        """When the account can send again: Gmail's block's end, else the next free slot."""
        return format_time(self.status.exhausted_until or self.status.next_slot_at, TIME_FORMAT)

    @property
    def exhausted_until_text(self) -> str:
        return format_time(self.status.exhausted_until, TIME_FORMAT)

    @property
    def hourly_chart(self) -> SafeString:
        return bar_chart(
            [(f"{h:%H}h", m, r) for h, m, r in self.hourly],
            title=f"Messages and recipients per hour, last 24 hours ({self.account.email})",
        )

    @property
    def daily_chart(self) -> SafeString:
        return bar_chart(
            [(f"{d:%d %b}", m, r) for d, m, r in self.daily],
            title=f"Messages and recipients per day, last 30 days ({self.account.email})",
        )


def _hour(moment: datetime) -> datetime:
    return local(moment).replace(minute=0, second=0, microsecond=0)


def account_stats(account: GmailAccount, now: datetime | None = None) -> AccountStats:
    """Hourly (24 h) and daily (30 days) sends of ``account``, its quota and outbox counts."""
    now = now or quota.now()
    status = quota.quota_status(account)
    quota_row = SenderQuota.objects.filter(address=status.address).first()
    this_hour = _hour(now)
    hours = [this_hour - timedelta(hours=23 - i) for i in range(24)]
    today = local(now).date()
    days = [today - timedelta(days=29 - i) for i in range(30)]
    per_hour: Counter = Counter()
    per_day: Counter = Counter()
    if quota_row is not None:
        buckets = QuotaBucket.objects.filter(
            quota=quota_row, minute__gte=now - timedelta(days=30)
        ).values_list("minute", "messages", "recipients")
        for minute, messages, recipients in buckets:
            hour = _hour(minute)
            per_hour[(hour, "m")] += messages
            per_hour[(hour, "r")] += recipients
            day = local(minute).date()
            per_day[(day, "m")] += messages
            per_day[(day, "r")] += recipients
        for day, messages, recipients in QuotaDay.objects.filter(
            quota=quota_row, day__gte=days[0]
        ).values_list("day", "messages", "recipients"):
            per_day[(day, "m")] += messages
            per_day[(day, "r")] += recipients
    since = now - timedelta(days=30)
    counts = dict(
        OutboundEmail.objects.filter(account_email=status.address, created_at__gte=since)
        .values_list("status")
        .annotate(n=Count("pk"))
        .order_by()
    )
    per_bounce_day: Counter = Counter()
    if account.pk and not account.from_settings:
        for moment, kind in Bounce.objects.filter(
            account=account, created_at__gte=since
        ).values_list("created_at", "kind"):
            per_bounce_day[(local(moment).date(), kind)] += 1
    outbox_counts = {s: counts.get(s, 0) for s in ("sent", "queued", "deferred", "failed")}
    outbox_counts["bounced"] = OutboundEmail.objects.filter(
        account_email=status.address, bounced_at__gte=since
    ).count()
    return AccountStats(
        account=account,
        status=status,
        hourly=[(h, per_hour[(h, "m")], per_hour[(h, "r")]) for h in hours],
        daily=[(d, per_day[(d, "m")], per_day[(d, "r")]) for d in days],
        outbox=outbox_counts,
        bounces_daily=[
            (d, per_bounce_day[(d, BounceKind.HARD)], per_bounce_day[(d, BounceKind.SOFT)])
            for d in days
        ],
    )


def dashboard() -> list[AccountStats]:
    """Every account's stats, in the order routing prefers them (paused ones last)."""
    from .services import eligible_accounts

    return [account_stats(a) for a in eligible_accounts(include_paused=True)]


# --- quota in words ------------------------------------------------------------------------------


def at_limit(status: quota.QuotaStatus) -> bool:
    """Whether no message can be sent from the account now (a limit reached, or Gmail's block)."""
    return bool(
        status.exhausted_until or status.messages_remaining == 0 or status.recipients_remaining == 0
    )


def room_text(status: quota.QuotaStatus) -> str:
    """What the account can send now: "room for N now", or, only at its limit, when the next
    slot frees (saying when a slot frees while there is room reads as if it were blocked)."""
    if not at_limit(status):
        n = status.messages_remaining
        return f"room for {n} message{'s' if n != 1 else ''} now"
    when = format_time(status.next_slot_at or status.exhausted_until, TIME_FORMAT)
    if status.messages_remaining == 0 or status.recipients_remaining == 0:
        return f"at the limit; next slot frees {when}"
    return f"blocked until {when}"  # Gmail said so before our count reached the limit


# --- the outbox: mail waiting longer than it should ----------------------------------------------

#: A row is "waiting too long" after this many SWEEP_GRACE periods (at least MIN_OVERDUE).
OVERDUE_GRACES = 5
MIN_OVERDUE = timedelta(minutes=5)


def overdue_after() -> timedelta:
    """How long a due row may wait before the admin calls it "waiting too long"."""
    return max(MIN_OVERDUE, timedelta(seconds=float(get_setting("SWEEP_GRACE"))) * OVERDUE_GRACES)


def waiting_too_long(now: datetime | None = None) -> Q:
    """Rows that should have been sent by now: queued (and due) for longer than
    :func:`overdue_after`, deferred past their next attempt by as much, or left "sending" by
    a worker whose lease ran out that long ago. Usually no worker runs, or the broker is down."""
    from .outbox import lease_now

    limit = (now or timezone.now()) - overdue_after()
    # Leases are set on the database's clock (outbox.lease_now): compare them with it.
    lease_limit = (now or lease_now()) - overdue_after()
    Status = OutboundEmail.Status
    return (
        Q(status=Status.QUEUED, updated_at__lt=limit)
        & (Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lt=limit))
        | Q(status=Status.DEFERRED, next_attempt_at__lt=limit)
        | Q(status=Status.SENDING, lease_expires_at__lt=lease_limit)
    )


def bar_chart(
    series: list[tuple[str, int, int]],
    *,
    title: str,
    width: int = 720,
    height: int = 170,
    names: tuple[str, str] = ("messages", "recipients"),
) -> SafeString:
    """Paired bars (messages dark, recipients light; ``names`` says what the two are) with a
    y-axis maximum and x labels.

    The SVG scales with the page, so on a narrow screen its text would shrink with it:
    admin.css enlarges the labels there and hides the minor ones (``gms-axis-minor``), and the
    margins here leave room for labels at that size.
    """
    n = max(1, len(series))
    top = max([max(m, r) for _l, m, r in series] + [1])
    # Room for the y-axis maximum at the narrow-screen label size (about 13 units a digit).
    pad_left, pad_bottom, pad_top = max(36, 14 + 13 * len(str(top))), 30, 10
    plot_w, plot_h = width - pad_left - 4, height - pad_bottom - pad_top
    slot = plot_w / n
    bar = max(1.0, slot / 2 - 1)
    parts = [
        f'<svg class="gms-chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>',
        f'<text x="{pad_left - 4}" y="{pad_top}" text-anchor="end" dominant-baseline="hanging" '
        f'class="gms-axis">{top}</text>',
        f'<text x="{pad_left - 4}" y="{pad_top + plot_h}" text-anchor="end" '
        'class="gms-axis">0</text>',
        f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{width - 4}" y2="{pad_top + plot_h}" '
        'class="gms-base"/>',
    ]
    step = max(1, n // 12)  # labels on a wide screen
    major = step * max(1, round(n / 6 / step))  # the ones kept on a narrow screen
    for i, (label, messages, recipients) in enumerate(series):
        x = pad_left + i * slot
        for j, (value, css) in enumerate(((messages, "gms-m"), (recipients, "gms-r"))):
            h = plot_h * value / top
            parts.append(
                f'<rect class="{css}" x="{x + j * bar:.1f}" y="{pad_top + plot_h - h:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}"><title>{escape(label)}: {value} '
                f"{escape(names[j])}</title></rect>"
            )
        if i % step == 0:
            css = "gms-axis" if i % major == 0 else "gms-axis gms-axis-minor"
            parts.append(
                f'<text x="{x + slot / 2:.1f}" y="{pad_top + plot_h + 6}" text-anchor="middle" '
                f'dominant-baseline="hanging" class="{css}">{escape(label)}</text>'
            )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308  (every value above is a number or escaped)


# --- message preview -----------------------------------------------------------------------------

PREVIEW_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:"


def stored_message(row: OutboundEmail) -> bytes:
    """The row's message as it is sent: its stored bytes, or its draft as the worker builds it
    (the same but for the boundaries between the parts of a multipart message), built once
    per row object. Empty when its body was dropped; InvalidMessage for a draft that does not
    build."""
    built = getattr(row, "_gms_built", None)
    if built is None:
        built = bytes(row.mime or b"")
        if not built and row.draft is not None:
            built = build_draft(row.draft)
        row._gms_built = built  # type: ignore[attr-defined]
    return built


def message_preview(row: OutboundEmail) -> SafeString:
    """Headers, text, HTML (in a sandboxed frame: no scripts, no remote loads) and attachments."""
    try:
        raw = stored_message(row)
    except InvalidMessage as exc:
        return format_html("<p>The stored message cannot be built: {}</p>", exc)
    if not raw:
        return format_html(
            "<p>The message body was dropped after the retention period ({}).</p>",
            row.body_dropped_at or "purged",
        )
    message = email.message_from_bytes(raw, policy=email.policy.default)
    headers = format_html_join(
        "",
        "<tr><th>{}</th><td>{}</td></tr>",
        ((name, str(message[name])) for name in _HEADERS if message[name] is not None),
    )
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    attachments = [
        (
            part.get_filename() or "(no name)",
            part.get_content_type(),
            len(part.get_payload(decode=True) or b""),
            "inline" if part.get_content_disposition() == "inline" else "attachment",
        )
        for part in message.walk()
        if part.get_filename() or part.get_content_disposition() in ("attachment", "inline")
        if part is not text and part is not html
    ]
    blocks = [format_html('<table class="gms-headers">{}</table>', headers)]
    if html is not None:
        document = (
            f'<meta http-equiv="Content-Security-Policy" content="{PREVIEW_CSP}">' + _content(html)
        )
        blocks.append(
            format_html(
                "<p><strong>HTML</strong> (shown sandboxed: no scripts, no remote images)</p>"
                '<iframe class="gms-preview" sandbox="" referrerpolicy="no-referrer" '
                'srcdoc="{}"></iframe>',
                document,
            )
        )
    if text is not None:
        blocks.append(
            format_html(
                '<p><strong>Text</strong></p><pre class="gms-text">{}</pre>', _content(text)
            )
        )
    if attachments:
        rows = format_html_join(
            "",
            "<li>{} <span>({}, {} bytes, {})</span></li>",
            attachments,
        )
        blocks.append(format_html("<p><strong>Attachments</strong></p><ul>{}</ul>", rows))
    return mark_safe("".join(blocks))  # noqa: S308  (each block is built with format_html)


_HEADERS = ("From", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID")


def _content(part: Any) -> str:
    try:
        return str(part.get_content())
    except (LookupError, UnicodeDecodeError, AttributeError):
        payload = part.get_payload(decode=True) or b""
        return payload.decode("utf-8", "replace")
