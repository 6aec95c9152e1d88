"""The newsletters' public pages: subscribe, confirm, unsubscribe, archive.

Link scanners (mail security gateways) fetch every link in a message with GET, so no GET here
changes anything: confirming and unsubscribing take a POST (a button on the page the GET
shows). The one-click unsubscribe POST (RFC 8058) comes from the mailbox provider with no
cookies and no CSRF token, so that view is CSRF-exempt, never redirects, never cached, and
answers 200 whatever the token, without saying whether it named anyone.
"""

from __future__ import annotations

import logging

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_http_methods

from . import subscribers, tokens
from .forms import SubscribeForm
from .models import Campaign, MailingList
from .render import Renderer, TemplateProblem
from .subscribers import UnsubscribeMethod

logger = logging.getLogger(__name__)

TEMPLATES = "django_gmail_smtp/newsletters/"
ONE_CLICK_BODY = ("List-Unsubscribe", "One-Click")


def _source(request: HttpRequest) -> str:
    """Where a form's consent came from: the page and the visitor's IP address (REMOTE_ADDR:
    a proxy's X-Forwarded-For is the site's to trust or not, in its own middleware)."""
    address = request.META.get("REMOTE_ADDR", "") or "unknown address"
    return f"{request.build_absolute_uri()} from {address}"[:500]


@csrf_protect
@require_http_methods(["GET", "POST"])
def subscribe(request: HttpRequest, slug: str) -> HttpResponse:
    """The subscribe form of one list; a POST answers "check your inbox" (or "subscribed" on
    a single opt-in list) the same way for every address."""
    mailing_list = get_object_or_404(MailingList, slug=slug)
    form = SubscribeForm(request.POST or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        if not form.is_bot():
            try:
                subscribers.subscribe(
                    mailing_list,
                    form.cleaned_data["email"],
                    form.cleaned_data["name"],
                    source=_source(request),
                )
            except ValueError as exc:  # an address the form let through but the list refuses
                form.add_error("email", str(exc))
                status = 400
            except subscribers.TooManyConfirmations:
                # Logged by subscribe(); the visitor is asked to come back later.
                form.add_error(
                    None,
                    _(
                        "Many people are signing up right now. Please try again in an hour; "
                        "nothing was sent to your address."
                    ),
                )
                status = 503
            except Exception:
                # The confirmation mail could not be sent (the site's mail is down or
                # misconfigured): say so; the subscription waits and the form can be re-sent.
                logger.exception("Could not send the confirmation mail for list %s", slug)
                form.add_error(
                    None,
                    _(
                        "We could not send the confirmation email just now. Please try "
                        "again in a few minutes."
                    ),
                )
                status = 503
        if status == 200:
            return render(
                request,
                TEMPLATES + "subscribe_done.html",
                {"mailing_list": mailing_list, "double_opt_in": mailing_list.double_opt_in},
            )
    elif request.method == "POST":
        status = 400
    return render(
        request,
        TEMPLATES + "subscribe.html",
        {"mailing_list": mailing_list, "form": form},
        status=status,
    )


# The signed token is the proof, not a cookie: it must work in a browser that blocks cookies.
@csrf_exempt
@never_cache
@require_http_methods(["GET", "HEAD", "POST"])
def confirm(request: HttpRequest, token: str) -> HttpResponse:
    """GET: a page with a "Confirm" button (changes nothing); POST: confirms."""
    if request.method != "POST":
        valid = tokens.read_confirm_token(token) is not None
        return render(request, TEMPLATES + "confirm.html", {"valid": valid})
    subscriber = subscribers.confirm(token)
    return render(
        request,
        TEMPLATES + "confirm_done.html",
        {
            "subscriber": subscriber,
            "mailing_list": subscriber.mailing_list if subscriber else None,
        },
    )


@csrf_exempt
@never_cache
@require_http_methods(["GET", "HEAD", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    """GET: a page with an "Unsubscribe" button (changes nothing: link scanners fetch GETs).
    POST (RFC 8058 one-click, ``List-Unsubscribe=One-Click``, or that button): unsubscribes,
    and answers 200 with a short page; never a redirect, also for a token that is not valid."""
    found = tokens.read_unsubscribe_token(token)
    test = tokens.read_test_unsubscribe_token(token) if found is None else None
    shown = found or test
    context = {
        "valid": shown is not None,
        "test": test is not None,
        "email": shown[1] if shown else "",
        "newsletter": _newsletter_name(shown[0]) if shown else "",
    }
    if request.method != "POST":
        return render(request, TEMPLATES + "unsubscribe.html", context)
    one_click = request.POST.get(ONE_CLICK_BODY[0]) == ONE_CLICK_BODY[1]
    how = UnsubscribeMethod.ONE_CLICK if one_click else UnsubscribeMethod.PAGE
    if found is not None:
        subscribers.unsubscribe(token, how=how)
    return render(request, TEMPLATES + "unsubscribe_done.html", context)


def _newsletter_name(campaign_id: int) -> str:
    """The list the reader unsubscribes from ("" for a campaign to an audience, where it is
    from every newsletter, or a campaign deleted since)."""
    name = (
        Campaign.objects.filter(pk=campaign_id, mailing_list__isnull=False)
        .values_list("mailing_list__name", flat=True)
        .first()
    )
    return name or ""


@require_http_methods(["GET", "HEAD"])
def archive(request: HttpRequest, pk: int) -> HttpResponse:
    """The web archive page of a campaign that has started and is archived (404 otherwise),
    rendered for a neutral sample subscriber."""
    campaign = get_object_or_404(Campaign.objects.select_related("mailing_list"), pk=pk)
    if not campaign.archive or campaign.started_at is None:
        raise Http404("No such campaign in the archive.")
    try:
        parts = Renderer(campaign).archive_page()
    except TemplateProblem:
        logger.exception("Campaign %s cannot be shown in the archive", pk)
        raise Http404("This campaign cannot be shown.") from None
    return render(request, TEMPLATES + "archive.html", {"campaign": campaign, **parts})
