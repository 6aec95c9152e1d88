"""The newsletters' public side: rendered messages and their headers, signed tokens, the
subscribe / confirm / unsubscribe pages and the web archive.

The pages are driven with Django's test client with CSRF checks on and, for the one-click
unsubscribe, no cookies at all (as a mailbox provider posts it); the double opt-in goes through
the real sync backend and the sandbox.
"""

from __future__ import annotations

import email
import re
from datetime import timedelta
from email import policy
from urllib.parse import unquote, urlsplit

import pytest
from django.core import mail, signing
from django.core.checks import run_checks
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from django_gmail_smtp.backends import GmailSMTPBackend
from django_gmail_smtp.enums import Priority
from django_gmail_smtp.models import OutboundEmail
from django_gmail_smtp.newsletters import render, signals, subscribers, tokens
from django_gmail_smtp.newsletters.models import (
    Campaign,
    CampaignRecipient,
    MailingList,
    Subscriber,
    Suppression,
)
from django_gmail_smtp.newsletters.render import Renderer, TemplateProblem

from .factories import SENDER, queued_row, with_keys

SITE = "https://news.example.org"
TEXT = "Hello {{ subscriber.name }} from {{ city }}.\n"
HTML = (
    "<html><body><p>Hello {{ subscriber.name }} &amp; {{ subscriber.fields.city }}</p>"
    "</body></html>"
)


@pytest.fixture(autouse=True)
def site(settings):
    with_keys(settings, SITE_URL=SITE)


@pytest.fixture
def weekly(db):
    return MailingList.objects.create(
        name="Weekly News & Views", slug="weekly", from_email=f"News <{SENDER}>"
    )


def make_campaign(mailing_list=None, **fields) -> Campaign:
    values = {
        "name": "Issue 1",
        "mailing_list": mailing_list,
        "subject": "Hi {{ subscriber.name }}, issue 1",
        "text_template": TEXT,
        "html_template": HTML,
        "status": Campaign.Status.RUNNING,
        "started_at": timezone.now(),
        **fields,
    }
    return Campaign.objects.create(**values)


def recipient(campaign, address="ann@example.net", name="Ann <Lee>", **fields):
    subscriber = None
    if campaign.mailing_list is not None:
        subscriber, _ = Subscriber.objects.get_or_create(
            mailing_list=campaign.mailing_list,
            email=address,
            defaults={"status": Subscriber.Status.ACTIVE, "name": name},
        )
    return CampaignRecipient.objects.create(
        campaign=campaign,
        subscriber=subscriber,
        email=address,
        name=name,
        fields={"city": "Lyon"},
        **fields,
    )


def parsed(message) -> email.message.EmailMessage:
    return email.message_from_bytes(message.message().as_bytes(), policy=policy.default)


def bodies(msg: email.message.EmailMessage) -> tuple[str, str]:
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    return (text.get_content() if text else ""), (html.get_content() if html else "")


def unsubscribe_link(msg) -> str:
    return re.search(r"<(https://[^>]+)>", msg["List-Unsubscribe"]).group(1)


# --- rendered messages ------------------------------------------------------------------------


