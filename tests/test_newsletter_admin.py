"""The newsletters' admin: every page as three kinds of user, the query-string guard on every
changelist, the CSV import, preview, test send, and start/pause/resume/cancel/retry."""

from __future__ import annotations

import io
import re
from urllib.parse import urlencode

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from django_gmail_smtp.models import OutboundEmail
from django_gmail_smtp.newsletters import imports, planner
from django_gmail_smtp.newsletters.models import (
    Campaign,
    CampaignRecipient,
    MailingList,
    Subscriber,
    Suppression,
)

from .conftest import SENDER
from .factories import staff_user, with_keys
from .test_admin_security import PROBES, refused

pytestmark = pytest.mark.django_db

APP = "gmail_smtp_newsletters"
VIEW_ONLY = (
    "view_mailinglist",
    "view_subscriber",
    "view_campaign",
    "view_campaignrecipient",
    "view_suppression",
)
USERS = {
    "superuser": lambda: staff_user("root", superuser=True),
    "viewer": lambda: staff_user("viewer", *VIEW_ONLY),
    "no_permission": lambda: staff_user("nobody"),
}
SITE = "https://news.example.org"


def url(name: str, *args) -> str:
    return reverse(f"admin:{APP}_{name}", args=args)


@pytest.fixture
def site(settings):
    with_keys(settings, SITE_URL=SITE)
    return settings


@pytest.fixture
def news(site, account):
    """A list with three subscribers (two active), one address suppressed, a draft campaign
    and a running one (started, so it has recipients)."""
    mailing_list = MailingList.objects.create(name="News", slug="news", from_email=SENDER)
    for email, name, status in (
        ("ann@example.net", "Ann", Subscriber.Status.ACTIVE),
        ("bob@example.net", "Bob", Subscriber.Status.ACTIVE),
        ("cy@example.net", "Cy", Subscriber.Status.PENDING),
    ):
        Subscriber.objects.create(
            mailing_list=mailing_list,
            email=email,
            name=name,
            status=status,
            fields={"city": "Lyon"},
        )
    Suppression.objects.create(email="gone@example.net", reason=Suppression.Reason.MANUAL)
    draft = Campaign.objects.create(
        name="Spring letter",
        mailing_list=mailing_list,
        subject="Hello {{ subscriber.name }}",
        text_template="Dear {{ subscriber.name }} from {{ subscriber.fields.city }}.",
        html_template="<p>Dear <b>{{ subscriber.name }}</b></p>",
        seed_emails="seed@example.net",
    )
    running = Campaign.objects.create(
        name="Winter letter",
        mailing_list=mailing_list,
        subject="Winter",
        text_template="Cold, {{ subscriber.name }}.",
    )
    running.start()
    return {"list": mailing_list, "draft": draft, "running": running}


# --- every page, every user ----------------------------------------------------------------------


def get_pages(news) -> list[tuple[str, str, str]]:
    """(name, url, kind): kind says who may see it: "view" (anyone with the view
    permissions), "add", "import", "send" (send_campaign), or "never"."""
    subscriber = Subscriber.objects.first()
    suppression = Suppression.objects.first()
    recipient = CampaignRecipient.objects.first()
    draft, running, mailing_list = news["draft"], news["running"], news["list"]
    pages = [("app index", reverse("admin:app_list", args=[APP]), "view")]
    for model, obj in (
        ("mailinglist", mailing_list),
        ("subscriber", subscriber),
        ("campaign", draft),
        ("campaign", running),
        ("campaignrecipient", recipient),
        ("suppression", suppression),
    ):
        pages.append((f"{model} list", url(f"{model}_changelist"), "view"))
        pages.append((f"{model} change", url(f"{model}_change", obj.pk), "view"))
        pages.append((f"{model} history", url(f"{model}_history", obj.pk), "view"))
        add = "never" if model == "campaignrecipient" else "add"
        pages.append((f"{model} add", url(f"{model}_add"), add))
    pages += [
        ("import", url("mailinglist_import", mailing_list.pk), "import"),
        ("preview draft", url("campaign_preview", draft.pk), "view"),
        (
            "preview as bob",
            url("campaign_preview", draft.pk) + f"?subscriber={subscriber.pk}",
            "view",
        ),
        ("preview running", url("campaign_preview", running.pk), "view"),
        ("start confirm", url("campaign_start", draft.pk), "send"),
        (
            "recipients of running",
            url("campaignrecipient_changelist") + f"?campaign__id__exact={running.pk}",
            "view",
        ),
    ]
    return pages


