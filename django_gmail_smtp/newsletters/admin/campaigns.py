"""Campaigns (form, progress, buttons) and their recipients' statuses.

Permissions: the models' own view/add/change/delete; ``send_campaign`` (start, pause, resume,
cancel, retry failed) and ``test_send_campaign`` (Send test). A draft is edited like any
object; once started, a campaign's content is read-only (its mail is being rendered from it).
"""

from __future__ import annotations

from email.utils import parseaddr
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import path, reverse
from django.utils.html import format_html

from ...admin.widgets import moment
from ...conf import get_setting
from ..models import Campaign, CampaignRecipient
from . import views
from .base import APP, NewsletterModelAdmin
from .widgets import render_progress

#: the content a started campaign renders its mail from: read-only once it is no draft
CONTENT_FIELDS = (
    "mailing_list",
    "audience",
    "from_email",
    "reply_to",
    "subject",
    "text_template",
    "html_template",
    "mailer",
)
#: a template part as render.TemplateProblem names it -> the form field
TEMPLATE_FIELDS = {"subject": "subject", "text": "text_template", "HTML": "html_template"}


def audience_names() -> list[str]:
    """The names of ``GMAIL_SMTP["NEWSLETTER_AUDIENCES"]``."""
    return sorted(get_setting("NEWSLETTER_AUDIENCES") or {})


def clean_address(value: str) -> str:
    """A From or Reply-To as typed (``News <news@example.com>``), or a ValidationError. A line
    break is refused too: it would pass ``parseaddr`` and fail every message of the campaign."""
    value = value.strip()
    if value:
        try:
            if "\r" in value or "\n" in value:
                raise ValidationError("line break")
            validate_email(parseaddr(value)[1])
        except ValidationError:
            raise ValidationError(
                f"{value!r} is not an address such as 'News <news@example.com>'."
            ) from None
    return value


