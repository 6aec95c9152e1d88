"""The Django admin: sender accounts (health, quota, Connect with Google), the outbox, a dashboard.

Secrets are write-only: forms show whether one is set, never its value. Permissions:
``view_gmailaccount`` (the pages), ``change_gmailaccount`` (edit, verify, pause, refresh),
``connect_gmailaccount`` (Connect with Google), ``send_test_gmailaccount`` (test mail),
``retry_outboundemail`` (retry or cancel outbox mail).
"""

from __future__ import annotations

import logging
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.crypto import constant_time_compare
from django.utils.html import format_html

from . import outbox, quota
from .conf import format_time, get_setting
from .exceptions import GmailSMTPError
from .models import GmailAccount, OutboundAttempt, OutboundEmail

logger = logging.getLogger(__name__)

SECRET_FIELDS = ("app_password", "client_secret", "refresh_token", "service_account_key")
CREDENTIAL_FIELDS = (*SECRET_FIELDS, "auth_method", "client_id", "email")
SESSION_KEY = "gmail_smtp_oauth"


# --- sender accounts ---------------------------------------------------------------------------


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
        widget=forms.Textarea(attrs={"rows": 4, "autocomplete": "off"}),
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
            state = "Stored (encrypted); leave empty to keep it." if stored else "Not set."
            field = self.fields[name]
            model_field = GmailAccount._meta.get_field(name)
            field.label = model_field.verbose_name[:1].upper() + model_field.verbose_name[1:]
            field.help_text = f"{state} {field.help_text or model_field.help_text}".strip()

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
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
        super()._post_clean()


def _status(account: GmailAccount) -> quota.QuotaStatus:
    """The account's quota, computed once per row object (columns share it)."""
    status = getattr(account, "_gms_quota_status", None)
    if status is None:
        status = account._gms_quota_status = account.quota_status()
    return status