@pytest.mark.parametrize("who", USERS)
def test_every_page_as_each_user(client, news, who):
    """Superuser: 200 everywhere it makes sense; viewer: 200 on what it may view, read-only,
    403 on the rest; staff without the app's permissions: 403 on every page."""
    client.force_login(USERS[who]())
    for name, address, kind in get_pages(news):
        response = client.get(address)
        if who == "superuser":
            expected = 403 if kind == "never" else 200
        elif who == "viewer":
            expected = 200 if kind == "view" else 403
        else:
            expected = 403 if "index" not in name else 404
        assert response.status_code == expected, (name, who, response.status_code)
        if who == "viewer" and kind == "view" and "change" in name:
            page = response.content.decode()
            assert 'name="_save"' not in page, name  # read-only
            assert "campaign_operation" not in page and "test-send" not in page, name


def test_viewer_sees_no_buttons_superuser_does(client, news):
    draft, running = news["draft"], news["running"]
    client.force_login(USERS["superuser"]())
    page = client.get(url("campaign_change", running.pk)).content.decode()
    assert "Retry failed" not in page  # nothing failed: nothing to retry
    running.recipients.filter(email="ann@example.net").update(status="failed")
    page = client.get(url("campaign_change", running.pk)).content.decode()
    for button in ("Pause", "Cancel campaign", "Retry failed", "Recipients", "Send test"):
        assert button in page, button
    assert "Start sending" in client.get(url("campaign_change", draft.pk)).content.decode()
    client.force_login(USERS["viewer"]())
    page = client.get(url("campaign_change", running.pk)).content.decode()
    assert "Recipients" in page and "Preview" in page
    for button in ("Pause", "Cancel campaign", "Retry failed", "Send test"):
        assert button not in page, button


POSTS = ("test_send", "start", "pause", "resume", "cancel", "retry-failed", "import")


def post_url(news, action: str) -> str:
    campaign = news["draft"] if action in ("test_send", "start") else news["running"]
    if action == "import":
        return url("mailinglist_import", news["list"].pk)
    if action in ("test_send", "start"):
        return url(f"campaign_{action}", campaign.pk)
    return url("campaign_operation", campaign.pk, action)


@pytest.mark.parametrize("who", ["viewer", "no_permission"])
def test_actions_refused_without_their_permission(client, news, who):
    """Every button's URL is 403 for the viewer and the user without permissions, GET or
    POST, and changes nothing."""
    client.force_login(USERS[who]())
    before = list(Campaign.objects.values_list("pk", "status", "domain_aligned"))
    for action in POSTS:
        address = post_url(news, action)
        assert client.get(address).status_code == 403, action
        assert client.post(address, {"domain_aligned": "on"}).status_code == 403, action
    assert list(Campaign.objects.values_list("pk", "status", "domain_aligned")) == before
    assert not Campaign.objects.filter(status=Campaign.Status.PAUSED).exists()


def test_changes_need_a_post(client, news):
    """GET on a button's URL changes nothing (405), even for a superuser."""
    client.force_login(USERS["superuser"]())
    for action in ("test_send", "pause", "cancel", "retry-failed"):
        assert client.get(post_url(news, action)).status_code == 405, action
    assert Campaign.objects.get(pk=news["running"].pk).status == Campaign.Status.RUNNING
    unknown = url("campaign_operation", news["running"].pk, "delete-everything")
    assert client.post(unknown).status_code == 403


def test_buttons_need_the_csrf_token(news):
    """The operation buttons are protected by Django's CSRF check."""
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(USERS["superuser"]())
    response = client.post(post_url(news, "pause"))
    assert response.status_code == 403
    assert Campaign.objects.get(pk=news["running"].pk).status == Campaign.Status.RUNNING


# --- query-string lookups ------------------------------------------------------------------------