def test_message_has_every_header_gmail_asks_of_bulk_senders(weekly):
    campaign = make_campaign(weekly, reply_to="replies@example.com")
    message = Renderer(campaign).message(recipient(campaign))
    msg = parsed(message)

    link = unsubscribe_link(msg)
    assert link.startswith(f"{SITE}/newsletters/unsubscribe/")
    token = unquote(urlsplit(link).path.rstrip("/").rsplit("/", 1)[1])
    assert tokens.read_unsubscribe_token(token) == (campaign.pk, "ann@example.net")
    # Django < 6.1 (the compat32 email policy) may fold before the first URL: still one URL a line
    assert msg["List-Unsubscribe"].strip() == (
        f"<{link}>, <mailto:{SENDER}?subject=unsubscribe%20{token.replace(':', '%3A')}>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["List-Id"] == "Weekly News & Views <weekly.news.example.org>"
    assert re.fullmatch(r"<[^@<>]+@news\.example\.org>", msg["Message-ID"])
    assert msg["From"] == f"News <{SENDER}>"
    assert msg["Reply-To"] == "replies@example.com"
    assert msg["To"] == "ann@example.net"
    # Rendered for this recipient: the subject and text unescaped, the HTML escaped.
    assert msg["Subject"] == "Hi Ann <Lee>, issue 1"
    text, html = bodies(msg)
    assert text.startswith("Hello Ann <Lee> from Lyon.")
    assert "Hello Ann &lt;Lee&gt; &amp; Lyon" in html
    assert message.gmail_priority == Priority.BULK


def test_headers_reach_gmail_unencoded_and_with_their_own_message_ids(weekly, sandbox, account):
    """Through the real backend: a long unsubscribe URL must not become RFC 2047 encoded
    words (the stdlib's folding does that to a long word), or no client can use it."""
    weekly.name = "Lettre d'été"
    weekly.save()
    campaign = make_campaign(weekly)
    renderer = Renderer(campaign)
    long_address = "a-rather-long-local-part-for-folding@a-long-subdomain.example.net"
    long_recipient = recipient(campaign, long_address)
    messages = [renderer.message(long_recipient) for _ in range(2)]
    assert GmailSMTPBackend().send_messages(messages) == 2

    delivered = sandbox.wait_for(2)
    raw = delivered[0].data.decode("ascii")
    headers = raw.split("\r\n\r\n", 1)[0]
    link = unsubscribe_link(parsed(messages[0]))
    assert len(link) > 78
    # Each URL whole on its line (Django < 6.1 may fold before the first one as well).
    folded = re.escape(f"<{link}>,\r\n <mailto:{SENDER}?subject=unsubscribe%20")
    assert re.search(rf"\r\nList-Unsubscribe:(?: \r\n)? {folded}", headers), headers
    assert "List-Unsubscribe: =?" not in headers
    assert "\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in headers
    assert delivered[0].message["List-Id"] == "Lettre d'été <weekly.news.example.org>"
    ids = [d.message["Message-ID"] for d in delivered]
    assert len(set(ids)) == 2 and all(i.endswith("@news.example.org>") for i in ids)


def test_each_message_has_its_own_message_id(weekly):
    campaign = make_campaign(weekly)
    renderer = Renderer(campaign)
    first, second = recipient(campaign), recipient(campaign, "bob@example.net", "Bob")
    ids = [parsed(renderer.message(r))["Message-ID"] for r in (first, second, first, second)] + [
        parsed(renderer.test_message("seed@example.net"))["Message-ID"]
    ]
    assert len(set(ids)) == 5


def test_a_visible_unsubscribe_link_is_added_when_the_template_has_none(weekly):
    campaign = make_campaign(weekly)
    msg = parsed(Renderer(campaign).message(recipient(campaign)))
    link = unsubscribe_link(msg)
    text, html = bodies(msg)
    assert text.rstrip().endswith(f"Unsubscribe: {link}")
    # In the HTML too, inside the body.
    assert html.index(f'href="{link}"') < html.index("</body>")


def test_no_second_link_when_the_template_links_the_unsubscribe_page(weekly):
    campaign = make_campaign(
        weekly,
        text_template="Bye: {{ unsubscribe_url }}",
        html_template='<a href="{{ unsubscribe_url }}">Leave</a>',
    )
    msg = parsed(Renderer(campaign).message(recipient(campaign)))
    link = unsubscribe_link(msg)
    text, html = bodies(msg)
    assert text.strip() == f"Bye: {link}"
    assert html.count(link.split("/unsubscribe/")[1]) == 1


def test_a_queryset_audience_gets_a_list_id_of_its_own_and_the_default_from(db, settings):
    campaign = make_campaign(None, name="Users' news", html_template="")
    msg = parsed(Renderer(campaign).message(recipient(campaign, "user@example.net", "U")))
    assert msg["List-Id"] == f"Users' news <campaign-{campaign.pk}.news.example.org>"
    assert msg["From"] == settings.DEFAULT_FROM_EMAIL
    assert f"mailto:{settings.DEFAULT_FROM_EMAIL}?" in msg["List-Unsubscribe"]
    assert msg.get_body(("html",)) is None


def test_test_message_is_marked_and_preview_uses_a_sample(weekly):
    Subscriber.objects.create(mailing_list=weekly, email="x@example.net", fields={"city": "Nice"})
    campaign = make_campaign(weekly)
    renderer = Renderer(campaign)
    msg = parsed(renderer.test_message("seed@example.net"))
    assert msg["Subject"].startswith("[Test] Hi")
    assert msg["To"] == "seed@example.net"
    preview = renderer.preview()
    assert preview["subject"] == "Hi Sample Subscriber, issue 1"
    assert "from [city]." in preview["text"]  # where the merge field goes
    mine = renderer.preview(Subscriber.objects.get(email="x@example.net"))
    assert "from Nice." in mine["text"]


@pytest.mark.parametrize(
    ("fields", "part", "django_error"),
    [
        ({"subject": "Hi {% if %}"}, "subject", "Unexpected end of expression"),
        ({"text_template": "{{ name|nosuchfilter }}"}, "text", "Invalid filter: 'nosuchfilter'"),
        ({"html_template": "{% include 'nowhere/x.html' %}"}, "HTML", "nowhere/x.html"),
    ],
)
def test_template_errors_are_plain_messages_naming_the_template(weekly, fields, part, django_error):
    campaign = make_campaign(weekly, **fields)
    with pytest.raises(TemplateProblem) as caught:
        Renderer(campaign).message(recipient(campaign))
    message = str(caught.value)
    assert message.startswith(f"The {part} template has an error:")
    assert django_error in message


def test_without_a_site_address_links_fail_plainly_and_a_check_says_so(weekly, settings):
    with_keys(settings, SITE_URL=None)  # and django.contrib.sites is not installed here
    campaign = make_campaign(weekly)
    with pytest.raises(render.SiteURLNotConfigured, match=r'GMAIL_SMTP\["SITE_URL"\]'):
        Renderer(campaign).message(recipient(campaign))
    assert "gmail_smtp_newsletters.E001" in [m.id for m in run_checks()]
    with_keys(settings, SITE_URL="http://news.example.org")
    ids = [m.id for m in run_checks()]
    assert "gmail_smtp_newsletters.W001" in ids and "gmail_smtp_newsletters.E001" not in ids


def active_users():
    from django.contrib.auth.models import User

    return User.objects.filter(is_active=True)


NOT_CALLABLE = 42


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("tests.test_newsletter_public.active_users", None),
        ("tests.test_newsletter_public.no_such_function", "gmail_smtp_newsletters.E002"),
        ("tests.no_such_module.users", "gmail_smtp_newsletters.E002"),
        ("tests.test_newsletter_public", "gmail_smtp_newsletters.E003"),  # a module
        ("tests.audience_broken.users", "gmail_smtp_newsletters.E002"),  # raises at import
        ("tests.test_newsletter_public.NOT_CALLABLE", "gmail_smtp_newsletters.E003"),
    ],
)
def test_a_check_says_when_an_audience_path_does_not_import(db, settings, path, error):
    with_keys(settings, NEWSLETTER_AUDIENCES={"members": path})
    found = [m for m in run_checks() if m.id.startswith("gmail_smtp_newsletters.E00")]
    assert [m.id for m in found] == ([error] if error else [])
    if error:
        assert "'members'" in found[0].msg and path in found[0].msg and found[0].hint


