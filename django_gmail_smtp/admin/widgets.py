"""Small pieces of admin HTML: the quota bar, moments, error texts, write-only inputs."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from django import forms
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from .. import quota
from ..conf import format_time
from ..stats import TIME_FORMAT, at_limit, room_text


class SecretTextarea(forms.Textarea):
    """A textarea that never renders a value, not even one just submitted."""

    def format_value(self, value: Any) -> None:
        return None


def moment(value: datetime | None, empty: str = "-") -> str:
    """A moment in the one format the admin uses for every date column and log line."""
    return empty if value is None else format_time(value, TIME_FORMAT)


def render_quota_bar(status: quota.QuotaStatus) -> SafeString:
    """A used/limit bar with the transactional share marked (plain HTML and CSS), and below
    it what can be sent now ("room for N now"; when the next slot frees only at the limit)."""
    limit = max(1, status.messages_limit)
    used = min(100.0, 100.0 * status.messages_used / limit)
    bulk = 100.0 * status.bulk_messages_limit / limit
    css = "gms-full" if at_limit(status) else ("gms-high" if used >= 80 else "")
    return format_html(
        '<div class="gms-quota" title="{used} of {limit} messages in the last 24 hours; '
        'the part right of the mark is kept for transactional mail">'
        '<div class="gms-quota-bar"><span class="gms-quota-used {css}" style="width:{pct}%">'
        '</span><span class="gms-quota-share" style="left:{bulk}%"></span></div>'
        '<span class="gms-quota-text">{used} / {limit}</span></div>'
        '<div class="gms-quota-room{full}">{room}</div>',
        used=status.messages_used,
        limit=status.messages_limit,
        css=css,
        pct=f"{used:.1f}",
        bulk=f"{bulk:.1f}",
        full=" gms-quota-room-full" if at_limit(status) else "",
        room=room_text(status),
    )


# Gmail ends its replies with "<id> - gsmtp" and no full stop; text stored before the
# exception texts separated it from the advice that follows runs on ("- gsmtp The App ...").
_RUN_ON_ADVICE = re.compile(r"(- gsmtp)\s+(?=\S)")


def readable_error(text: str) -> SafeString:
    """An error text with Gmail's reply set apart from the advice after it (on its own line)."""
    parts = _RUN_ON_ADVICE.split(text or "")
    # split() keeps the captured "- gsmtp": glue it back to the text before it.
    lines, pending = [], ""
    for part in parts:
        if part == "- gsmtp":
            lines.append(pending + part)
            pending = ""
        else:
            pending += part
    lines.append(pending)
    return format_html_join(mark_safe("<br>"), "{}", ((line,) for line in lines if line))
