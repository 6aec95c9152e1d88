"""The Django admin: sender accounts (health, quota, Connect with Google), the outbox, a dashboard.

Secrets are write-only: forms show whether one is set, never its value. Permissions:
``view_gmailaccount`` (the pages), ``change_gmailaccount`` (edit, verify, pause, refresh),
``connect_gmailaccount`` (Connect with Google), ``send_test_gmailaccount`` (test mail),
``retry_outboundemail`` (retry or cancel outbox mail), ``view_body_outboundemail`` (read and
search message bodies). Changelists accept only the query-string filters they offer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db import connections
from django.db.models import F, Func, QuerySet, TextField, Value
from django.db.models.functions import Cast
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
#: Seconds a started Connect with Google waits for Google's answer.
PENDING_CONNECT_LIFETIME = 600
#: Connections one browser session may have pending at once (several tabs).
MAX_PENDING_CONNECTS = 5
STORED, NOT_SET = "Stored (encrypted)", "Not set"


class SecretTextarea(forms.Textarea):
    """A textarea that never renders a value, not even one just submitted."""

    def format_value(self, value: Any) -> None:
        return None


class OfferedLookupsOnly:
    """Changelist filters from the query string only as the admin offers them.

    Django allows any lookup on a local field (``?mime__regex=``, ``?app_password__startswith=``),
    which lets a viewer probe values they cannot see, one character at a time. Here a lookup
    is allowed only if a ``list_filter`` or the ``date_hierarchy`` would produce it; any other
    gets Django's 400 (``DisallowedModelAdminLookup``).
    """

    def offered_lookups(self, request: HttpRequest | None) -> frozenset[str]:
        """The query-string parameters this changelist's own filters use."""
        list_filter = tuple(self.get_list_filter(request))
        key = (list_filter, self.date_hierarchy)
        cache = self.__dict__.setdefault("_gms_offered_lookups", {})
        if key not in cache:
            # Filter specs of relations query their choices: build them once, not per request.
            cache[key] = frozenset(self._filter_parameters(request, list_filter))
        return cache[key]

    def _filter_parameters(self, request: HttpRequest | None, list_filter: tuple) -> set[str]:
        from django.contrib.admin.filters import FieldListFilter, ListFilter
        from django.contrib.admin.utils import get_fields_from_path

        offered: set[str] = set()
        for item in list_filter:
            if isinstance(item, type) and issubclass(item, ListFilter):
                spec = item(request, {}, self.model, self)
            else:
                path, factory = item if isinstance(item, (list, tuple)) else (item, None)
                field = get_fields_from_path(self.model, path)[-1]
                factory = factory or FieldListFilter.create
                spec = factory(field, request, {}, self.model, self, field_path=path)
            offered.update(spec.expected_parameters())
        if self.date_hierarchy:
            parts = ("year", "month", "day", "gte", "lt")
            offered.update(f"{self.date_hierarchy}__{part}" for part in parts)
        return offered

    # Django < 5.0 calls lookup_allowed(lookup, value) without the request.
    def lookup_allowed(self, lookup: str, value: Any, request: HttpRequest | None = None) -> bool:
        return lookup in self.offered_lookups(request) and self._date_part_valid(lookup, value)

    def _date_part_valid(self, lookup: str, value: Any) -> bool:
        # Django turns date_hierarchy parts into datetime() and catches only ValueError, so
        # `?created_at__year=99999999999999999999` would be a 500 (OverflowError).
        ranges = {"year": (1000, 9998), "month": (1, 12), "day": (1, 31)}
        for part, (low, high) in ranges.items():
            if self.date_hierarchy and lookup == f"{self.date_hierarchy}__{part}":
                text = str(value)
                return len(text) <= 4 and text.isdecimal() and low <= int(text) <= high
        return True


