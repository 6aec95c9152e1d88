"""Lists (subscriber counts, Import CSV), subscribers, and the suppression list.

Permissions: the models' own view/add/change/delete, and ``import_subscribers`` for the CSV
import (:func:`.views.import_subscribers`).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from ...admin.widgets import moment
from ...conf import format_time
from ...models import normalize_address
from ..models import MailingList, Subscriber, Suppression
from . import views
from .base import APP, NewsletterModelAdmin

STATUSES = Subscriber.Status


def who_and_when(request: HttpRequest) -> str:
    """ "by alice on 2026-01-31 10:00 UTC": the part of a consent record saying who and when."""
    user = request.user
    name = user.get_username() if user.is_authenticated else "anonymous"
    return f"by {name} on {format_time(timezone.now())}"


class MailingListForm(forms.ModelForm):
    """A list's form: its From must be an address (its confirmation mail is sent from it)."""

    class Meta:
        model = MailingList
        fields = ("name", "slug", "description", "from_email", "double_opt_in")

    def clean_from_email(self) -> str:
        from .campaigns import clean_address

        return clean_address(self.cleaned_data["from_email"])


class MailingListAdmin(NewsletterModelAdmin):
    """Lists, with how many subscribers each has in each status and an Import CSV page."""

    form = MailingListForm

    list_display = (
        "name",
        "slug",
        "active_count",
        "pending_count",
        "unsubscribed_count",
        "bounced_count",
        "subscribers_link",
    )
    list_filter = ("double_opt_in",)
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}
    readonly_fields = ("counts", "created_at")
    fields = ("name", "slug", "description", "from_email", "double_opt_in", "counts", "created_at")
    change_form_template = "admin/gmail_smtp_newsletters/mailinglist/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        counts = {
            f"gms_{status.value}": Count("subscribers", filter=Q(subscribers__status=status))
            for status in STATUSES
        }
        return super().get_queryset(request).annotate(**counts)

    def _count(self, obj: MailingList, status: Subscriber.Status) -> int:
        count = getattr(obj, f"gms_{status.value}", None)
        return obj.subscribers.filter(status=status).count() if count is None else count

    @admin.display(description="subscribed", ordering="gms_active")
    def active_count(self, obj: MailingList) -> int:
        return self._count(obj, STATUSES.ACTIVE)

    @admin.display(description="awaiting confirmation", ordering="gms_pending")
    def pending_count(self, obj: MailingList) -> int:
        return self._count(obj, STATUSES.PENDING)

    @admin.display(description="unsubscribed", ordering="gms_unsubscribed")
    def unsubscribed_count(self, obj: MailingList) -> int:
        return self._count(obj, STATUSES.UNSUBSCRIBED)

    @admin.display(description="bounced", ordering="gms_bounced")
    def bounced_count(self, obj: MailingList) -> int:
        return self._count(obj, STATUSES.BOUNCED)

    @admin.display(description="subscribers")
    def subscribers_link(self, obj: MailingList) -> str:
        return format_html('<a href="{}">Subscribers</a>', subscribers_url(obj))

    @admin.display(description="subscribers")
    def counts(self, obj: MailingList) -> str:
        if not obj.pk:
            return "-"
        parts = [f"{self._count(obj, status)} {status.label}" for status in STATUSES]
        link = subscribers_url(obj)
        return format_html('{} &middot; <a href="{}">see them</a>', ", ".join(parts), link)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra = dict(extra_context or {})
        extra["gms_can_import"] = request.user.has_perm(f"{APP}.import_subscribers")
        return super().change_view(request, object_id, form_url, extra)

    def get_urls(self):
        return [
            path(
                "<path:object_id>/import/",
                self.bind(views.import_subscribers),
                name=f"{APP}_mailinglist_import",
            ),
            *super().get_urls(),
        ]


def subscribers_url(mailing_list: MailingList) -> str:
    """The subscriber changelist filtered to this list."""
    url = reverse(f"admin:{APP}_subscriber_changelist")
    return f"{url}?mailing_list__id__exact={mailing_list.pk}"


class AddressForm(forms.ModelForm):
    """Addresses are stored lower-case and trimmed: the uniqueness check sees them so."""

    def clean_email(self) -> str:
        return normalize_address(self.cleaned_data["email"])


class SubscriberAdmin(NewsletterModelAdmin):
    """Subscribers; the consent record is read-only (set when they subscribed or were added).
    The changelist keeps to columns that fit 1280 px beside the admin's sidebar; when and
    where consent was given are on each subscriber's page."""

    form = AddressForm
    list_display = ("email", "name", "mailing_list", "status")  # consent: a filter and the page
    list_filter = ("status", "mailing_list", "consent_method")
    list_select_related = ("mailing_list",)
    search_fields = ("email", "name")
    list_per_page = 100
    readonly_fields = (
        "consent_at",
        "consent_method",
        "consent_source",
        "confirmed_at",
        "unsubscribed_at",
        "created_at",
        "updated_at",
    )
    fieldsets = (
        (None, {"fields": ("mailing_list", "email", "name", "status", "fields")}),
        ("Consent", {"fields": readonly_fields}),
    )

    def save_model(self, request: HttpRequest, obj: Subscriber, form, change: bool) -> None:
        now = timezone.now()
        if not change:
            obj.consent_method = Subscriber.Consent.ADMIN
            obj.consent_source = f"added in the admin {who_and_when(request)}"[:500]
        if obj.status == STATUSES.ACTIVE and obj.consent_at is None:
            obj.consent_at = now
        if "status" in form.changed_data and obj.status == STATUSES.UNSUBSCRIBED:
            obj.unsubscribed_at = now
        super().save_model(request, obj, form, change)


class SuppressionAdmin(NewsletterModelAdmin):
    """Addresses that get no campaign mail. Added by hand with reason "added by hand";
    removing one lets campaign mail reach the address again."""

    form = AddressForm
    list_display = ("email", "scope", "reason", "campaign", "added")
    list_filter = ("reason", "mailing_list")
    list_select_related = ("mailing_list", "campaign")
    search_fields = ("email", "detail")
    list_per_page = 100
    fields = ("email", "mailing_list", "reason", "detail", "campaign", "created_at")

    @admin.display(description="from", ordering="mailing_list")
    def scope(self, obj: Suppression) -> str:
        return str(obj.mailing_list) if obj.mailing_list_id else "every list"

    @admin.display(description="added", ordering="created_at")
    def added(self, obj: Suppression) -> str:
        return moment(obj.created_at)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None):
        if obj is None:
            return ("reason", "campaign", "created_at")
        # A suppression is a record: its address, list and reason stay as they were made.
        return ("email", "mailing_list", "reason", "campaign", "created_at")

    def save_model(self, request: HttpRequest, obj: Suppression, form, change: bool) -> None:
        if not change:
            obj.reason = Suppression.Reason.MANUAL
            obj.detail = obj.detail or f"Added in the admin {who_and_when(request)}."
        super().save_model(request, obj, form, change)
