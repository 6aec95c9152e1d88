"""The accounts admin's own pages: operation buttons, Connect with Google, the dashboard.

Each view checks the permission, reads the request, calls :mod:`django_gmail_smtp.services`
and shows the result; ``model_admin`` is the :class:`GmailAccountAdmin` they belong to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import django
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from .. import services
from ..conf import format_time, get_setting
from ..models import GmailAccount

if TYPE_CHECKING:
    from .accounts import GmailAccountAdmin

CHANGELIST = "admin:django_gmail_smtp_gmailaccount_changelist"
CHANGE = "admin:django_gmail_smtp_gmailaccount_change"

#: POST buttons on the change page: operation name -> (permission codename, service).
OPERATIONS: dict[str, str] = {
    "verify": "change_gmailaccount",
    "send-test": "send_test_gmailaccount",
    "refresh": "change_gmailaccount",
    "pause": "change_gmailaccount",
    "resume": "change_gmailaccount",
}


def send_test_to_user(account: GmailAccount, user: Any) -> services.Result:
    """A test message from ``account`` to the signed-in user's own address."""
    return services.send_test(
        account,
        getattr(user, "email", "") or "",
        body=f"This test message was sent from the Django admin through {account.email}.\n",
    )


def _account(model_admin: GmailAccountAdmin, request: HttpRequest, object_id: str) -> GmailAccount:
    account = get_object_or_404(GmailAccount, pk=object_id)
    if not model_admin.has_view_permission(request, account):
        raise PermissionDenied
    return account


def operation(
    model_admin: GmailAccountAdmin, request: HttpRequest, object_id: str, operation: str
) -> HttpResponse:
    """POST buttons on the change page: verify, send-test, refresh, pause, resume."""
    if request.method != "POST":
        return HttpResponse(status=405)
    account = _account(model_admin, request, object_id)
    if operation not in OPERATIONS:
        raise PermissionDenied
    model_admin.require(request, OPERATIONS[operation])
    run = {
        "verify": services.verify,
        "send-test": lambda a: send_test_to_user(a, request.user),
        "refresh": services.refresh_token,
        "pause": services.pause,
        "resume": services.resume,
    }[operation]
    model_admin.report(request, run(account))
    return HttpResponseRedirect(reverse(CHANGE, args=[account.pk]))


def redirect_uri(request: HttpRequest) -> str:
    """Where Google sends the user back: OAUTH_REDIRECT_URI, else this admin's callback URL."""
    configured = get_setting("OAUTH_REDIRECT_URI")
    if configured:
        return str(configured)
    # Honours USE_X_FORWARDED_HOST / SECURE_PROXY_SSL_HEADER behind a proxy.
    return request.build_absolute_uri(reverse("admin:django_gmail_smtp_oauth_callback"))


def connect(model_admin: GmailAccountAdmin, request: HttpRequest, object_id: str) -> HttpResponse:
    """Start Connect with Google: redirect to Google's consent screen."""
    account = _account(model_admin, request, object_id)
    model_admin.require(request, "connect_gmailaccount")
    if request.method != "POST":
        return HttpResponse(status=405)
    pending = services.PendingConnects(request.session)
    try:
        flow = services.start_connect(account, redirect_uri(request), pending=pending)
    except ImproperlyConfigured as exc:
        model_admin.report(request, services.Result(False, services.explain(exc)))
        return HttpResponseRedirect(reverse(CHANGE, args=[account.pk]))
    return HttpResponseRedirect(flow.url)


def oauth_callback(model_admin: GmailAccountAdmin, request: HttpRequest) -> HttpResponse:
    """Google redirects here: the state names the pending flow; the code is exchanged."""
    model_admin.require(request, "connect_gmailaccount")
    result = services.finish_pending_connect(
        services.PendingConnects(request.session),
        state=request.GET.get("state", ""),
        code=request.GET.get("code", ""),
        error=request.GET.get("error", ""),
    )
    model_admin.report(request, result)
    if result.account is None:
        return HttpResponseRedirect(reverse(CHANGELIST))
    return HttpResponseRedirect(reverse(CHANGE, args=[result.account.pk]))


def dashboard(model_admin: GmailAccountAdmin, request: HttpRequest) -> HttpResponse:
    """Per account: sends per hour (24 h) and per day (30 days), outbox counts, room now."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    from ..stats import TIME_FORMAT
    from ..stats import dashboard as account_stats

    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Gmail sending dashboard",
        "opts": model_admin.model._meta,
        "accounts": account_stats(),
        "now_text": format_time(timezone.now(), f"{TIME_FORMAT} %Z"),
        # Django < 6.1: breadcrumbs are a div; from 6.1 an ordered list (styled as ol).
        "gms_list_breadcrumbs": django.VERSION >= (6, 1),
    }
    return TemplateResponse(request, "admin/django_gmail_smtp/dashboard.html", context)