RELATED = {"id__exact": "1", "isnull": "True"}
OFFERED = {
    "mailinglist": (MailingList, {"double_opt_in__exact": "1", "double_opt_in__isnull": "False"}),
    "subscriber": (
        Subscriber,
        {
            "status__exact": "active",
            "status__isnull": "False",
            "consent_method__exact": "import",
            "consent_method__isnull": "False",
            **{f"mailing_list__{k}": v for k, v in RELATED.items()},
        },
    ),
    "campaign": (
        Campaign,
        {
            "status__exact": "running",
            "status__isnull": "False",
            **{f"mailing_list__{k}": v for k, v in RELATED.items()},
        },
    ),
    "campaignrecipient": (
        CampaignRecipient,
        {
            "status__exact": "pending",
            "status__isnull": "False",
            **{f"campaign__{k}": v for k, v in RELATED.items()},
        },
    ),
    "suppression": (
        Suppression,
        {
            "reason__exact": "manual",
            "reason__isnull": "False",
            **{f"mailing_list__{k}": v for k, v in RELATED.items()},
        },
    ),
}


def probe_params(model) -> list[str]:
    params = []
    for field in model._meta.concrete_fields:
        params += [f"{field.name}__{lookup}" for lookup in PROBES] + [field.name]
    return params


@pytest.mark.parametrize("who", ["superuser", "viewer"])
@pytest.mark.parametrize("changelist", OFFERED)
def test_changelists_refuse_lookups_they_do_not_offer(client, news, who, changelist):
    """`?email__startswith=`, `?fields__contains=`, `?text_template__regex=`... are refused;
    the filters the changelist offers (and its search) work."""
    client.force_login(USERS[who]())
    model, offered = OFFERED[changelist]
    address = url(f"{changelist}_changelist")
    for param in probe_params(model):
        if param not in offered:
            response = client.get(address + "?" + urlencode({param: "a"}))
            assert refused(response), (changelist, param, response.status_code)
    for param, value in {**offered, "q": "example"}.items():
        response = client.get(address + "?" + urlencode({param: value}))
        assert response.status_code == 200, (changelist, param, response.status_code)


def test_recipients_filtered_by_campaign_link_to_the_outbox(client, news):
    """The recipients' changelist filtered to one campaign, with a link to each outbox row."""
    running = news["running"]
    recipient = running.recipients.get(email="ann@example.net")
    row = OutboundEmail.objects.create(
        account_email=SENDER, from_email=SENDER, recipients=[recipient.email], subject="Winter"
    )
    CampaignRecipient.objects.filter(pk=recipient.pk).update(
        outbound=row, status=CampaignRecipient.Status.QUEUED
    )
    other = Campaign.objects.create(
        name="Other", mailing_list=news["list"], subject="x", text_template="x"
    )
    CampaignRecipient.objects.create(campaign=other, email="zed@example.net")
    client.force_login(USERS["viewer"]())
    page = client.get(
        url("campaignrecipient_changelist") + f"?campaign__id__exact={running.pk}"
    ).content.decode()
    assert "ann@example.net" in page and "zed@example.net" not in page
    # The account and the outbox row are on the recipient's own page (the list fits 1280 px).
    page = client.get(url("campaignrecipient_change", recipient.pk)).content.decode()
    assert reverse("admin:django_gmail_smtp_outboundemail_change", args=[row.pk]) in page
    page = client.get(
        url("campaignrecipient_changelist") + "?status__exact=queued"
    ).content.decode()
    assert "ann@example.net" in page and "bob@example.net" not in page


def test_bounces_per_campaign_and_per_account(client, news):
    """The changelist's "bounced" column and the progress panel's per-account split count the
    recipients whose mail bounced; a finished campaign's panel says "finished" once (no pace
    repeating it)."""
    running = news["running"]
    running.recipients.update(status=CampaignRecipient.Status.SENT, account_email=SENDER)
    running.recipients.filter(email="ann@example.net").update(
        status=CampaignRecipient.Status.BOUNCED
    )
    client.force_login(USERS["viewer"]())
    listing = client.get(url("campaign_changelist")).content.decode()
    assert re.search(r'class="field-bounced_column">1 \(50\.0%\)<', listing), listing
    planner.tick()  # nothing waits: it finishes
    running.refresh_from_db()
    assert running.status == Campaign.Status.FINISHED
    page = client.get(url("campaign_change", running.pk)).content.decode()
    assert "<th>Bounced</th>" in page
    assert f"<tr><td>{SENDER}</td><td>1</td><td>0</td><td>1</td>" in page
    assert "<th>Pace</th>" not in page and "finished: 1 sent" not in page