# --- tokens -----------------------------------------------------------------------------------


def test_unsubscribe_tokens_read_back_and_refuse_tampering():
    token = tokens.unsubscribe_token(7, " Ann@Example.net ")
    assert tokens.read_unsubscribe_token(token) == (7, "ann@example.net")
    value, signature = token.rsplit(":", 1)
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for bad in (f"{value}:{flipped}", token[:-3], "garbage", "", "a:b:c", token + "x"):
        assert tokens.read_unsubscribe_token(bad) is None
    # Another salt's signature over the same value is not an unsubscribe token.
    other = signing.Signer(salt="other").sign_object([7, "ann@example.net"], compress=True)
    assert tokens.read_unsubscribe_token(other) is None


def test_unsubscribe_tokens_survive_secret_key_rotation(settings):
    old = settings.SECRET_KEY
    token = tokens.unsubscribe_token(3, "ann@example.net")
    settings.SECRET_KEY = "a-brand-new-secret-key-0123456789-abcdefghij"
    settings.SECRET_KEY_FALLBACKS = [old]
    assert tokens.read_unsubscribe_token(token) == (3, "ann@example.net")
    settings.SECRET_KEY_FALLBACKS = []
    assert tokens.read_unsubscribe_token(token) is None


def test_confirm_tokens_expire(weekly):
    subscriber = Subscriber.objects.create(mailing_list=weekly, email="ann@example.net")
    token = tokens.confirm_token(subscriber)
    assert tokens.read_confirm_token(token) == (subscriber.pk, "ann@example.net")
    assert tokens.read_confirm_token(token, max_age=-1) is None
    # Not interchangeable with an unsubscribe token.
    assert tokens.read_unsubscribe_token(token) is None
    assert tokens.read_confirm_token(tokens.unsubscribe_token(1, "a@b.example")) is None