def _secret_state(name: str):
    """A read-only column for a secret: whether one is stored, never its value."""
    model_field = GmailAccount._meta.get_field(name)

    @admin.display(description=model_field.verbose_name)
    def state(self, obj: GmailAccount) -> str:
        return STORED if obj.has_secret(name) else NOT_SET

    state.__name__ = f"{name}_state"
    return state


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
class GmailAccountAdmin(OfferedLookupsOnly, admin.ModelAdmin):
    form = GmailAccountForm
    list_display = ("email", "auth_method", "health_badge", "quota_bar", "last_send", "active")
    list_filter = ("auth_method", "health", "is_active", "limits_preset")
    search_fields = ("email", "send_as_aliases")
    actions = ["verify", "send_test", "refresh_token_action", "pause", "resume"]
    readonly_fields = ("health", "health_detail", "health_checked_at", "last_sent_at", "quota")
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
        if obj is None:
            # Adding: nothing stored to remove yet, no health to show.
            fieldsets = [fs for fs in self.fieldsets if fs[0] != "Health"]
            credentials = fieldsets[1][1]
            fields = tuple(f for f in credentials["fields"] if f != "clear_secrets")
            fieldsets[1] = (fieldsets[1][0], {**credentials, "fields": fields})
            return fieldsets
        if not self.has_change_permission(request, obj):
            # Django renders read-only fields with their model value: the decrypted secret.
            return self._secrets_as_states(self.fieldsets)
        return self.fieldsets

    def _secrets_as_states(self, fieldsets) -> list:
        """The fieldsets with each secret replaced by its "Stored (encrypted)"/"Not set" state."""
        result = []
        for name, options in fieldsets:
            fields = tuple(
                self.secret_states.get(f, f) for f in options["fields"] if f != "clear_secrets"
            )
            result.append((name, {**options, "fields": fields}))
        return result

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        # The states are never form fields; listing them keeps them out of the ModelForm.
        return (*super().get_readonly_fields(request, obj), *self.secret_states.values())

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
        pending = _pending_connections(request)
        pending.append(
            {
                "state": flow.state,
                "verifier": flow.verifier,
                "account": account.pk,
                "redirect_uri": flow.redirect_uri,
                "expires": time.time() + PENDING_CONNECT_LIFETIME,
            }
        )
        request.session[SESSION_KEY] = pending[-MAX_PENDING_CONNECTS:]
        return HttpResponseRedirect(flow.url)

    def oauth_callback_view(self, request: HttpRequest):
        """Google redirects here: check state, exchange the code, store the refresh token."""
        from .credentials import finish_authorization

        self._require(request, "connect_gmailaccount")
        pending_list = _pending_connections(request)
        state = request.GET.get("state", "")
        pending = next(
            (p for p in pending_list if state and constant_time_compare(state, p["state"])), None
        )
        if pending is None:
            # Leave pending connections alone: a forged or stale answer must not cancel them.
            self.message_user(
                request,
                "This Connect with Google answer does not match a connection started from this "
                "browser session in the last "
                f"{PENDING_CONNECT_LIFETIME // 60} minutes (wrong, reused or expired state). "
                "Start again from the account page.",
                messages.ERROR,
            )
            return HttpResponseRedirect(reverse("admin:django_gmail_smtp_gmailaccount_changelist"))
        request.session[SESSION_KEY] = [p for p in pending_list if p is not pending]  # used once
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


def _pending_connections(request: HttpRequest) -> list[dict[str, Any]]:
    """This session's unexpired Connect with Google flows; expired ones are dropped."""
    stored = request.session.get(SESSION_KEY)
    entries = stored if isinstance(stored, list) else []
    now = time.time()
    live = [
        p
        for p in entries
        if isinstance(p, dict) and isinstance(p.get("expires"), (int, float)) and p["expires"] > now
    ]
    if stored is not None and live != stored:
        request.session[SESSION_KEY] = live
    return live


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


def _message_text(queryset: QuerySet) -> Func:
    """The stored message (headers and body) as text the database can search."""
    if connections[queryset.db].vendor == "postgresql":
        # bytea::text is hex; encode(..., 'escape') keeps ASCII and never fails on bad UTF-8.
        return Func(F("mime"), Value("escape"), function="encode", output_field=TextField())
    return Cast("mime", TextField())


@admin.register(OutboundEmail)
class OutboundEmailAdmin(OfferedLookupsOnly, admin.ModelAdmin):
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
    # Shown to every viewer anyway; the message itself is searched only with view_body.
    search_fields = ("subject", "message_id", "recipients", "account_email")
    message_search_field = "gms_message_text"
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
                    "retry_of",  # recipients Gmail refused temporarily are retried in a new row
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
        if self.can_read_bodies(request):
            return self.fieldsets
        return (*self.fieldsets[:-1], ("Message", {"fields": ("preview_hidden",)}))

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