class CampaignForm(forms.ModelForm):
    """A campaign goes to exactly one audience: a list, or a registered audience's queryset."""

    audience = forms.ChoiceField(
        required=False,
        help_text=Campaign._meta.get_field("audience").help_text,
    )

    class Meta:
        model = Campaign
        fields = [
            "name",
            *CONTENT_FIELDS,
            "archive",
            "seed_emails",
            "max_per_day",
            "window_start",
            "window_end",
            "domain_aligned",
        ]
        widgets = {
            "subject": forms.TextInput(attrs={"class": "vLargeTextField"}),
            "text_template": forms.Textarea(attrs={"rows": 14, "class": "vLargeTextField"}),
            "html_template": forms.Textarea(attrs={"rows": 14, "class": "vLargeTextField"}),
            "seed_emails": forms.Textarea(attrs={"rows": 3}),
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "audience" in self.fields:
            names = audience_names()
            current = self.instance.audience
            if current and current not in names:
                names.append(current)  # shown, then refused by clean(): no longer registered
            field = self.fields["audience"]
            assert isinstance(field, forms.ChoiceField)
            field.choices = [("", "---------"), *((n, n) for n in names)]

    def clean_seed_emails(self) -> str:
        lines = [line.strip() for line in self.cleaned_data["seed_emails"].splitlines()]
        for number, line in enumerate(lines, start=1):
            if line:
                try:
                    validate_email(line)
                except ValidationError:
                    raise ValidationError(
                        f"Line {number} ({line}) is not an email address; give one per line."
                    ) from None
        return "\n".join(line for line in lines if line)

    def clean_from_email(self) -> str:
        return self._address("from_email")

    def clean_reply_to(self) -> str:
        return self._address("reply_to")

    def _address(self, name: str) -> str:
        return clean_address(self.cleaned_data[name])

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or self.cleaned_data
        if "mailing_list" in self.fields and "audience" in self.fields:
            mailing_list, audience = cleaned.get("mailing_list"), cleaned.get("audience")
            if mailing_list and audience:
                raise ValidationError("Choose a list or an audience, not both.")
            if not mailing_list and not audience and "mailing_list" not in self.errors:
                raise ValidationError("Choose a list or an audience to send the campaign to.")
            if audience and audience not in audience_names():
                self.add_error(
                    "audience",
                    f'The audience {audience!r} is not in GMAIL_SMTP["NEWSLETTER_AUDIENCES"] '
                    "(any more); choose another, or register it there.",
                )
        if bool(cleaned.get("window_start")) != bool(cleaned.get("window_end")):
            raise ValidationError("Give both ends of the daily send window, or neither.")
        self._check_templates(cleaned)
        return cleaned

    def _check_templates(self, cleaned: dict[str, Any]) -> None:
        """Templates that do not compile are refused here, not when the planner renders."""
        from ..render import Renderer, TemplateProblem

        if not all(name in self.fields for name in TEMPLATE_FIELDS.values()):
            return  # read-only content: already checked when it was a draft
        draft = Campaign(
            subject=cleaned.get("subject") or "",
            text_template=cleaned.get("text_template") or "",
            html_template=cleaned.get("html_template") or "",
        )
        try:
            Renderer(draft)
        except TemplateProblem as problem:
            self.add_error(TEMPLATE_FIELDS.get(problem.part), str(problem))


class CampaignAdmin(NewsletterModelAdmin):
    """Campaigns: write a draft, preview, test send, start; then watch, pause, resume."""

    form = CampaignForm
    list_display = (
        "name",
        "status_badge",
        "audience_text",
        "progress_column",
        "bounced_column",
        "started",
    )
    list_filter = ("status", "mailing_list")
    search_fields = ("name", "subject")
    list_per_page = 50
    change_form_template = "admin/gmail_smtp_newsletters/campaign/change_form.html"
    fieldsets = (
        (None, {"fields": ("name", "state", "progress_panel")}),
        ("Audience", {"fields": ("mailing_list", "audience")}),
        (
            "Content",
            {
                "fields": (
                    "from_email",
                    "reply_to",
                    "subject",
                    "text_template",
                    "html_template",
                    "archive",
                )
            },
        ),
        ("Testing", {"fields": ("seed_emails",)}),
        (
            "Pace",
            {
                "fields": (
                    "max_per_day",
                    ("window_start", "window_end"),
                    "domain_aligned",
                    "mailer",
                )
            },
        ),
        ("History", {"fields": ("started_at", "finished_at", "created_at", "updated_at")}),
    )
    always_readonly = (
        "state",
        "progress_panel",
        "started_at",
        "finished_at",
        "created_at",
        "updated_at",
    )

    # --- columns and panels ------------------------------------------------------------------
    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Campaign) -> str:
        return format_html(
            '<span class="gms-badge gms-nl-status-{}" title="{}">{}</span>',
            obj.status,
            obj.paused_reason,
            obj.get_status_display(),
        )

    @admin.display(description="to")
    def audience_text(self, obj: Campaign) -> str:
        if obj.mailing_list_id:
            return str(obj.mailing_list)
        return f"audience: {obj.audience}" if obj.audience else "-"

    def _progress(self, obj: Campaign) -> Any:
        """The campaign's progress, worked out once per row (two columns show it)."""
        progress = getattr(obj, "_gms_progress", None)
        if progress is None:
            progress = obj.progress()
            setattr(obj, "_gms_progress", progress)  # noqa: B010  (not a declared field)
        return progress

    @admin.display(description="progress")
    def progress_column(self, obj: Campaign) -> str:
        if obj.status == Campaign.Status.DRAFT:
            return "-"
        return render_progress(self._progress(obj), compact=True)

    @admin.display(description="bounced")
    def bounced_column(self, obj: Campaign) -> str:
        """Its recipients whose mail bounced (read back from the accounts' inboxes), and
        their share of what went out."""
        if obj.status == Campaign.Status.DRAFT:
            return "-"
        progress = self._progress(obj)
        if not progress.bounced:
            return "0"
        out = progress.sent + progress.bounced
        return f"{progress.bounced:,} ({100.0 * progress.bounced / out:.1f}%)"

    @admin.display(description="started", ordering="started_at")
    def started(self, obj: Campaign) -> str:
        return moment(obj.started_at, empty="not yet")

    @admin.display(description="status")
    def state(self, obj: Campaign) -> str:
        if not obj.pk:
            return "draft (new)"
        if obj.status == Campaign.Status.PAUSED:
            from ..campaigns import paused_text

            return format_html('<div class="gms-warning gms-nl-paused">{}</div>', paused_text(obj))
        return obj.get_status_display()

    @admin.display(description="progress")
    def progress_panel(self, obj: Campaign) -> str:
        if not obj.pk:
            return "Save the draft to see its estimate."
        if obj.status == Campaign.Status.DRAFT:
            from .. import campaigns

            try:
                estimate = campaigns.estimate(obj)
            except (ValueError, LookupError) as exc:
                return f"No estimate: {exc}"
            return format_html(
                "Not started. {} recipient(s); {}.", f"{estimate.total:,}", estimate.describe()
            )
        # A paused campaign's reason is its status, just above: said once.
        return render_progress(obj.progress(), show_waiting=obj.status != Campaign.Status.PAUSED)

    # --- the change page ---------------------------------------------------------------------
    def get_readonly_fields(self, request: HttpRequest, obj: Campaign | None = None):
        if obj is not None and obj.status != Campaign.Status.DRAFT:
            return (*self.always_readonly, *CONTENT_FIELDS)
        return self.always_readonly

    def get_fieldsets(self, request: HttpRequest, obj: Campaign | None = None):
        if obj is None:
            # Adding: no state, no history yet.
            first = (None, {"fields": ("name",)})
            return (first, *self.fieldsets[1:-1])
        return self.fieldsets

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra = dict(extra_context or {})
        user = request.user
        extra["gms_can_send"] = user.has_perm(f"{APP}.send_campaign")
        extra["gms_can_test"] = user.has_perm(f"{APP}.test_send_campaign")
        campaign = self.get_object(request, object_id)
        if campaign is not None and request.method == "GET":
            extra["gms_recipients_url"] = recipients_url(campaign)
            extra["gms_failed"] = campaign.recipients.filter(
                status=CampaignRecipient.Status.FAILED
            ).count()
            views.warn_about_domain(self, request, campaign)
        return super().change_view(request, object_id, form_url, extra)

    def get_urls(self):
        name = f"{APP}_campaign"
        return [
            path("<path:object_id>/preview/", self.bind(views.preview), name=f"{name}_preview"),
            path(
                "<path:object_id>/test-send/",
                self.bind(views.test_send),
                name=f"{name}_test_send",
            ),
            path("<path:object_id>/start/", self.bind(views.start), name=f"{name}_start"),
            path(
                "<path:object_id>/do/<str:operation>/",
                self.bind(views.operation),
                name=f"{name}_operation",
            ),
            *super().get_urls(),
        ]

    def message_operation(self, request: HttpRequest, text: str, ok: bool = True) -> None:
        self.message_user(request, text, messages.SUCCESS if ok else messages.ERROR)