# --- lists: counts and CSV import ----------------------------------------------------------------


def test_list_changelist_counts_subscribers_by_status(client, news):
    client.force_login(USERS["viewer"]())
    page = client.get(url("mailinglist_changelist")).content.decode()
    active = re.search(r'class="field-active_count">(\d+)<', page)
    pending = re.search(r'class="field-pending_count">(\d+)<', page)
    assert active and active.group(1) == "2"
    assert pending and pending.group(1) == "1"
    assert f"?mailing_list__id__exact={news['list'].pk}" in page


def upload(content: bytes, name: str = "people.csv") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="text/csv")


def test_import_through_the_admin(client, news):
    """BOM, semicolons, a repeat in the file, an address already on the list, a suppressed
    one, invalid ones: the report counts each and names the lines."""
    client.force_login(USERS["superuser"]())
    Suppression.objects.create(
        email="blocked@example.net", mailing_list=news["list"], reason=Suppression.Reason.MANUAL
    )
    content = (
        "\ufeffEmail;Name;City\r\n"
        "new1@example.net;New One;Paris\r\n"
        "NEW2@Example.NET;;Oslo\r\n"
        "new1@example.net;Again;Rome\r\n"
        "ann@example.net;Ann B;Nice\r\n"
        "gone@example.net;Gone;\r\n"
        "blocked@example.net;Blocked;\r\n"
        "not-an-address;Bad;\r\n"
        ";No address;\r\n"
        "\r\n"
    ).encode()
    response = client.post(
        url("mailinglist_import", news["list"].pk),
        {"file": upload(content), "activate": "on"},
    )
    assert response.status_code == 200
    report: imports.ImportReport = response.context["report"]
    assert (report.rows, report.added, report.updated, report.unchanged) == (8, 2, 1, 0)
    assert report.skipped == {
        "duplicate": 1,
        "suppressed": 2,
        "invalid": 1,
        "empty": 1,
    }
    assert report.merge_fields == ["city"]
    page = response.content.decode()
    assert "not-an-address" in page and "the same address is on an earlier line" in page
    assert "on the suppression list" in page
    new = Subscriber.objects.get(email="new2@example.net")
    assert new.status == Subscriber.Status.ACTIVE and new.fields == {"city": "Oslo"}
    assert new.consent_method == Subscriber.Consent.IMPORT
    assert new.consent_source.startswith("people.csv, imported by root on ")
    assert new.consent_at is not None
    ann = Subscriber.objects.get(email="ann@example.net")
    assert (ann.name, ann.fields) == ("Ann B", {"city": "Nice"})
    assert not Subscriber.objects.filter(email__in=["gone@example.net", "blocked@example.net"])
    assert Subscriber.objects.get(email="new1@example.net").name == "New One"  # first line wins


def test_import_without_activate_awaits_confirmation(client, news):
    client.force_login(USERS["superuser"]())
    response = client.post(
        url("mailinglist_import", news["list"].pk),
        {"file": upload(b"email,name\nfresh@example.net,Fresh\ncy@example.net,Cy\n")},
    )
    assert response.status_code == 200
    fresh = Subscriber.objects.get(email="fresh@example.net")
    assert fresh.status == Subscriber.Status.PENDING and fresh.consent_at is None
    assert Subscriber.objects.get(email="cy@example.net").status == Subscriber.Status.PENDING
    assert response.context["report"].unchanged == 1