@admin.register(GmailAccount)
class GmailAccountAdmin(admin.ModelAdmin):
    form = GmailAccountForm
    list_display = ("email", "auth_method", "health_badge", "quota_bar", "last_send", "active")
    list_filter = ("auth_method", "health", "is_active", "limits_preset")
    search_fields = ("email", "send_as_aliases")
    actions = ["verify", "send_test", "refresh_token_action", "pause", "resume"]
    readonly_fields = ("health", "health_detail", "health_checked_at", "last_sent_at", "quota")
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
            {"fields": ("health", "health_detail", "health_checked_at", "last_sent_at")},
        ),
    )

    # --- columns -----------------------------------------------------------------------------
    @admin.display(description="health")
    def health_badge(self, obj: GmailAccount) -> str:
        status = _status(obj)
        if not obj.is_active:
            return format_html('<span class="gms-badge gms-paused">paused</span>')
        if status.exhausted_until:
            until = format_time(status.exhausted_until, "%H:%M")
            return format_html(
                '<span class="gms-badge gms-quota" title="{}">quota exhausted until {}</span>',
                status.exhausted_reason,
                until,
            )
        css = {
            GmailAccount.Health.OK: "gms-ok",
            GmailAccount.Health.NEEDS_CONSENT: "gms-bad",
            GmailAccount.Health.CREDENTIALS_REJECTED: "gms-bad",
        }.get(obj.health, "gms-unknown")
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
            "{}<br>Recipients: {}. Bulk mail may use {} messages; the rest is kept for "
            "transactional mail.",
            render_quota_bar(status),
            recipients,
            status.bulk_messages_limit,
        )

    @admin.display(description="last send", ordering="last_sent_at")
    def last_send(self, obj: GmailAccount) -> str:
        if not obj.last_sent_at:
            return "never"
        return format_time(obj.last_sent_at, "%Y-%m-%d %H:%M")

    @admin.display(description="active", boolean=True, ordering="is_active")
    def active(self, obj: GmailAccount) -> bool:
        return obj.is_active

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        extra = {"dashboard_url": reverse("admin:django_gmail_smtp_dashboard")}
        return super().changelist_view(request, {**extra, **(extra_context or {})})

    # --- saving ------------------------------------------------------------------------------
    def save_model(self, request: HttpRequest, obj: GmailAccount, form, change: bool) -> None:
        credentials_changed = any(f in form.changed_data for f in CREDENTIAL_FIELDS) or bool(
            form.cleaned_data.get("clear_secrets")
        )
        if change and credentials_changed:
            obj.health, obj.health_detail = GmailAccount.Health.UNKNOWN, ""
            obj.access_token, obj.token_expiry = "", None
        super().save_model(request, obj, form, change)
        resumed = change and "is_active" in form.changed_data and obj.is_active
        if change and (credentials_changed or resumed):
            released = obj.release_deferred()
            if released:
                self.message_user(
                    request, f"{released} message(s) waiting for this account will be retried."
                )

    # --- permissions -------------------------------------------------------------------------
    def _require(self, request: HttpRequest, codename: str) -> None:
        if not request.user.has_perm(f"django_gmail_smtp.{codename}"):
            raise PermissionDenied

    def get_fieldsets(self, request: HttpRequest, obj=None):
        if obj is not None:
            return self.fieldsets
        # Adding: nothing stored to remove yet, no health to show.
        fieldsets = [fs for fs in self.fieldsets if fs[0] != "Health"]
        credentials = fieldsets[1][1]
        fields = tuple(f for f in credentials["fields"] if f != "clear_secrets")
        fieldsets[1] = (fieldsets[1][0], {**credentials, "fields": fields})
        return fieldsets

    def has_send_test_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_gmail_smtp.send_test_gmailaccount")

    # --- actions -----------------------------------------------------------------------------
    def _report_each(self, request: HttpRequest, queryset: QuerySet, operation) -> None:
        """Run ``operation(account) -> (ok, text)`` on each account and show each result."""
        for account in queryset:
            ok, text = operation(account)
            self.message_user(request, text, messages.SUCCESS if ok else messages.ERROR)

    @admin.action(description="Verify: connect and log in", permissions=["change"])
    def verify(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._report_each(request, queryset, verify_account)

    @admin.action(description="Send a test message to me", permissions=["send_test"])
    def send_test(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._report_each(request, queryset, lambda a: send_test_message(a, request.user))

    @admin.action(description="Refresh the OAuth access token", permissions=["change"])
    def refresh_token_action(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._report_each(request, queryset, refresh_account_token)

    @admin.action(description="Pause sending", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = queryset.update(is_active=False)
        self.message_user(request, f"Paused {count} account(s); their mail waits in the outbox.")

    @admin.action(description="Resume sending", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = 0
        for account in queryset.filter(is_active=False):
            account.is_active = True
            account.save(update_fields=["is_active"])
            account.release_deferred()
            count += 1
        self.message_user(request, f"Resumed {count} account(s).")

    # --- extra views -------------------------------------------------------------------------
    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("dashboard/", wrap(self.dashboard_view), name="django_gmail_smtp_dashboard"),
            path(
                "oauth/callback/",
                wrap(self.oauth_callback_view),
                name="django_gmail_smtp_oauth_callback",
            ),
            path(
                "<path:object_id>/do/<str:operation>/",
                wrap(self.operation_view),
                name="django_gmail_smtp_gmailaccount_operation",
            ),
            path(
                "<path:object_id>/connect/",
                wrap(self.connect_view),
                name="django_gmail_smtp_gmailaccount_connect",
            ),
            *super().get_urls(),
        ]

    def _account(self, request: HttpRequest, object_id: str) -> GmailAccount:
        account = get_object_or_404(GmailAccount, pk=object_id)
        if not self.has_view_permission(request, account):
            raise PermissionDenied
        return account

    def operation_view(self, request: HttpRequest, object_id: str, operation: str):
        """POST buttons on the change page: verify, send-test, refresh, pause, resume."""
        if request.method != "POST":
            return HttpResponse(status=405)
        account = self._account(request, object_id)
        needed = "send_test_gmailaccount" if operation == "send-test" else "change_gmailaccount"
        self._require(request, needed)
        if operation == "verify":
            ok, text = verify_account(account)
        elif operation == "send-test":
            ok, text = send_test_message(account, request.user)
        elif operation == "refresh":
            ok, text = refresh_account_token(account)
        elif operation in ("pause", "resume"):
            account.is_active = operation == "resume"
            account.save(update_fields=["is_active"])
            if account.is_active:
                account.release_deferred()
            verb = "Resumed" if account.is_active else "Paused"
            ok, text = True, f"{verb} sending from {account.email}."
        else:
            raise PermissionDenied
        self.message_user(request, text, messages.SUCCESS if ok else messages.ERROR)
        return HttpResponseRedirect(
            reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
        )

    def _redirect_uri(self, request: HttpRequest) -> str:
        configured = get_setting("OAUTH_REDIRECT_URI")
        if configured:
            return str(configured)
        # Honours USE_X_FORWARDED_HOST / SECURE_PROXY_SSL_HEADER behind a proxy.
        return request.build_absolute_uri(reverse("admin:django_gmail_smtp_oauth_callback"))

    def connect_view(self, request: HttpRequest, object_id: str):
        """Start Connect with Google: redirect to Google's consent screen."""
        from .credentials import start_authorization

        account = self._account(request, object_id)
        self._require(request, "connect_gmailaccount")
        change_url = reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
        if request.method != "POST":
            return HttpResponse(status=405)
        try:
            flow = start_authorization(account, self._redirect_uri(request))
        except ImproperlyConfigured as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(change_url)
        request.session[SESSION_KEY] = {
            "state": flow.state,
            "verifier": flow.verifier,
            "account": account.pk,
            "redirect_uri": flow.redirect_uri,
        }
        return HttpResponseRedirect(flow.url)

    def oauth_callback_view(self, request: HttpRequest):
        """Google redirects here: check state, exchange the code, store the refresh token."""
        from .credentials import finish_authorization

        self._require(request, "connect_gmailaccount")
        pending = request.session.pop(SESSION_KEY, None)
        state = request.GET.get("state", "")
        if not pending or not constant_time_compare(state, pending.get("state", "")):
            self.message_user(
                request,
                "This Connect with Google answer does not match a connection started from this "
                "browser session (wrong or reused state). Start again from the account page.",
                messages.ERROR,
            )
            return HttpResponseRedirect(reverse("admin:django_gmail_smtp_gmailaccount_changelist"))
        account = get_object_or_404(GmailAccount, pk=pending["account"])
        change_url = reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
        error = request.GET.get("error")
        if error:
            text = {
                "access_denied": "the Google user declined to grant access",
            }.get(error, error)
            self.message_user(
                request,
                f"Google did not connect {account.email}: {text}. Nothing was changed.",
                messages.ERROR,
            )
            return HttpResponseRedirect(change_url)
        try:
            finish_authorization(
                account,
                code=request.GET.get("code", ""),
                verifier=pending["verifier"],
                redirect_uri=pending["redirect_uri"],
            )
        except (GmailSMTPError, ImproperlyConfigured) as exc:
            self.message_user(request, f"Not connected: {exc}", messages.ERROR)
            return HttpResponseRedirect(change_url)
        self.message_user(
            request,
            f"Connected {account.email} with Google: the refresh token is stored (encrypted). "
            "Use Verify to check that Gmail accepts it.",
            messages.SUCCESS,
        )
        return HttpResponseRedirect(change_url)

    def dashboard_view(self, request: HttpRequest):
        """Per account: sends per hour (24 h) and per day (30 days), outbox counts, next slot."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        from .stats import dashboard

        context = {
            **self.admin_site.each_context(request),
            "title": "Gmail sending dashboard",
            "opts": self.model._meta,
            "accounts": dashboard(),
            "now": timezone.now(),
        }
        return TemplateResponse(request, "admin/django_gmail_smtp/dashboard.html", context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra = dict(extra_context or {})
        user = request.user
        extra["gms_can_change"] = user.has_perm("django_gmail_smtp.change_gmailaccount")
        extra["gms_can_connect"] = user.has_perm("django_gmail_smtp.connect_gmailaccount")
        extra["gms_can_send_test"] = user.has_perm("django_gmail_smtp.send_test_gmailaccount")
        return super().change_view(request, object_id, form_url, extra)


def render_quota_bar(status: quota.QuotaStatus) -> str:
    """A used/limit bar with the transactional share marked (plain HTML and CSS)."""
    limit = max(1, status.messages_limit)
    used = min(100.0, 100.0 * status.messages_used / limit)
    bulk = 100.0 * status.bulk_messages_limit / limit
    css = "gms-full" if status.exhausted_until else ("gms-high" if used >= 80 else "")
    return format_html(
        '<div class="gms-quota" title="{used} of {limit} messages in the last 24 hours; '
        'the part right of the mark is kept for transactional mail">'
        '<div class="gms-quota-bar"><span class="gms-quota-used {css}" style="width:{pct}%">'
        '</span><span class="gms-quota-share" style="left:{bulk}%"></span></div>'
        '<span class="gms-quota-text">{used} / {limit}</span></div>',
        used=status.messages_used,
        limit=status.messages_limit,
        css=css,
        pct=f"{used:.1f}",
        bulk=f"{bulk:.1f}",
    )


# --- operations shared by actions and buttons ----------------------------------------------------


def verify_account(account: GmailAccount) -> tuple[bool, str]:
    """Connect and log in; the result in plain words."""
    from .transport import GmailConnection

    connection = GmailConnection(account)
    try:
        connection.open()
    except (GmailSMTPError, ImproperlyConfigured) as exc:
        return False, f"Could not verify {account.email}: {exc}"
    finally:
        connection.close()
    account.mark_health(GmailAccount.Health.OK, "")
    return (
        True,
        f"Verified {account.email}: connected over verified TLS and logged in. Ready to send.",
    )


def send_test_message(account: GmailAccount, user: Any) -> tuple[bool, str]:
    """Send one message from ``account`` to the signed-in user's address."""
    from django.core.mail import EmailMessage

    from .backends import GmailSMTPBackend

    to = getattr(user, "email", "")
    if not to:
        return False, "Your user has no email address; add one to your profile first."
    message = EmailMessage(
        subject=f"Test message from {account.email}",
        body=f"This test message was sent from the Django admin through {account.email}.\n",
        from_email=account.email,
        to=[to],
    )
    try:
        GmailSMTPBackend(account=account.email).send_messages([message])
    except (GmailSMTPError, ImproperlyConfigured) as exc:
        return False, f"Test message not sent: {exc}"
    reply = message.gmail_status.get("reply", "")
    return True, f"Test message sent from {account.email} to {to}. Gmail replied: {reply}"


def refresh_account_token(account: GmailAccount) -> tuple[bool, str]:
    from .credentials import credentials_for

    if account.auth_method == GmailAccount.AuthMethod.APP_PASSWORD:
        return False, f"Nothing to refresh: {account.email} uses an App Password, not a token."
    try:
        creds = credentials_for(account, force_refresh=True)
    except (GmailSMTPError, ImproperlyConfigured) as exc:
        return False, f"Could not refresh the token of {account.email}: {exc}"
    until = format_time(creds.expires_at, "%H:%M")
    return True, f"Refreshed {account.email}: new access token, valid until {until}."


# --- the outbox --------------------------------------------------------------------------------


class AttemptInline(admin.TabularInline):
    model = OutboundAttempt
    extra = 0
    can_delete = False
    fields = ("at", "account_email", "outcome", "code", "phase", "reply", "worker")
    readonly_fields = fields
    verbose_name_plural = "attempts (Gmail's replies)"

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(OutboundEmail)
class OutboundEmailAdmin(admin.ModelAdmin):
    class Media:
        css = {"all": ["django_gmail_smtp/admin.css"]}

    list_display = (
        "subject_short",
        "recipients_short",
        "account_email",
        "status_badge",
        "attempts",
        "created_at",
        "when",
    )
    list_display_links = ("subject_short",)
    list_filter = ("status", "priority", "account", "reason", "created_at")
    date_hierarchy = "created_at"
    search_fields = ("subject", "message_id", "recipients", "account_email")
    inlines = [AttemptInline]
    actions = ["retry_now", "cancel"]
    list_per_page = 50
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "status",
                    "reason",
                    "last_error",
                    "priority",
                    "account_email",
                    "from_email",
                    "recipient_list",
                    "subject",
                    "message_id",
                    "size",
                    "from_rewritten",
                )
            },
        ),
        (
            "Delivery",
            {
                "fields": (
                    "attempts",
                    "next_attempt_at",
                    "sent_at",
                    "gmail_reply",
                    "refused_list",
                    "created_at",
                    "updated_at",
                )
            },
        ),
        ("Message", {"fields": ("preview",)}),
    )
    # Everything is read-only: the outbox is a record.
    readonly_fields = (*(f for _name, opts in fieldsets for f in opts["fields"]), "preview_hidden")

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).defer("mime")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # `manage.py gmail_smtp purge` removes old mail

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # read-only; retry and cancel are actions

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_gmail_smtp.retry_outboundemail")

    @admin.display(description="subject", ordering="subject")
    def subject_short(self, obj: OutboundEmail) -> str:
        return obj.subject[:70] or "(no subject)"

    @admin.display(description="to")
    def recipients_short(self, obj: OutboundEmail) -> str:
        first = ", ".join(obj.recipients[:2])
        more = len(obj.recipients) - 2
        return f"{first} +{more}" if more > 0 else first

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

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: OutboundEmail) -> str:
        return format_html(
            '<span class="gms-badge gms-status-{}" title="{}">{}</span>',
            obj.status,
            obj.last_error,
            obj.get_status_display() + (f" ({obj.get_reason_display()})" if obj.reason else ""),
        )

    @admin.display(description="sent / next try")
    def when(self, obj: OutboundEmail) -> str:
        moment = obj.sent_at or obj.next_attempt_at
        return format_time(moment, "%Y-%m-%d %H:%M")

    @admin.display(description="preview")
    def preview(self, obj: OutboundEmail) -> str:
        from .stats import message_preview

        return message_preview(obj)

    @admin.display(description="preview")
    def preview_hidden(self, obj: OutboundEmail) -> str:
        return (
            "Hidden: message bodies hold things like password-reset links; reading them needs "
            "the permission 'Can read outbound message bodies'."
        )

    def get_fieldsets(self, request: HttpRequest, obj=None):
        if request.user.has_perm("django_gmail_smtp.view_body_outboundemail"):
            return self.fieldsets
        return (*self.fieldsets[:-1], ("Message", {"fields": ("preview_hidden",)}))

    @admin.action(description="Retry now", permissions=["retry"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = outbox.retry(queryset)
        self.message_user(request, f"{count} message(s) handed to Celery again.")

    @admin.action(description="Cancel (not sent yet)", permissions=["retry"])
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = outbox.cancel(queryset)
        self.message_user(request, f"{count} message(s) cancelled; sent mail is left as it is.")
