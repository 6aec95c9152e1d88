"""The bounces admin: a read-only record of the non-delivery reports read back from each
account's inbox (``manage.py gmail_smtp bounces``, ``tasks.read_bounces``).

Viewing needs ``view_bounce``; nobody adds, changes or deletes a bounce here.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from ..models import Bounce
from .lookups import OfferedLookupsOnly
from .widgets import moment


class BounceAdmin(OfferedLookupsOnly, admin.ModelAdmin):
    class Media:
        css = {"all": ["django_gmail_smtp/admin.css"]}

    list_display = ("read_at", "recipient", "kind_badge", "code", "diagnostic_short", "account")
    list_filter = ("kind", "account", "created_at")
    date_hierarchy = "created_at"
    search_fields = ("recipient", "original_message_id", "code")
    list_select_related = ("account",)
    list_per_page = 100
    fields = (
        "recipient",
        "kind",
        "code",
        "diagnostic",
        "account",
        "outbox_row",
        "original_message_id",
        "reported_at",
        "created_at",
        "report",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).defer("report")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # a record of what the reports said

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    @admin.display(description="read", ordering="created_at")
    def read_at(self, obj: Bounce) -> str:
        return moment(obj.created_at)

    @admin.display(description="kind", ordering="kind")
    def kind_badge(self, obj: Bounce) -> str:
        css = "gms-bad" if obj.kind == Bounce.Kind.HARD else "gms-quota"
        return format_html('<span class="gms-badge {}">{}</span>', css, obj.get_kind_display())

    @admin.display(description="diagnostic")
    def diagnostic_short(self, obj: Bounce) -> str:
        text = " ".join(obj.diagnostic.split())
        return text[:100] + ("..." if len(text) > 100 else "")

    @admin.display(description="outbox row")
    def outbox_row(self, obj: Bounce) -> str:
        if obj.outbound_id is None:
            return "-"
        url = reverse("admin:django_gmail_smtp_outboundemail_change", args=[obj.outbound_id])
        return format_html('<a href="{}">#{}</a>', url, obj.outbound_id)
