"""The campaign progress bar (plain HTML and CSS) and the texts around it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.timesince import timeuntil

from ...admin.widgets import moment

#: bar segments, left to right: (Progress attribute, CSS class, label)
SEGMENTS = (
    ("sent", "gms-nl-sent", "sent"),
    ("queued", "gms-nl-queued", "in the outbox"),
    ("failed", "gms-nl-failed", "failed"),
    ("bounced", "gms-nl-failed", "bounced"),
    ("suppressed", "gms-nl-skipped", "suppressed"),
    ("cancelled", "gms-nl-skipped", "cancelled"),
)


def eta_text(eta: datetime | None, finished: bool = False) -> str:
    """ "2026-02-03 14:00 UTC (in 2 days, 4 hours)", or why there is none."""
    if finished:
        return "finished"
    if eta is None:
        return "not known yet"
    if eta <= timezone.now():
        return f"{moment(eta)} (any moment now)"
    return f"{moment(eta)} (in {timeuntil(eta)})"


def _count(progress: Any, name: str) -> int:
    return int(getattr(progress, name, 0) or 0)


def _bar(progress: Any) -> SafeString:
    total = max(1, _count(progress, "total"))
    parts = []
    for name, css, label in SEGMENTS:
        count = _count(progress, name)
        if count:
            parts.append((css, f"{100.0 * count / total:.2f}", f"{count:,} {label}"))
    return format_html(
        '<div class="gms-nl-bar" role="img" aria-label="{}">{}</div>',
        summary(progress),
        format_html_join("", '<span class="{}" style="width:{}%" title="{}"></span>', parts),
    )


def summary(progress: Any) -> str:
    """ "450 of 1,000 sent (45%), 3 failed, 2 suppressed, 545 waiting"."""
    text = (
        f"{_count(progress, 'sent'):,} of {_count(progress, 'total'):,} sent "
        f"({float(getattr(progress, 'percent', 0) or 0):.0f}%)"
    )
    others = [
        f"{_count(progress, name):,} {label}"
        for name, label in (
            ("queued", "in the outbox"),
            ("failed", "failed"),
            ("bounced", "bounced"),
            ("suppressed", "suppressed"),
            ("cancelled", "cancelled"),
            ("pending", "waiting"),
        )
        if _count(progress, name)
    ]
    return ", ".join([text, *others])


def render_progress(
    progress: Any, *, compact: bool = False, show_waiting: bool = True
) -> SafeString:
    """A campaign's progress: the bar, its counts, the ETA, the pace, why it waits, and (not
    compact) the per-account split. Each thing is said once: a finished campaign has no pace,
    and ``show_waiting=False`` leaves the reason out where the page says it already (a paused
    campaign's status)."""
    if compact:
        return format_html(
            '<div class="gms-nl-progress gms-nl-compact" title="{}">{}'
            '<span class="gms-nl-figure">{} / {}</span></div>',
            summary(progress),
            _bar(progress),
            f"{_count(progress, 'sent'):,}",
            f"{_count(progress, 'total'):,}",
        )
    finished = bool(getattr(progress, "finished", False))
    rows = [
        ("Progress", summary(progress)),
        ("Estimated end", eta_text(progress.eta, finished)),
    ]
    pace = "" if finished else describe(progress)
    if pace:
        rows.append(("Pace", pace))
    waiting = getattr(progress, "waiting_reason", "") or ""
    if waiting and show_waiting and not finished:
        rows.append(("Waiting", waiting))
    facts = format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows)
    accounts = list(getattr(progress, "accounts", None) or ())
    split = (
        format_html(
            '<table class="gms-nl-accounts"><thead><tr><th>Account</th><th>Sent</th>'
            "<th>In the outbox</th><th>Bounced</th><th>Can send per day</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                (
                    (
                        a.email,
                        f"{a.sent:,}",
                        f"{a.queued:,}",
                        f"{getattr(a, 'bounced', 0):,}",
                        f"{getattr(a, 'capacity_per_day', 0):,}",
                    )
                    for a in accounts
                ),
            ),
        )
        if accounts
        else ""
    )
    return format_html(
        '<div class="gms-nl-progress">{}<table class="gms-nl-facts">{}</table>{}</div>',
        _bar(progress),
        facts,
        split,
    )


def describe(progress: Any) -> str:
    """The engine's own sentence about the pace ("about 3 days 4 hours at 450/day across 1
    account"), without why it waits (a row of its own); "" when there is no pace to tell."""
    text = progress.describe(with_reason=False) if hasattr(progress, "describe") else ""
    return str(text or "")
