"""The sender accounts' admin: health, quota, write-only credentials, operations.

Every operation (verify, send a test, refresh, pause, resume, connect) is a call into
:mod:`django_gmail_smtp.services`; this module reads the form and shows the result.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from functools import update_wrapper
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Field, Q, QuerySet
from django.http import HttpRequest
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from .. import quota, services
from ..models import GmailAccount
from . import views
from .lookups import OfferedLookupsOnly
from .widgets import SecretTextarea, moment, render_quota_bar

if TYPE_CHECKING:
    from django_stubs_ext import FieldOpts, FieldsetSpec, StrOrPromise

SECRET_FIELDS = ("app_password", "client_secret", "refresh_token", "service_account_key")
CREDENTIAL_FIELDS = (*SECRET_FIELDS, "auth_method", "client_id", "email")
STORED, NOT_SET = "Stored (encrypted)", "Not set"
#: The attribute a row object caches its quota status in (see :func:`_status`).
_QUOTA_STATUS_ATTR = "_gms_quota_status"


def _model_field(name: str) -> Field[Any, Any]:
    """The concrete model field ``name`` of GmailAccount (never a reverse relation)."""
    model_field = GmailAccount._meta.get_field(name)
    if not isinstance(model_field, Field):
        raise TypeError(f"GmailAccount.{name} is not a concrete field")
    return model_field


def _secret_state(name: str) -> Callable[[Any, GmailAccount], str]:
    """A read-only column for a secret: whether one is stored, never its value."""
    model_field = _model_field(name)

    @admin.display(description=model_field.verbose_name)
    def state(self: Any, obj: GmailAccount) -> str:
        return STORED if obj.has_secret(name) else NOT_SET

    state.__name__ = f"{name}_state"
    return state


class GmailAccountForm(forms.ModelForm):
    """Secrets are write-only: empty keeps the stored value, "clear" removes it."""

    app_password = forms.CharField(
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )
    client_secret = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )
    refresh_token = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="Set by Connect with Google; paste one only if you obtained it elsewhere.",
    )
    service_account_key = forms.CharField(
        required=False,
        widget=SecretTextarea(attrs={"rows": 4, "autocomplete": "off"}),
        help_text="Paste the service account's JSON key file.",
    )
    clear_secrets = forms.MultipleChoiceField(
        required=False,
        label="Remove stored secrets",
        choices=[(f, f.replace("_", " ")) for f in SECRET_FIELDS],
        widget=forms.CheckboxSelectMultiple,
    )

    class Meta:
        model = GmailAccount
        fields = [
            "email",
            "auth_method",
            "app_password",
            "client_id",
            "client_secret",
            "refresh_token",
            "service_account_key",
            "clear_secrets",
            "send_as_aliases",
            "limits_preset",
            "daily_limit",
            "daily_recipient_limit",
            "per_message_recipient_limit",
            "is_default",
            "is_active",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in SECRET_FIELDS:
            self.initial[name] = ""  # never sent to the browser
            stored = self.instance.has_secret(name)
            state = f"{STORED}; leave empty to keep it." if stored else f"{NOT_SET}."
            field = self.fields[name]
            model_field = _model_field(name)
            field.label = model_field.verbose_name[:1].upper() + model_field.verbose_name[1:]
            field.help_text = f"{state} {field.help_text or model_field.help_text}".strip()

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        clear = set(cleaned.get("clear_secrets") or ())
        for name in SECRET_FIELDS:
            value = cleaned.get(name)
            if name in clear:
                cleaned[name] = ""
            elif not value:
                cleaned[name] = getattr(self.instance, name, "")  # keep what is stored
        return cleaned

    def _post_clean(self) -> None:
        # Apply the kept/cleared secrets to the instance before model validation.
        for name in SECRET_FIELDS:
            if name in self.cleaned_data:
                setattr(self.instance, name, self.cleaned_data[name])
        super()._post_clean()  # type: ignore[misc]  # private hook, not in django-stubs


def _bounce_window_start() -> datetime:
    """The start of the 30 days the accounts' bounce counts cover."""
    return timezone.now() - timedelta(days=30)


def _status(account: GmailAccount) -> quota.QuotaStatus:
    """The account's quota, computed once per row object (columns share it)."""
    status: quota.QuotaStatus | None = getattr(account, _QUOTA_STATUS_ATTR, None)
    if status is None:
        status = account.quota_status()
        setattr(account, _QUOTA_STATUS_ATTR, status)
    return status


