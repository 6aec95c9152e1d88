"""The pages behind the newsletter admin's buttons.

Each view checks its permission first (403 without it, whatever the method), then reads the
request, calls the sub-app's service, and shows the result; changes need a POST (with Django's
CSRF token). ``model_admin`` is the admin the page belongs to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import messages
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from ...conf import get_setting
from ...enums import Priority
from ..models import Campaign, MailingList
from .base import APP

if TYPE_CHECKING:
    from .base import NewsletterModelAdmin

#: POST buttons on a campaign's change page: operation -> what it says when done
OPERATIONS = ("pause", "resume", "cancel", "retry-failed")
#: errors the campaign lifecycle raises for a user's mistake (a plain message each)
USER_ERRORS = (ValueError, LookupError, ImproperlyConfigured)


def _change_url(obj: Any) -> str:
    return reverse(f"admin:{APP}_{obj._meta.model_name}_change", args=[obj.pk])


# --- lists: CSV import ---------------------------------------------------------------------------


class ImportForm(forms.Form):
    file = forms.FileField(
        label="CSV file",
        help_text="A header row naming the columns: email (required), name, and any others, "
        "which become merge fields ({{ subscriber.fields.city }}). UTF-8 (with or without a "
        "byte-order mark), separated by commas or semicolons.",
    )
    activate = forms.BooleanField(
        label="Subscribe them now (I hold their consent)",
        required=False,
        help_text="Unticked: they are added awaiting confirmation and get no campaign mail "
        "until they confirm.",
    )
    send_confirmations = forms.BooleanField(
        label="Send them the confirmation mail",
        required=False,
        help_text="For people added awaiting confirmation: each gets the list's confirmation "
        "link now, through the site's email backend (people already on the list get none).",
    )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or self.cleaned_data
        if cleaned.get("activate") and cleaned.get("send_confirmations"):
            raise forms.ValidationError(
                "Choose one: subscribe them now, or send them the confirmation mail."
            )
        return cleaned


def import_subscribers(
    model_admin: NewsletterModelAdmin, request: HttpRequest, object_id: str
) -> HttpResponse:
    """Import CSV: the form (GET), then the import and its report (POST)."""
    model_admin.require(request, "import_subscribers")
    mailing_list: MailingList = model_admin.viewable(request, object_id)
    from ..imports import ImportProblem, import_csv
    from .lists import subscribers_url, who_and_when

    posted = request.method == "POST"
    form = ImportForm(request.POST if posted else None, request.FILES if posted else None)
    report = None
    if posted and form.is_valid():
        upload = form.cleaned_data["file"]
        source = f"{upload.name}, imported {who_and_when(request)}"
        try:
            report = import_csv(
                mailing_list,
                upload,
                activate=form.cleaned_data["activate"],
                source=source,
                send_confirmations=form.cleaned_data["send_confirmations"],
            )
        except ImportProblem as problem:
            form.add_error("file", str(problem))
        else:
            model_admin.message_user(request, report.summary(), messages.SUCCESS)
    context = {
        **model_admin.page_context(
            request, f"Import subscribers into {mailing_list}", mailing_list
        ),
        "form": form,
        "report": report,
        "subscribers_url": subscribers_url(mailing_list),
        "change_url": _change_url(mailing_list),
    }
    return TemplateResponse(
        request, "admin/gmail_smtp_newsletters/mailinglist/import.html", context
    )


# --- campaigns -----------------------------------------------------------------------------------


def preview(
    model_admin: NewsletterModelAdmin, request: HttpRequest, object_id: str
) -> HttpResponse:
    """The campaign as a chosen subscriber (``?subscriber=ID``; else the first) would get it."""
    campaign: Campaign = model_admin.viewable(request, object_id)
    from ..render import Renderer, SiteURLNotConfigured, TemplateProblem

    mailing_list = campaign.mailing_list
    subscribers = (
        list(mailing_list.subscribers.order_by("email")[:200]) if mailing_list is not None else []
    )
    chosen = None
    wanted = request.GET.get("subscriber", "")
    if wanted.isdecimal() and mailing_list is not None:
        chosen = mailing_list.subscribers.filter(pk=int(wanted)).first()
    if chosen is None and subscribers:
        chosen = subscribers[0]
    parts, problem = None, ""
    try:
        parts = Renderer(campaign).preview(chosen)
    except (TemplateProblem, SiteURLNotConfigured) as exc:
        problem = str(exc)
    context = {
        **model_admin.page_context(request, f"Preview: {campaign}", campaign),
        "campaign": campaign,
        "parts": parts,
        "problem": problem,
        "subscribers": subscribers,
        "chosen": chosen,
        "change_url": _change_url(campaign),
        "gms_can_test": request.user.has_perm(f"{APP}.test_send_campaign"),
    }
    return TemplateResponse(request, "admin/gmail_smtp_newsletters/campaign/preview.html", context)


def test_send(
    model_admin: NewsletterModelAdmin, request: HttpRequest, object_id: str
) -> HttpResponse:
    """Send the campaign to its test recipients now, as transactional mail."""
    model_admin.require(request, "test_send_campaign")
    campaign: Campaign = model_admin.viewable(request, object_id)
    if request.method != "POST":
        return HttpResponse(status=405)
    from ..render import Renderer, SiteURLNotConfigured, TemplateProblem

    seeds = [line.strip() for line in campaign.seed_emails.splitlines() if line.strip()]
    if not seeds:
        model_admin.message_user(
            request,
            "This campaign has no test recipients: add addresses under Testing, save, and "
            "send the test again.",
            messages.ERROR,
        )
        return HttpResponseRedirect(_change_url(campaign))
    sent, failed = [], []
    try:
        renderer = Renderer(campaign)
        for email in seeds:
            message = renderer.test_message(email)
            # A test goes out now, through the site's backend, like any transactional mail:
            # it must not wait behind the campaigns' share of the quota.
            message.gmail_priority = Priority.TRANSACTIONAL  # type: ignore[attr-defined]
            try:
                message.send()
            except Exception as exc:  # the backend's error, in its words, per address
                failed.append(f"{email}: {exc}")
            else:
                sent.append(email)
    except (TemplateProblem, SiteURLNotConfigured) as exc:
        failed.append(str(exc))
    if sent:
        model_admin.message_user(request, f"Test sent to {', '.join(sent)}.", messages.SUCCESS)
    for text in failed:
        model_admin.message_user(request, f"Test not sent: {text}", messages.ERROR)
    return HttpResponseRedirect(_change_url(campaign))


class StartForm(forms.Form):
    domain_aligned = forms.BooleanField(
        required=False,
        label="SPF, DKIM and DMARC are aligned for this From domain",
        help_text="Lets this campaign take the domain past 5,000 messages a day to Gmail users. "
        "Unticked, sending stops for the day at 5,000.",
    )


def domain_state(campaign: Campaign, per_day: float = 0) -> dict[str, Any]:
    """The domain guard as the admin shows it: today's bulk count of the From domain, the
    thresholds, whether it is aligned, whether this campaign would cross the limit."""
    from .. import planner

    domain = planner.from_domain(campaign)
    count, warn_at, limit = planner.domain_usage(domain)
    aligned = not planner.domain_guarded(campaign)
    aligned_domains = {d.lower() for d in get_setting("NEWSLETTER_ALIGNED_DOMAINS") or ()}
    return {
        "domain": domain,
        "count": count,
        "warn_at": warn_at,
        "limit": limit,
        "aligned": aligned,
        "aligned_by_setting": domain in aligned_domains,
        "past_warning": count >= warn_at,
        "would_cross": not aligned and count + per_day > limit,
        "count_text": f"{count:,}",
        "warn_text": f"{warn_at:,}",
        "limit_text": f"{limit:,}",
    }


def warn_about_domain(model_admin: NewsletterModelAdmin, request: HttpRequest, campaign: Any):
    """A warning message when the From domain's bulk mail today is past the warning mark."""
    try:
        state = domain_state(campaign)
    except USER_ERRORS:
        return
    if state["past_warning"]:
        model_admin.message_user(
            request,
            f"Bulk mail from {state['domain']} in the last 24 hours: {state['count']:,} "
            f"messages. Gmail treats a domain sending {state['limit']:,} or more a day to Gmail "
            "users as a bulk sender for good; "
            + (
                "it is marked aligned (SPF, DKIM, DMARC), so campaigns may go on."
                if state["aligned"]
                else f"campaigns stop at {state['limit']:,} unless SPF, DKIM and DMARC are "
                "aligned and confirmed."
            ),
            messages.WARNING,
        )