def test_import_sends_confirmation_mail_when_asked(client, news, sandbox):
    sandbox.bad_recipients = {"refused@example.net"}
    client.force_login(USERS["superuser"]())
    page = client.get(url("mailinglist_import", news["list"].pk)).content.decode()
    assert "Send them the confirmation mail" in page
    content = b"email,name\nfresh@example.net,Fresh\nrefused@example.net,No\ncy@example.net,Cy\n"
    response = client.post(
        url("mailinglist_import", news["list"].pk),
        {"file": upload(content), "send_confirmations": "on"},
    )
    report = response.context["report"]
    assert (report.added, report.confirmations_sent, report.confirmations_failed) == (2, 1, 1)
    page = response.content.decode()
    assert "Confirmation mail sent to 1 person; not sent to 1" in page
    assert "refused@example.net: " in page
    [delivered] = sandbox.wait_for(1)
    assert delivered.rcpt_tos == ["fresh@example.net"]  # cy was on the list already
    assert "/newsletters/confirm/" in delivered.data.decode()
    # Subscribing now and mailing a confirmation contradict each other: refused, nothing done.
    response = client.post(
        url("mailinglist_import", news["list"].pk),
        {
            "file": upload(b"email\nlate@example.net\n"),
            "activate": "on",
            "send_confirmations": "on",
        },
    )
    assert "Choose one: subscribe them now" in response.content.decode()
    assert not Subscriber.objects.filter(email="late@example.net").exists()


def test_import_refuses_a_file_it_cannot_read_and_changes_nothing(client, news):
    client.force_login(USERS["superuser"]())
    address = url("mailinglist_import", news["list"].pk)
    before = Subscriber.objects.count()
    for content, words in (
        (b"name,city\nAnn,Lyon\n", "no email column"),
        (b"", "The file is empty"),  # Django refuses an empty upload itself
        (b"email\nok@example.net\nn\xe9e@example.net\n", "Line 3 of the file is not UTF-8"),
    ):
        response = client.post(address, {"file": upload(content)})
        assert response.status_code == 200
        page = response.content.decode()
        assert "errorlist" in page, words
        if content:
            assert words in page, words
    assert Subscriber.objects.count() == before


def test_import_keeps_unsubscribed_people_out(news):
    Subscriber.objects.filter(email="bob@example.net").update(status=Subscriber.Status.UNSUBSCRIBED)
    report = imports.import_csv(
        news["list"], io.BytesIO(b"email\nbob@example.net\n"), activate=True, source="t"
    )
    assert report.skipped == {"unsubscribed": 1}
    assert Subscriber.objects.get(email="bob@example.net").status == "unsubscribed"


def test_import_streams_a_large_file(news):
    """10,000+ rows, commas, quoted names with commas; progress reported along the way."""
    lines = ["email,name,plan"] + [
        f'user{i}@example.org,"Doe, Jane {i}",gold' for i in range(12_000)
    ]
    seen: list[int] = []
    report = imports.import_csv(
        news["list"],
        io.BytesIO("\n".join(lines).encode()),
        activate=False,
        source="big.csv",
        progress=seen.append,
    )
    assert report.added == 12_000 and report.skipped_total == 0
    assert seen[:2] == [1000, 2000] and seen[-1] == 12_000
    assert Subscriber.objects.get(email="user11999@example.org").name == "Doe, Jane 11999"


# --- subscribers and suppressions by hand --------------------------------------------------------


def test_adding_a_subscriber_records_consent_and_normalizes(client, news):
    client.force_login(USERS["superuser"]())
    response = client.post(
        url("subscriber_add"),
        {
            "mailing_list": news["list"].pk,
            "email": " Dee@Example.NET ",
            "name": "Dee",
            "status": "active",
            "fields": "{}",
        },
    )
    assert response.status_code == 302, response.content.decode()[-2000:]
    dee = Subscriber.objects.get(email="dee@example.net")
    assert dee.consent_method == Subscriber.Consent.ADMIN and dee.consent_at
    assert "by root" in dee.consent_source
    # The same address again (other case) is refused by the form, not a 500.
    again = client.post(
        url("subscriber_add"),
        {"mailing_list": news["list"].pk, "email": "DEE@example.net", "status": "active"},
    )
    assert again.status_code == 200 and "errorlist" in again.content.decode()


def test_suppression_added_and_removed_by_hand(client, news):
    client.force_login(USERS["superuser"]())
    response = client.post(
        url("suppression_add"), {"email": "Spam@Example.net", "mailing_list": news["list"].pk}
    )
    assert response.status_code == 302
    added = Suppression.objects.get(email="spam@example.net")
    assert added.reason == Suppression.Reason.MANUAL and "by root" in added.detail
    page = client.get(url("suppression_changelist") + "?reason__exact=manual").content.decode()
    assert "spam@example.net" in page
    response = client.post(url("suppression_delete", added.pk), {"post": "yes"})
    assert response.status_code == 302
    assert not Suppression.objects.filter(pk=added.pk).exists()