class GmailAccountAdmin(OfferedLookupsOnly, admin.ModelAdmin):
    """Sender accounts. Permissions: ``view_gmailaccount`` (the pages), ``change_gmailaccount``
    (edit, verify, pause, refresh), ``connect_gmailaccount`` (Connect with Google),
    ``send_test_gmailaccount`` (test mail)."""

    form = GmailAccountForm
    list_display = (
        "email",
        "auth_method",
        "health_badge",
        "quota_bar",
        "last_send",
        "bounce_count",
        "active",
    )
    list_filter = ("auth_method", "health", "is_active", "limits_preset")
    search_fields = ("email", "send_as_aliases")
    actions = ["verify", "send_test", "refresh_token_action", "pause", "resume"]
    readonly_fields = (
        "health",
        "health_detail",
        "health_checked_at",
        "last_sent_at",
        "quota",
        "bounce_reading",
    )
    # Shown instead of a secret wherever it would be read-only (view-only users).
    secret_states = {name: f"{name}_state" for name in SECRET_FIELDS}
    app_password_state = _secret_state("app_password")
    client_secret_state = _secret_state("client_secret")
    refresh_token_state = _secret_state("refresh_token")
    service_account_key_state = _secret_state("service_account_key")
    change_form_template = "admin/django_gmail_smtp/gmailaccount/change_form.html"
    change_list_template = "admin/django_gmail_smtp/gmailaccount/change_list.html"
    fieldsets = (
        (None, {"fields": ("email", "auth_method", "is_default", "is_active")}),
        (
            "Credentials (write-only)",
            {
                "fields": (
                    "app_password",
                    "client_id",
                    "client_secret",
                    "refresh_token",
                    "service_account_key",
                    "clear_secrets",
                ),
                "description": "Stored encrypted. Secrets are never shown: type a new value to "
                "replace one. OAuth accounts are best set up with Connect with Google.",
            },
        ),
        ("Sending", {"fields": ("send_as_aliases",)}),
        (
            "Limits (rolling 24 hours)",
            {
                "fields": (
                    "limits_preset",
                    "daily_limit",
                    "daily_recipient_limit",
                    "per_message_recipient_limit",
                    "quota",
                )
            },
        ),
        (
            "Health",
            {
                "fields": (
                    "health",
                    "health_detail",
                    "health_checked_at",
                    "last_sent_at",
                    "bounce_reading",
                )
            },
        ),
    )

    # --- columns -----------------------------------------------------------------------------
    @admin.display(description="health")
    def health_badge(self, obj: GmailAccount) -> str:
        status = _status(obj)
        if not obj.is_active:
            return format_html('<span class="gms-badge gms-paused">paused</span>')
        if status.exhausted_until:
            return format_html(
                '<span class="gms-badge gms-quota" title="{}">quota exhausted until {}</span>',
                status.exhausted_reason,
                moment(status.exhausted_until),
            )
        css_by_health: dict[str, str] = {
            GmailAccount.Health.OK: "gms-ok",
            GmailAccount.Health.NEEDS_CONSENT: "gms-bad",
            GmailAccount.Health.CREDENTIALS_REJECTED: "gms-bad",
        }
        css = css_by_health.get(obj.health, "gms-unknown")
        return format_html(
            '<span class="gms-badge {}" title="{}">{}</span>',
            css,
            obj.health_detail,
            obj.get_health_display(),
        )

    @admin.display(description="quota (24 h)")
    def quota_bar(self, obj: GmailAccount) -> str:
        return render_quota_bar(_status(obj))

    @admin.display(description="quota now")
    def quota(self, obj: GmailAccount) -> str:
        if not obj.pk:
            return "-"
        status = _status(obj)
        recipients = (
            f"{status.recipients_used} of {status.recipients_limit}"
            if status.recipients_limit
            else f"{status.recipients_used} (no limit)"
        )
        return format_html(
            "{}Recipients: {}. Bulk mail may use {} messages; the rest is kept for "
            "transactional mail.",
            render_quota_bar(status),
            recipients,
            status.bulk_messages_limit,
        )

    @admin.display(description="last send", ordering="last_sent_at")
    def last_send(self, obj: GmailAccount) -> str:
        return moment(obj.last_sent_at, empty="never")

    @admin.display(description="bounces (30 days)", ordering="gms_bounces")
    def bounce_count(self, obj: GmailAccount) -> str:
        count = getattr(obj, "gms_bounces", None)
        if count is None:
            count = obj.bounces.filter(created_at__gte=_bounce_window_start()).count()
        if not count:
            return "0"
        url = reverse("admin:django_gmail_smtp_bounce_changelist")
        return format_html('<a href="{}?account__id__exact={}">{}</a>', url, obj.pk, count)

    @admin.display(description="bounce reading (IMAP)")
    def bounce_reading(self, obj: GmailAccount) -> str:
        """The bounce reader's IMAP login: its own health, apart from sending's."""
        from ..models import BounceMailbox

        mailbox = BounceMailbox.objects.filter(account_id=obj.pk).first()
        if mailbox is None:
            return "Not read yet (manage.py gmail_smtp bounces, or BOUNCE_INTERVAL)."
        text = f"{mailbox.get_health_display()}; last read {moment(mailbox.last_read_at)}"
        if mailbox.health_detail:
            text += f". Last problem ({moment(mailbox.checked_at)}): {mailbox.health_detail}"
        return text

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        recent = Q(bounces__created_at__gte=_bounce_window_start())
        return super().get_queryset(request).annotate(gms_bounces=Count("bounces", filter=recent))

    @admin.display(description="active", boolean=True, ordering="is_active")
    def active(self, obj: GmailAccount) -> bool:
        return obj.is_active

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        extra = {"dashboard_url": reverse("admin:django_gmail_smtp_dashboard")}
        return super().changelist_view(request, {**extra, **(extra_context or {})})

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra = dict(extra_context or {})
        user = request.user
        extra["gms_can_change"] = user.has_perm("django_gmail_smtp.change_gmailaccount")
        extra["gms_can_connect"] = user.has_perm("django_gmail_smtp.connect_gmailaccount")
        extra["gms_can_send_test"] = user.has_perm("django_gmail_smtp.send_test_gmailaccount")
        return super().change_view(request, object_id, form_url, extra)

    # --- saving ------------------------------------------------------------------------------
    def save_model(self, request: HttpRequest, obj: GmailAccount, form, change: bool) -> None:
        credentials_changed = any(f in form.changed_data for f in CREDENTIAL_FIELDS) or bool(
            form.cleaned_data.get("clear_secrets")
        )
        resumed = change and "is_active" in form.changed_data and obj.is_active
        released = services.save_account(
            obj, credentials_changed=change and credentials_changed, resumed=resumed
        )
        if released:
            self.message_user(
                request, f"{released} message(s) waiting for this account will be retried."
            )

    # --- permissions -------------------------------------------------------------------------
    def require(self, request: HttpRequest, codename: str) -> None:
        """Raise PermissionDenied unless the user has ``django_gmail_smtp.<codename>``."""
        if not request.user.has_perm(f"django_gmail_smtp.{codename}"):
            raise PermissionDenied

    def get_fieldsets(self, request: HttpRequest, obj: GmailAccount | None = None) -> FieldsetSpec:
        if obj is None:
            # Adding: nothing stored to remove yet, no health to show.
            fieldsets: list[tuple[StrOrPromise | None, FieldOpts]] = [
                fs for fs in self.fieldsets if fs[0] != "Health"
            ]
            name, credentials = fieldsets[1]
            fields = tuple(f for f in credentials["fields"] if f != "clear_secrets")
            fieldsets[1] = (name, {**credentials, "fields": fields})
            return fieldsets
        if not self.has_change_permission(request, obj):
            # Django renders read-only fields with their model value: the decrypted secret.
            return self._secrets_as_states(self.fieldsets)
        return self.fieldsets

    def _secrets_as_states(self, fieldsets: FieldsetSpec) -> FieldsetSpec:
        """The fieldsets with each secret replaced by its "Stored (encrypted)"/"Not set" state."""
        result: list[tuple[StrOrPromise | None, FieldOpts]] = []
        for name, options in fieldsets:
            fields = tuple(
                self.secret_states.get(f, f) if isinstance(f, str) else f
                for f in options["fields"]
                if f != "clear_secrets"
            )
            result.append((name, {**options, "fields": fields}))
        return result

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        # The states are never form fields; listing them keeps them out of the ModelForm.
        return (*super().get_readonly_fields(request, obj), *self.secret_states.values())

    def has_send_test_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_gmail_smtp.send_test_gmailaccount")

    # --- actions -----------------------------------------------------------------------------
    def report(self, request: HttpRequest, result: services.Result) -> None:
        """Show an operation's result as a success or error message."""
        self.message_user(request, result.text, messages.SUCCESS if result.ok else messages.ERROR)

    def _report_each(self, request: HttpRequest, queryset: QuerySet, operation) -> None:
        for result in services.run_each(queryset, operation):
            self.report(request, result)

    @admin.action(description="Verify: connect and log in", permissions=["change"])
    def verify(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._report_each(request, queryset, services.verify)

    @admin.action(description="Send a test message to me", permissions=["send_test"])
    def send_test(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._report_each(request, queryset, lambda a: views.send_test_to_user(a, request.user))

    @admin.action(description="Refresh the OAuth access token", permissions=["change"])
    def refresh_token_action(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._report_each(request, queryset, services.refresh_token)

    @admin.action(description="Pause sending", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = sum(r.changed for r in services.run_each(queryset, services.pause))
        self.message_user(request, f"Paused {count} account(s); their mail waits in the outbox.")

    @admin.action(description="Resume sending", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = sum(r.changed for r in services.run_each(queryset, services.resume))
        self.message_user(request, f"Resumed {count} account(s).")

    # --- extra views (admin/views.py) --------------------------------------------------------
    def get_urls(self):
        def bind(view):
            def bound(request, *args, **kwargs):
                return view(self, request, *args, **kwargs)

            return self.admin_site.admin_view(update_wrapper(bound, view))

        return [
            path("dashboard/", bind(views.dashboard), name="django_gmail_smtp_dashboard"),
            path(
                "oauth/callback/",
                bind(views.oauth_callback),
                name="django_gmail_smtp_oauth_callback",
            ),
            path(
                "<path:object_id>/do/<str:operation>/",
                bind(views.operation),
                name="django_gmail_smtp_gmailaccount_operation",
            ),
            path(
                "<path:object_id>/connect/",
                bind(views.connect),
                name="django_gmail_smtp_gmailaccount_connect",
            ),
            *super().get_urls(),
        ]