def estimate_line(estimate: Any) -> str:
    """ "4,000 recipients: about 9 days at 450/day across 1 account." (why it waits, if it
    does, is said apart)."""
    total = int(estimate.total)
    pace = estimate.describe(with_reason=False)
    return f"{total:,} recipient{'s' if total != 1 else ''}" + (f": {pace}." if pace else ".")


def start(model_admin: NewsletterModelAdmin, request: HttpRequest, object_id: str) -> HttpResponse:
    """Start: the confirmation page with the estimate and the domain guard (GET), then the
    start (POST)."""
    model_admin.require(request, "send_campaign")
    campaign: Campaign = model_admin.viewable(request, object_id)
    from .. import campaigns

    if campaign.status != Campaign.Status.DRAFT:
        model_admin.message_user(
            request,
            f"This campaign is {campaign.get_status_display()}: only a draft can be started.",
            messages.ERROR,
        )
        return HttpResponseRedirect(_change_url(campaign))
    form = StartForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        if form.cleaned_data["domain_aligned"] and not campaign.domain_aligned:
            campaign.domain_aligned = True
            campaign.save(update_fields=["domain_aligned", "updated_at"])
        try:
            count = campaign.start()
        except USER_ERRORS as exc:
            model_admin.message_user(request, f"Not started: {exc}", messages.ERROR)
        else:
            model_admin.message_user(
                request,
                f"Started: {count:,} recipient(s) enrolled. {campaign.progress().describe()}",
                messages.SUCCESS,
            )
        return HttpResponseRedirect(_change_url(campaign))
    problem, estimate, domain, line = "", None, None, ""
    try:
        estimate = campaigns.estimate(campaign)
        domain = domain_state(campaign, float(estimate.rate_per_day or 0))
        line = estimate_line(estimate)
    except USER_ERRORS as exc:
        problem = str(exc)
    context = {
        **model_admin.page_context(request, f"Start {campaign}?", campaign),
        "campaign": campaign,
        "estimate": estimate,
        "estimate_line": line,
        "domain": domain,
        "problem": problem,
        "form": form,
        "change_url": _change_url(campaign),
    }
    return TemplateResponse(
        request, "admin/gmail_smtp_newsletters/campaign/confirm_start.html", context
    )


def operation(
    model_admin: NewsletterModelAdmin, request: HttpRequest, object_id: str, operation: str
) -> HttpResponse:
    """POST buttons: pause, resume, cancel, retry-failed."""
    model_admin.require(request, "send_campaign")
    campaign: Campaign = model_admin.viewable(request, object_id)
    if operation not in OPERATIONS:
        raise PermissionDenied
    if request.method != "POST":
        return HttpResponse(status=405)
    from .lists import who_and_when

    try:
        if operation == "pause":
            campaign.pause(f"Paused {who_and_when(request)}.")
            text = "Paused: nothing more goes into the outbox until you resume."
        elif operation == "resume":
            campaign.resume()
            text = "Resumed."
        elif operation == "cancel":
            campaign.cancel()
            text = "Cancelled: recipients not sent yet will get nothing."
        else:
            count = campaign.retry_failed()
            text = (
                f"{count:,} failed recipient(s) will be sent again."
                if count
                else "No failed recipient to send again."
            )
    except USER_ERRORS as exc:
        model_admin.message_user(request, f"Not done: {exc}", messages.ERROR)
    else:
        model_admin.message_user(request, text, messages.SUCCESS)
    return HttpResponseRedirect(_change_url(campaign))