# --- campaigns: form, preview, test send, start and the rest --------------------------------------


def campaign_data(**changes) -> dict:
    data = {
        "name": "Autumn",
        "mailing_list": "",
        "audience": "",
        "from_email": "",
        "reply_to": "",
        "subject": "Autumn news",
        "text_template": "Hello {{ subscriber.name }}",
        "html_template": "",
        "mailer": "",
        "seed_emails": "",
        "archive": "on",
        "max_per_day": "",
        "window_start": "",
        "window_end": "",
    }
    return {**data, **changes}


def test_campaign_form_needs_exactly_one_audience(client, news, settings):
    with_keys(settings, NEWSLETTER_AUDIENCES={"staff": "tests.test_newsletter_admin.staff"})
    client.force_login(USERS["superuser"]())
    add = url("campaign_add")
    neither = client.post(add, campaign_data()).content.decode()
    assert "Choose a list or an audience to send the campaign to." in neither
    both = client.post(add, campaign_data(mailing_list=news["list"].pk, audience="staff"))
    assert "Choose a list or an audience, not both." in both.content.decode()
    unknown = client.post(add, campaign_data(audience="everyone"))
    assert "errorlist" in unknown.content.decode()
    broken = client.post(add, campaign_data(mailing_list=news["list"].pk, text_template="{% if %}"))
    assert "The text template has an error" in broken.content.decode()
    assert not Campaign.objects.filter(name="Autumn").exists()
    ok = client.post(add, campaign_data(audience="staff"))
    assert ok.status_code == 302
    assert Campaign.objects.get(name="Autumn").audience == "staff"


def staff():  # an audience for the form test (never evaluated there)
    from django.contrib.auth.models import User

    return User.objects.filter(is_staff=True)


def test_started_campaign_content_is_read_only(client, news):
    client.force_login(USERS["superuser"]())
    running = news["running"]
    page = client.get(url("campaign_change", running.pk)).content.decode()
    assert 'name="text_template"' not in page and 'name="subject"' not in page
    assert 'name="max_per_day"' in page  # the pace can still be changed
    draft_page = client.get(url("campaign_change", news["draft"].pk)).content.decode()
    assert 'name="text_template"' in draft_page


def test_preview_with_a_chosen_subscriber(client, news):
    client.force_login(USERS["viewer"]())
    draft = news["draft"]
    bob = Subscriber.objects.get(email="bob@example.net")
    page = client.get(url("campaign_preview", draft.pk) + f"?subscriber={bob.pk}")
    text = page.content.decode()
    assert "Hello Bob" in text and "Dear Bob from Lyon." in text
    assert "srcdoc=" in text and "&lt;b&gt;Bob&lt;/b&gt;" in text  # the HTML, escaped in srcdoc
    first = client.get(url("campaign_preview", draft.pk)).content.decode()
    assert "Hello Ann" in first  # the first subscriber by address
    assert f"{SITE}/newsletters/unsubscribe/" in first


def test_send_test_arrives_in_the_sandbox(client, news, sandbox):
    """Send test: rendered for the seed address, sent at once through the site's backend."""
    client.force_login(USERS["superuser"]())
    draft = news["draft"]
    response = client.post(url("campaign_test_send", draft.pk), follow=True)
    assert "Test sent to seed@example.net." in response.content.decode()
    delivered = sandbox.wait_for(1)[-1]
    assert delivered.rcpt_tos == ["seed@example.net"]
    assert delivered.subject.startswith("[Test] Hello")
    assert delivered.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert not CampaignRecipient.objects.filter(campaign=draft).exists()
    Campaign.objects.filter(pk=draft.pk).update(seed_emails="")
    response = client.post(url("campaign_test_send", draft.pk), follow=True)
    assert "This campaign has no test recipients" in response.content.decode()
    assert len(sandbox.deliveries) == 1