# --- one-click unsubscribe --------------------------------------------------------------------


@pytest.fixture
def browserless():
    """A client as a mailbox provider posting one-click unsubscribes: CSRF checks on, and
    (a new client per request) no cookies."""
    return lambda: Client(enforce_csrf_checks=True)


@pytest.fixture
def unsubscribed_signals():
    received = []

    def receiver(sender, **kwargs):
        received.append(kwargs)

    signals.subscriber_unsubscribed.connect(receiver)
    yield received
    signals.subscriber_unsubscribed.disconnect(receiver)


def snapshot():
    """What an unsubscribe could change."""
    return (
        sorted(Suppression.objects.values_list("email", "mailing_list_id", "reason")),
        sorted(Subscriber.objects.values_list("email", "status")),
        sorted(CampaignRecipient.objects.values_list("email", "status")),
        sorted(OutboundEmail.objects.values_list("pk", "status")),
    )


@pytest.fixture
def running(weekly, account, no_dispatch):
    """A running campaign: Ann waits, her second message (another campaign) sits queued in
    the outbox, Bob is queued too."""
    campaign = make_campaign(weekly)
    ann = recipient(campaign)
    later = make_campaign(weekly, name="Issue 2")
    ann_queued = recipient(
        later,
        status=CampaignRecipient.Status.QUEUED,
        outbound=queued_row(account, to=["ann@example.net"]),
    )
    bob = recipient(
        campaign,
        "bob@example.net",
        "Bob",
        status=CampaignRecipient.Status.QUEUED,
        outbound=queued_row(account, to=["bob@example.net"]),
    )
    return campaign, ann, ann_queued, bob


def assert_plain_200(response):
    assert response.status_code == 200  # not a redirect, whatever the token
    assert "Location" not in response
    assert not response.cookies
    assert "no-store" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_one_click_post_without_cookies_unsubscribes(running, browserless, unsubscribed_signals):
    campaign, ann, ann_queued, bob = running
    msg = parsed(Renderer(campaign).message(ann))
    path = urlsplit(unsubscribe_link(msg)).path

    response = browserless().post(
        path, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded"
    )

    assert_plain_200(response)
    assert b"You are unsubscribed" in response.content
    suppression = Suppression.objects.get(email="ann@example.net")
    assert (suppression.mailing_list, suppression.reason) == (
        campaign.mailing_list,
        Suppression.Reason.UNSUBSCRIBED,
    )
    assert suppression.campaign == campaign
    assert "one-click" in suppression.detail
    subscription = Subscriber.objects.get(email="ann@example.net")
    assert subscription.status == Subscriber.Status.UNSUBSCRIBED
    assert subscription.unsubscribed_at is not None
    # Nothing more goes out to her: what waited is suppressed, what was queued is cancelled.
    ann.refresh_from_db()
    ann_queued.refresh_from_db()
    assert ann.status == CampaignRecipient.Status.SUPPRESSED
    assert ann_queued.status == CampaignRecipient.Status.SUPPRESSED
    assert ann_queued.outbound.status == OutboundEmail.Status.CANCELLED
    # Bob is untouched.
    bob.refresh_from_db()
    assert bob.status == CampaignRecipient.Status.QUEUED
    assert bob.outbound.status == OutboundEmail.Status.QUEUED
    assert Subscriber.objects.get(email="bob@example.net").status == Subscriber.Status.ACTIVE
    assert [(s["email"], s["how"]) for s in unsubscribed_signals] == [
        ("ann@example.net", subscribers.UnsubscribeMethod.ONE_CLICK)
    ]

    # Again (mailbox providers retry): the same answer, nothing new, no second signal.
    before = snapshot()
    assert_plain_200(
        browserless().post(
            path, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded"
        )
    )
    assert snapshot() == before
    assert len(unsubscribed_signals) == 1


