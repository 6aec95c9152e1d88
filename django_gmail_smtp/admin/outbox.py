"""The outbox admin: a read-only record of every queued message, its attempts and Gmail's replies.

Permissions: ``retry_outboundemail`` (retry or cancel), ``view_body_outboundemail`` (read and
search message bodies).
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.db import connections
from django.db.models import Count, F, Func, QuerySet, TextField, Value
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce, Concat
from django.http import HttpRequest
from django.utils.html import format_html

from .. import outbox, stats
from ..conf import get_setting
from ..exceptions import InvalidMessage
from ..models import OutboundAttempt, OutboundEmail
from .lookups import OfferedLookupsOnly
from .widgets import moment, readable_error


class AttemptInline(admin.TabularInline):
    model = OutboundAttempt
    extra = 0
    can_delete = False
    fields = ("at_time", "account_email", "outcome", "code", "phase", "reply", "worker")
    readonly_fields = fields
    verbose_name_plural = "attempts (Gmail's replies)"

    @admin.display(description="at")
    def at_time(self, obj: OutboundAttempt) -> str:
        return moment(obj.at)

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class WaitingTooLong(admin.SimpleListFilter):
    """Rows that should have been sent by now (see :func:`stats.waiting_too_long`)."""

    title = "waiting"
    parameter_name = "waiting"
    TOO_LONG = "too-long"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin):
        return [(self.TOO_LONG, "Waiting too long")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == self.TOO_LONG:
            return queryset.filter(stats.waiting_too_long())
        return queryset


def _message_text(queryset: QuerySet) -> Func:
    """The stored message (headers and body, or the parts of one stored unbuilt) as text the
    database can search."""
    # A draft's texts as the database reads them out of the JSON (SQLite keeps non-ASCII and
    # quotes escaped in the JSON text itself), then the rest of it (headers, addresses).
    parts: list[Func] = [KT("draft__subject"), KT("draft__body"), KT("draft__alternatives__0__0")]
    parts.append(Cast("draft", TextField()))
    draft = Concat(
        *(Coalesce(p, Value(""), output_field=TextField()) for p in parts),
        output_field=TextField(),
    )
    mime: Func
    if connections[queryset.db].vendor == "postgresql":
        # bytea::text is hex; encode(..., 'escape') keeps ASCII and never fails on bad UTF-8.
        mime = Func(F("mime"), Value("escape"), function="encode", output_field=TextField())
    else:
        mime = Cast("mime", TextField())
    mime_text = Coalesce(mime, Value(""), output_field=TextField())
    return Concat(mime_text, draft, output_field=TextField())


class OutboundEmailAdmin(OfferedLookupsOnly, admin.ModelAdmin):
    class Media:
        css = {"all": ["django_gmail_smtp/admin.css"]}

    list_display = (
        "subject_short",
        "recipients_short",
        "account_email",
        "status_badge",
        "attempt_count",
        "queued_at",
        "when",
    )
    list_display_links = ("subject_short",)
    list_filter = ("status", WaitingTooLong, "priority", "account", "reason", "created_at")
    date_hierarchy = "created_at"
    # Shown to every viewer anyway; the message itself is searched only with view_body.
    search_fields = ("subject", "message_id", "recipients", "account_email")
    message_search_field = "gms_message_text"
    inlines = [AttemptInline]
    actions = ["retry_now", "cancel"]
    list_per_page = 50
    change_list_template = "admin/django_gmail_smtp/outboundemail/change_list.html"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "status",
                    "reason",
                    "error_text",
                    "priority",
                    "account_email",
                    "from_email",
                    "recipient_list",
                    "subject",
                    "message_id",
                    "size_text",
                    "from_rewritten",
                )
            },
        ),
        (
            "Delivery",
            {
                "fields": (
                    "attempt_summary",
                    "next_attempt_at",
                    "sent_at",
                    "bounce_list",  # reports read back from the account's inbox
                    "gmail_reply",
                    "refused_list",
                    "retry_of",  # recipients Gmail refused temporarily are retried in a new row
                    "created_at",
                    "updated_at",
                )
            },
        ),
        ("Message", {"fields": ("preview",)}),
    )
    # Everything is read-only: the outbox is a record.
    readonly_fields = (*flatten_fieldsets(fieldsets), "preview_hidden")

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # The attempt log's length: what "attempts" means next to the log.
        return (
            super().get_queryset(request).defer("mime", "draft").annotate(gms_attempts=Count("log"))
        )

    def can_read_bodies(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_gmail_smtp.view_body_outboundemail")

    def get_search_fields(self, request: HttpRequest):
        if self.can_read_bodies(request):
            return (*self.search_fields, self.message_search_field)
        return self.search_fields

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        if search_term and self.message_search_field in self.get_search_fields(request):
            queryset = queryset.annotate(**{self.message_search_field: _message_text(queryset)})
        return super().get_search_results(request, queryset, search_term)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # `manage.py gmail_smtp purge` removes old mail

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # read-only; retry and cancel are actions

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_gmail_smtp.retry_outboundemail")

    # --- the list ----------------------------------------------------------------------------
    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        extra = {"gms_waiting": self.waiting_banner(request)}
        return super().changelist_view(request, {**extra, **(extra_context or {})})

    def waiting_banner(self, request: HttpRequest) -> dict | None:
        """What the warning above the list says when mail waits longer than it should."""
        count = OutboundEmail.objects.filter(stats.waiting_too_long()).count()
        if not count:
            return None
        minutes = max(1, round(stats.overdue_after().total_seconds() / 60))
        queues = sorted({str(q) for q in (get_setting("QUEUES") or {}).values()})
        return {
            "count": count,
            "minutes": minutes,
            "queues": ", ".join(queues),
            "queue_count": len(queues),
            "filter": f"?{WaitingTooLong.parameter_name}={WaitingTooLong.TOO_LONG}",
        }

    @admin.display(description="subject", ordering="subject")
    def subject_short(self, obj: OutboundEmail) -> str:
        return obj.subject[:70] or "(no subject)"

    @admin.display(description="to")
    def recipients_short(self, obj: OutboundEmail) -> str:
        first = ", ".join(obj.recipients[:2])
        more = len(obj.recipients) - 2
        return f"{first} +{more}" if more > 0 else first

    @admin.display(description="attempts", ordering="gms_attempts")
    def attempt_count(self, obj: OutboundEmail) -> int:
        count = getattr(obj, "gms_attempts", None)
        return obj.log.count() if count is None else count

    @admin.display(description="attempts")
    def attempt_summary(self, obj: OutboundEmail) -> str:
        count = self.attempt_count(obj)
        text = f"{count} (see the log below)" if count else "none yet"
        if obj.attempts and obj.attempts != count:
            text += (
                f"; {obj.attempts} temporary failure(s) since the last retry count toward "
                "MAX_ATTEMPTS"
            )
        return text

    @admin.display(description="queued at", ordering="created_at")
    def queued_at(self, obj: OutboundEmail) -> str:
        return moment(obj.created_at)

    @admin.display(description="sent / next try")
    def when(self, obj: OutboundEmail) -> str:
        return moment(obj.sent_at or obj.next_attempt_at)

    @admin.display(description="recipients")
    def recipient_list(self, obj: OutboundEmail) -> str:
        return ", ".join(obj.recipients)

    @admin.display(description="refused recipients")
    def refused_list(self, obj: OutboundEmail) -> str:
        if not obj.refused_recipients:
            return "none"
        return "; ".join(
            f"{addr}: {code} {text}" for addr, (code, text) in obj.refused_recipients.items()
        )

    @admin.display(description="size")
    def size_text(self, obj: OutboundEmail) -> str:
        if obj.draft is not None and not obj.mime:
            try:
                size = len(stats.stored_message(obj))  # built once for this and the preview
            except InvalidMessage:
                return "- (the stored message cannot be built)"
            return f"{size:,} bytes (stored unbuilt: the worker builds it when it sends it)"
        if obj.body_dropped_at:
            return f"{obj.size:,} bytes (the message was dropped after the retention period)"
        return f"{obj.size:,} bytes"

    @admin.display(description="last error")
    def error_text(self, obj: OutboundEmail) -> str:
        return readable_error(obj.last_error) if obj.last_error else "-"

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: OutboundEmail) -> str:
        return format_html(
            '<span class="gms-badge gms-status-{}" title="{}">{}</span>',
            obj.status,
            obj.last_error,
            obj.get_status_display()
            + (f" ({obj.get_reason_display()})" if obj.reason else "")
            + (", bounced" if obj.bounced_at else ""),
        )

    @admin.display(description="bounces")
    def bounce_list(self, obj: OutboundEmail) -> str:
        bounces = list(obj.bounces.all())
        if not bounces:
            return "none"
        return "; ".join(
            f"{b.recipient}: {b.get_kind_display()} {b.code} {b.diagnostic}".strip()
            for b in bounces
        )

    # --- one message -------------------------------------------------------------------------
    @admin.display(description="preview")
    def preview(self, obj: OutboundEmail) -> str:
        return stats.message_preview(obj)

    @admin.display(description="preview")
    def preview_hidden(self, obj: OutboundEmail) -> str:
        return (
            "Hidden: message bodies hold things like password-reset links; reading them needs "
            "the permission 'Can read outbound message bodies'."
        )

    def get_fieldsets(self, request: HttpRequest, obj=None):
        if self.can_read_bodies(request):
            return self.fieldsets
        return (*self.fieldsets[:-1], ("Message", {"fields": ("preview_hidden",)}))

    # --- actions -----------------------------------------------------------------------------
    @admin.action(description="Retry now", permissions=["retry"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = outbox.retry(queryset)
        text = f"{count} message(s) handed to Celery again."
        skipped = outbox.body_dropped(queryset.exclude(status=OutboundEmail.Status.SENT))
        if skipped:
            text += (
                f" {skipped} message(s) could not be retried: their stored message was dropped "
                "after BODY_RETENTION_DAYS."
            )
        self.message_user(request, text, messages.WARNING if skipped else messages.SUCCESS)

    @admin.action(description="Cancel (not sent yet)", permissions=["retry"])
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = outbox.cancel(queryset)
        self.message_user(request, f"{count} message(s) cancelled; sent mail is left as it is.")