def test_start_through_the_admin_enrols(client, news):
    """The confirmation page shows the estimate; the POST enrols the list's active
    subscribers and runs the campaign."""
    client.force_login(USERS["superuser"]())
    draft = news["draft"]
    page = client.get(url("campaign_start", draft.pk)).content.decode()
    assert re.search(r"2 recipients: about .* at [\d,]+/day across 1 account", page), page[-3000:]
    assert "Yes, start sending" in page
    response = client.post(url("campaign_start", draft.pk), follow=True)
    assert "Started: 2 recipient(s) enrolled." in response.content.decode()
    draft.refresh_from_db()
    assert draft.status == Campaign.Status.RUNNING
    assert sorted(draft.recipients.values_list("email", flat=True)) == [
        "ann@example.net",
        "bob@example.net",
    ]
    # A second start is refused in words, and enrols nobody twice.
    again = client.post(url("campaign_start", draft.pk), follow=True).content.decode()
    assert "only a draft can be started" in again
    assert draft.recipients.count() == 2
    change = client.get(url("campaign_change", draft.pk)).content.decode()
    assert "0 of 2 sent" in change and 'class="gms-nl-bar"' in change


def test_domain_guard_on_the_confirmation_page(client, news, monkeypatch):
    """Past the warning mark: a warning; crossing the limit: the alignment checkbox, which
    confirms alignment on the campaign."""
    monkeypatch.setattr(planner, "DOMAIN_WARN", 2)
    monkeypatch.setattr(planner, "DOMAIN_LIMIT", 3)
    for n in range(2):
        OutboundEmail.objects.create(
            account_email=SENDER,
            from_email=SENDER,
            recipients=[f"r{n}@example.net"],
            subject="bulk",
            priority="bulk",
        )
    client.force_login(USERS["superuser"]())
    draft = news["draft"]
    change = client.get(url("campaign_change", draft.pk)).content.decode()
    assert "Bulk mail from example.com in the last 24 hours: 2 messages." in change
    page = client.get(url("campaign_start", draft.pk)).content.decode()
    assert "would take the domain past 3 a day" in page and 'name="domain_aligned"' in page
    client.post(url("campaign_start", draft.pk), {"domain_aligned": "on"})
    draft.refresh_from_db()
    assert draft.domain_aligned and draft.status == Campaign.Status.RUNNING


def test_pause_resume_cancel_retry_through_the_admin(client, news):
    client.force_login(USERS["superuser"]())
    running = news["running"]
    response = client.post(post_url(news, "pause"), follow=True)
    assert "Paused: nothing more goes into the outbox" in response.content.decode()
    running.refresh_from_db()
    assert running.status == Campaign.Status.PAUSED
    assert re.fullmatch(r"Paused by root on \d{4}-\d\d-\d\d \d\d:\d\d \w+\.", running.paused_reason)
    change = client.get(url("campaign_change", running.pk)).content.decode()
    # Said once, plainly: the status says who paused it and when; no "Waiting: paused: ...".
    assert "gms-nl-paused" in change and change.count(running.paused_reason) == 1
    assert "Paused: Paused" not in change and "paused: Paused" not in change
    listing = client.get(url("campaign_changelist")).content.decode()
    assert "0 / 2" in listing  # the compact progress column
    # Nothing failed: the button says so rather than "0 will be sent again".
    response = client.post(post_url(news, "retry-failed"), follow=True)
    assert "No failed recipient to send again." in response.content.decode()
    client.post(post_url(news, "resume"))
    running.refresh_from_db()
    assert running.status == Campaign.Status.RUNNING
    CampaignRecipient.objects.filter(campaign=running, email="ann@example.net").update(
        status=CampaignRecipient.Status.FAILED
    )
    response = client.post(post_url(news, "retry-failed"), follow=True)
    assert "1 failed recipient(s) will be sent again." in response.content.decode()
    client.post(post_url(news, "cancel"))
    running.refresh_from_db()
    assert running.status == Campaign.Status.CANCELLED
    assert set(running.recipients.values_list("status", flat=True)) == {"cancelled"}
    # Pausing a cancelled campaign: refused in words, nothing changes.
    response = client.post(post_url(news, "pause"), follow=True)
    assert "Not done: The campaign is cancelled" in response.content.decode()