def test_a_later_campaign_skips_an_unsubscribed_address(running, browserless):
    campaign, ann, *_ = running
    path = urlsplit(unsubscribe_link(parsed(Renderer(campaign).message(ann)))).path
    browserless().post(path)
    later = make_campaign(
        campaign.mailing_list, name="Issue 3", status=Campaign.Status.DRAFT, started_at=None
    )
    later.start()
    enrolled = set(later.recipients.values_list("email", flat=True))
    assert "bob@example.net" in enrolled and "ann@example.net" not in enrolled


def test_the_page_button_post_unsubscribes_too(running, browserless):
    campaign, ann, *_ = running
    path = urlsplit(unsubscribe_link(parsed(Renderer(campaign).message(ann)))).path
    response = browserless().post(path)  # the page's form: no body, no CSRF token
    assert_plain_200(response)
    assert f"ann@example.net will get no more of {escape(campaign.mailing_list.name)}." in (
        response.content.decode()
    )
    suppression = Suppression.objects.get(email="ann@example.net")
    assert "unsubscribe page" in suppression.detail


def test_get_shows_a_confirmation_page_and_changes_nothing(running, browserless):
    campaign, ann, *_ = running
    path = urlsplit(unsubscribe_link(parsed(Renderer(campaign).message(ann)))).path
    before = snapshot()
    response = browserless().get(path)
    assert_plain_200(response)
    assert b'<form method="post">' in response.content
    assert f"Stop sending {escape(campaign.mailing_list.name)} to ann@example.net?" in (
        response.content.decode()
    )
    assert_plain_200(browserless().head(path))
    assert snapshot() == before


def test_a_test_send_and_a_preview_carry_links_that_unsubscribe_nobody(running, browserless):
    campaign, ann, *_ = running
    renderer = Renderer(campaign)
    test_send = parsed(renderer.test_message("ann@example.net"))
    preview_link = re.search(r"Unsubscribe: (\S+)", renderer.preview(ann)["text"]).group(1)
    real_path = urlsplit(unsubscribe_link(parsed(renderer.message(ann)))).path
    for link in (unsubscribe_link(test_send), preview_link):
        path = urlsplit(link).path
        assert path != real_path
        before = snapshot()
        page = browserless().get(path)
        assert_plain_200(page)
        assert "it unsubscribes nobody" in page.content.decode()
        done = browserless().post(
            path, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded"
        )
        assert_plain_200(done)
        assert "nothing was changed for ann@example.net" in done.content.decode()
        assert snapshot() == before
    # The mailto half of a test send's header changes nothing either.
    token = unquote(re.search(r"subject=unsubscribe%20([^>]+)>", test_send["List-Unsubscribe"])[1])
    assert subscribers.unsubscribe(token) is False
    assert snapshot() == before


@pytest.mark.parametrize("kind", ["tampered", "garbage", "unknown campaign address"])
def test_a_bad_token_answers_200_and_changes_nothing(running, browserless, kind):
    campaign, *_ = running
    token = tokens.unsubscribe_token(campaign, "ann@example.net")
    value, signature = token.rsplit(":", 1)
    bad = {
        "tampered": f"{value}:{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}",
        "garbage": "not-a-token",
        # A valid-looking token signed with another key: someone forging links.
        "unknown campaign address": signing.Signer(
            key="not-our-key", salt=tokens.UNSUBSCRIBE_SALT
        ).sign_object([campaign.pk, "ann@example.net"], compress=True),
    }[kind]
    before = snapshot()
    path = reverse("gmail_smtp_newsletters:unsubscribe", args=[bad])
    response = browserless().post(
        path, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded"
    )
    assert_plain_200(response)
    assert b"does not work" in response.content
    assert_plain_200(browserless().get(path))
    assert snapshot() == before


def test_unsubscribing_from_a_queryset_campaign_suppresses_everywhere(weekly, browserless):
    Subscriber.objects.create(
        mailing_list=weekly, email="ann@example.net", status=Subscriber.Status.ACTIVE
    )
    campaign = make_campaign(None, name="To users")
    token = tokens.unsubscribe_token(campaign, "ann@example.net")
    assert_plain_200(
        browserless().post(reverse("gmail_smtp_newsletters:unsubscribe", args=[token]))
    )
    suppression = Suppression.objects.get(email="ann@example.net")
    assert suppression.mailing_list is None
    assert Subscriber.objects.get(email="ann@example.net").status == "unsubscribed"


# --- subscribe and confirm --------------------------------------------------------------------