def recipients_url(campaign: Campaign) -> str:
    """The recipients' statuses: their changelist filtered to this campaign."""
    url = reverse(f"admin:{APP}_campaignrecipient_changelist")
    return f"{url}?campaign__id__exact={campaign.pk}"


class CampaignRecipientAdmin(NewsletterModelAdmin):
    """Each recipient of a started campaign: its status, the account that sent it, its outbox
    row. A record, read-only: the campaign's buttons change it. The changelist keeps to
    columns that fit 1280 px beside the admin's sidebar; the account, the outbox row and when
    it was queued are on each recipient's page."""

    list_display = ("email", "campaign", "status_badge", "sent", "error_short")
    list_filter = ("status", "campaign")
    list_select_related = ("campaign",)
    search_fields = ("email",)
    list_per_page = 100
    fields = (
        "campaign",
        "email",
        "name",
        "fields",
        "status",
        "account_email",
        "queued_at",
        "sent_at",
        "outbox_link",
        "error",
    )
    readonly_fields = fields

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: CampaignRecipient) -> str:
        return format_html(
            '<span class="gms-badge gms-nl-rstatus-{}">{}</span>',
            obj.status,
            obj.get_status_display(),
        )

    @admin.display(description="sent", ordering="sent_at")
    def sent(self, obj: CampaignRecipient) -> str:
        return moment(obj.sent_at)

    @admin.display(description="outbox row")
    def outbox_link(self, obj: CampaignRecipient) -> str:
        if not obj.outbound_id:
            return "-"
        url = reverse("admin:django_gmail_smtp_outboundemail_change", args=[obj.outbound_id])
        return format_html('<a href="{}">#{}</a>', url, obj.outbound_id)

    @admin.display(description="error")
    def error_short(self, obj: CampaignRecipient) -> str:
        return (obj.error[:80] + "...") if len(obj.error) > 80 else obj.error

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).defer("fields")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