def post_form(client, path, **data):
    """Post a form the way a browser does: the page first (its CSRF cookie), then the form."""
    client.get(path)
    data["csrfmiddlewaretoken"] = client.cookies["csrftoken"].value
    return client.post(path, data)


def test_double_opt_in_end_to_end_through_the_sandbox(weekly, sandbox, account):
    client = Client(enforce_csrf_checks=True)
    path = reverse("gmail_smtp_newsletters:subscribe", args=["weekly"])
    # Without the CSRF token the form is refused.
    assert (
        Client(enforce_csrf_checks=True).post(path, {"email": "x@example.net"}).status_code == 403
    )

    response = post_form(client, path, email="New.Reader@Example.net", name="New Reader")

    assert response.status_code == 200
    assert b"Check your inbox" in response.content
    subscriber = Subscriber.objects.get(email="new.reader@example.net")
    assert subscriber.status == Subscriber.Status.PENDING
    assert subscriber.consent_method == Subscriber.Consent.FORM
    assert subscriber.consent_at is not None
    assert f"http://testserver{path} from 127.0.0.1" == subscriber.consent_source
    [delivered] = sandbox.wait_for(1)
    assert delivered.rcpt_tos == ["new.reader@example.net"]
    assert delivered.subject == "Confirm your subscription to Weekly News & Views"
    body = delivered.message.get_body(("plain",)).get_content()
    link = re.search(rf"{re.escape(SITE)}(/newsletters/confirm/[^/\s]+/)", body).group(1)

    page = client.get(link)  # what a link scanner does: nothing happens
    assert page.status_code == 200 and b'<form method="post">' in page.content
    subscriber.refresh_from_db()
    assert subscriber.status == Subscriber.Status.PENDING

    done = Client(enforce_csrf_checks=True).post(link)
    assert done.status_code == 200 and b"Subscription confirmed" in done.content
    subscriber.refresh_from_db()
    assert subscriber.status == Subscriber.Status.ACTIVE
    assert subscriber.confirmed_at is not None


def test_a_confirmation_that_cannot_be_sent_is_said_and_can_be_retried(
    weekly, sandbox, make_account
):
    path = reverse("gmail_smtp_newsletters:subscribe", args=["weekly"])
    # No sender account yet: the site's mail cannot go out.
    response = post_form(Client(enforce_csrf_checks=True), path, email="ann@example.net")
    assert response.status_code == 503
    assert b"could not send the confirmation email" in response.content
    assert Subscriber.objects.get().status == Subscriber.Status.PENDING

    make_account(sandbox)
    response = post_form(Client(enforce_csrf_checks=True), path, email="ann@example.net")
    assert response.status_code == 200
    [delivered] = sandbox.wait_for(1)
    assert delivered.rcpt_tos == ["ann@example.net"]


@pytest.fixture
def locmem(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    mail.outbox.clear()
    return mail.outbox


def test_subscribing_again_looks_the_same_and_sends_nothing(weekly, locmem):
    Subscriber.objects.create(
        mailing_list=weekly, email="old@example.net", status=Subscriber.Status.ACTIVE
    )
    path = reverse("gmail_smtp_newsletters:subscribe", args=["weekly"])
    new = post_form(Client(enforce_csrf_checks=True), path, email="someone@example.net")
    known = post_form(Client(enforce_csrf_checks=True), path, email="old@example.net")
    assert (new.status_code, new.content) == (known.status_code, known.content)
    assert [m.to for m in locmem] == [["someone@example.net"]]
    assert Subscriber.objects.get(email="old@example.net").status == Subscriber.Status.ACTIVE
    # A pending address asking again at once gets no second mail either (no mail flood).
    post_form(Client(enforce_csrf_checks=True), path, email="someone@example.net")
    assert len(locmem) == 1


def test_an_unsubscribed_address_is_back_only_once_it_confirms(weekly, locmem):
    weekly.double_opt_in = False  # even on a single opt-in list
    weekly.save()
    campaign = make_campaign(weekly)
    Subscriber.objects.create(
        mailing_list=weekly, email="ann@example.net", status=Subscriber.Status.ACTIVE
    )
    assert subscribers.unsubscribe(tokens.unsubscribe_token(campaign, "ann@example.net"))

    subscriber = subscribers.subscribe(weekly, "ann@example.net", source="test")
    assert subscriber.status == Subscriber.Status.PENDING
    assert Suppression.objects.filter(email="ann@example.net").exists()
    [confirmation] = locmem
    token = re.search(r"/confirm/([^/\s]+)/", confirmation.body).group(1)

    assert subscribers.confirm(token) == subscriber
    subscriber.refresh_from_db()
    assert subscriber.status == Subscriber.Status.ACTIVE
    assert not Suppression.objects.filter(email="ann@example.net").exists()
    # A new address on a single opt-in list is active at once, with no mail.
    assert subscribers.subscribe(weekly, "bob@example.net").status == Subscriber.Status.ACTIVE
    assert len(locmem) == 1


def test_bad_input_on_the_subscribe_form(weekly, locmem):
    path = reverse("gmail_smtp_newsletters:subscribe", args=["weekly"])
    response = post_form(Client(enforce_csrf_checks=True), path, email="not an address")
    assert response.status_code == 400
    assert b"Enter a valid email address" in response.content
    # A bot filling the hidden field is answered as a person, and nothing happens.
    bot = post_form(Client(enforce_csrf_checks=True), path, email="b@example.net", website="x")
    assert bot.status_code == 200
    assert not Subscriber.objects.exists() and not locmem
    assert (
        Client().get(reverse("gmail_smtp_newsletters:subscribe", args=["nope"])).status_code == 404
    )


def test_confirm_refuses_bad_and_stale_tokens(weekly):
    assert subscribers.confirm("garbage") is None
    subscriber = Subscriber.objects.create(mailing_list=weekly, email="ann@example.net")
    token = tokens.confirm_token(subscriber)
    Subscriber.objects.filter(pk=subscriber.pk).update(status=Subscriber.Status.UNSUBSCRIBED)
    assert subscribers.confirm(token) is None
    response = Client().post(reverse("gmail_smtp_newsletters:confirm", args=["garbage"]))
    assert response.status_code == 200 and b"does not work" in response.content


# --- archive ----------------------------------------------------------------------------------


def test_archive_shows_started_campaigns_without_personal_data(weekly):
    campaign = make_campaign(
        weekly,
        html_template="",
        text_template="For {{ subscriber.email }}. Leave: {{ unsubscribe_url }}",
    )
    recipient(campaign)
    response = Client().get(reverse("gmail_smtp_newsletters:archive", args=[campaign.pk]))
    assert response.status_code == 200
    content = response.content.decode()
    assert "Hi , issue 1" in content
    assert "ann@example.net" not in content and "Ann" not in content
    assert "/unsubscribe/" not in content
    assert render.archive_url(campaign) == f"{SITE}/newsletters/archive/{campaign.pk}/"


@pytest.mark.parametrize(
    "fields",
    [
        {"status": Campaign.Status.DRAFT, "started_at": None},
        {"archive": False},
    ],
)
def test_archive_is_404_for_drafts_and_unarchived_campaigns(weekly, fields):
    campaign = make_campaign(weekly, **fields)
    response = Client().get(reverse("gmail_smtp_newsletters:archive", args=[campaign.pk]))
    assert response.status_code == 404


def test_the_subscribe_forms_send_at_most_the_hourly_cap_of_confirmations(
    weekly, locmem, settings, caplog
):
    """A script filling in the form with many addresses cannot use up the quota that password
    resets need: past NEWSLETTER_CONFIRMATIONS_PER_HOUR the form asks to come back later."""
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "NEWSLETTER_CONFIRMATIONS_PER_HOUR": 3}
    path = reverse("gmail_smtp_newsletters:subscribe", args=["weekly"])
    answers = [
        post_form(Client(enforce_csrf_checks=True), path, email=f"victim{i}@example.net")
        for i in range(5)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 503, 503]
    assert b"try again in an hour" in answers[3].content
    assert len(locmem) == 3
    assert "NEWSLETTER_CONFIRMATIONS_PER_HOUR" in caplog.text
    # Nothing is lost: the sign-up waits, and is mailed once the hour has room again.
    late = Subscriber.objects.get(email="victim3@example.net")
    assert late.status == Subscriber.Status.PENDING
    Subscriber.objects.filter(email__in=["victim0@example.net", "victim1@example.net"]).update(
        consent_at=timezone.now() - timedelta(hours=2)
    )
    again = post_form(Client(enforce_csrf_checks=True), path, email="victim3@example.net")
    assert again.status_code == 200
    assert locmem[-1].to == ["victim3@example.net"]
