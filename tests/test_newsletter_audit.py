"""An outside audit of the newsletters and the bounce reader: what an attacker or a careless
template could do through the public pages, the admin, the rendered mail and the planner.

Each test here failed against the code before its fix (see the audit report), or pins a
behaviour the audit probed and found sound.
"""

from __future__ import annotations

import email
from email import policy

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_gmail_smtp.newsletters import tokens
from django_gmail_smtp.newsletters.models import (
    Campaign,
    CampaignRecipient,
    MailingList,
    Subscriber,
    Suppression,
)
from django_gmail_smtp.newsletters.render import Renderer

from .factories import SENDER, with_keys

SITE = "https://news.example.org"
EVIL = '<script>alert("x")</script>'


@pytest.fixture(autouse=True)
def site(settings):
    with_keys(settings, SITE_URL=SITE)


@pytest.fixture
def evil_list(db):
    return MailingList.objects.create(
        name=f"Weekly {EVIL}\r\nBcc: victim@example.org", slug="weekly", from_email=SENDER
    )


def campaign_for(mailing_list, **fields) -> Campaign:
    values = {
        "name": f"Issue {EVIL}",
        "mailing_list": mailing_list,
        "subject": "Hi {{ subscriber.name }}",
        "text_template": "Hello {{ subscriber.name }} {{ city }}",
        "html_template": "<p>Hello {{ subscriber.name }} {{ city }}</p>",
        "status": Campaign.Status.RUNNING,
        "started_at": timezone.now(),
        **fields,
    }
    return Campaign.objects.create(**values)


def evil_recipient(campaign) -> CampaignRecipient:
    subscriber = Subscriber.objects.create(
        mailing_list=campaign.mailing_list,
        email="ann@example.net",
        name=f"Ann\r\nBcc: victim@example.org {EVIL}",
        status=Subscriber.Status.ACTIVE,
    )
    return CampaignRecipient.objects.create(
        campaign=campaign,
        subscriber=subscriber,
        email=subscriber.email,
        name=subscriber.name,
        fields={"city": f"Lyon\r\nBcc: victim@example.org {EVIL}"},
    )


# --- templates cannot drive the campaign ----------------------------------------------------


@pytest.mark.parametrize("method", ["cancel", "pause", "resume", "start", "retry_failed"])
def test_a_template_cannot_call_the_campaigns_lifecycle_methods(evil_list, method):
    """Django templates call a callable attribute without arguments: ``{{ campaign.cancel }}``
    in a campaign's text would cancel it each time a preview or the public archive renders it
    (a staff user allowed to edit a draft could start, pause or cancel campaigns that way)."""
    campaign = campaign_for(evil_list, text_template="x {{ campaign." + method + " }} y")
    status = campaign.status
    Renderer(campaign).preview()
    Renderer(campaign).archive_page()
    campaign.refresh_from_db()
    assert campaign.status == status
    assert campaign.pause_reason == "" if hasattr(campaign, "pause_reason") else True


# --- injection into the mail and the pages --------------------------------------------------


def test_names_and_merge_fields_cannot_inject_headers_or_markup(evil_list):
    campaign = campaign_for(evil_list)
    ann = evil_recipient(campaign)
    msg = email.message_from_bytes(
        Renderer(campaign).message(ann).message().as_bytes(), policy=policy.default
    )
    assert msg["Bcc"] is None
    assert msg.get_all("To") == ["ann@example.net"]
    assert "\n" not in msg["Subject"] and "\n" not in msg["List-Id"]
    assert "<script>" not in msg["List-Id"]
    html = msg.get_body(("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_the_public_pages_escape_list_campaign_and_subscriber_names(evil_list, client):
    campaign = campaign_for(evil_list, archive=True)
    ann = evil_recipient(campaign)
    pages = [
        client.get(reverse("gmail_smtp_newsletters:subscribe", args=["weekly"])),
        client.get(reverse("gmail_smtp_newsletters:archive", args=[campaign.pk])),
        client.get(
            reverse(
                "gmail_smtp_newsletters:unsubscribe",
                args=[tokens.unsubscribe_token(campaign, ann.email)],
            )
        ),
        client.post(
            reverse(
                "gmail_smtp_newsletters:confirm",
                args=[tokens.confirm_token(ann.subscriber)],
            )
        ),
    ]
    for response in pages:
        assert response.status_code == 200
        assert b"<script>alert" not in response.content


# --- the one-click endpoint and token scope -------------------------------------------------


@pytest.mark.parametrize("method", ["put", "patch", "delete", "options"])
def test_one_click_endpoint_refuses_other_methods_and_changes_nothing(evil_list, method):
    campaign = campaign_for(evil_list)
    ann = evil_recipient(campaign)
    url = reverse(
        "gmail_smtp_newsletters:unsubscribe", args=[tokens.unsubscribe_token(campaign, ann.email)]
    )
    response = getattr(Client(enforce_csrf_checks=True), method)(url)
    assert response.status_code == 405
    assert not Suppression.objects.exists()
    ann.subscriber.refresh_from_db()
    assert ann.subscriber.status == Subscriber.Status.ACTIVE


def test_a_token_of_one_list_leaves_the_others_alone(evil_list):
    other = MailingList.objects.create(name="Other", slug="other", from_email=SENDER)
    campaign = campaign_for(evil_list)
    ann = evil_recipient(campaign)
    on_other = Subscriber.objects.create(
        mailing_list=other, email=ann.email, status=Subscriber.Status.ACTIVE
    )
    url = reverse(
        "gmail_smtp_newsletters:unsubscribe", args=[tokens.unsubscribe_token(campaign, ann.email)]
    )
    Client(enforce_csrf_checks=True).post(url, {"List-Unsubscribe": "One-Click"})
    on_other.refresh_from_db()
    assert on_other.status == Subscriber.Status.ACTIVE
    assert list(Suppression.objects.values_list("mailing_list", flat=True)) == [evil_list.pk]


def test_a_confirm_token_is_not_an_unsubscribe_token_and_back(evil_list):
    campaign = campaign_for(evil_list)
    ann = evil_recipient(campaign)
    assert tokens.read_unsubscribe_token(tokens.confirm_token(ann.subscriber)) is None
    assert tokens.read_confirm_token(tokens.unsubscribe_token(campaign, ann.email)) is None


def test_a_template_cannot_reach_account_secrets_or_other_mail(evil_list, account):
    """The campaign's templates are written by whoever may edit a campaign, and the result is
    shown in the preview, mailed to every subscriber and published in the archive: through
    ``campaign`` they must not walk to the sending account (its App Password) or to its other
    outbox rows (password-reset links)."""
    from .factories import queued_row

    secret_row = queued_row(account, to=["someone@example.net"], subject="Reset your password")
    campaign = campaign_for(
        evil_list,
        text_template=(
            "{{ campaign.recipients.first.outbound.account.app_password }}"
            "{% for r in campaign.recipients.first.outbound.account.outbound.all %}"
            "{{ r.subject }}{% endfor %}"
            "{{ campaign.mailing_list.subscribers.first.email }}"
            "{{ campaign.mailing_list.name }} {{ campaign.name }}"
        ),
    )
    ann = evil_recipient(campaign)
    CampaignRecipient.objects.filter(pk=ann.pk).update(outbound=secret_row)
    for parts in (Renderer(campaign).preview(), Renderer(campaign).archive_page()):
        assert account.app_password.replace(" ", "") not in parts["text"].replace(" ", "")
        assert "Reset your password" not in parts["text"]
        assert "ann@example.net" not in parts["text"]
        assert campaign.name in parts["text"] and "Weekly" in parts["text"]


# --- the planner: never half a slice ---------------------------------------------------------


def test_a_slice_that_cannot_be_built_leaves_nobody_half_queued(
    evil_list, account, no_dispatch, settings
):
    """SITE_URL removed while a campaign runs: the planner pauses it saying why, and the
    recipient it had claimed goes back to waiting (not "queued" without an outbox row, which
    the next tick would have marked failed), so resuming sends to everyone."""
    from django_gmail_smtp.models import OutboundEmail
    from django_gmail_smtp.newsletters import planner

    campaign = campaign_for(evil_list, status=Campaign.Status.DRAFT, started_at=None)
    for i in range(3):
        Subscriber.objects.create(
            mailing_list=evil_list, email=f"r{i}@example.net", status=Subscriber.Status.ACTIVE
        )
    assert campaign.start() == 3
    with_keys(settings, SITE_URL="")
    planner.tick()
    planner.tick()  # the next tick settles what the first left
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.PAUSED
    assert "SITE_URL" in campaign.paused_reason
    statuses = set(campaign.recipients.values_list("status", flat=True))
    assert statuses == {CampaignRecipient.Status.PENDING}
    assert not OutboundEmail.objects.exists()


# --- settings -------------------------------------------------------------------------------


def test_an_audience_naming_a_missing_module_is_a_plain_error(db, settings, admin_client):
    with_keys(settings, NEWSLETTER_AUDIENCES={"ghosts": "no_such_module.people"})
    campaign = Campaign.objects.create(
        name="To ghosts", audience="ghosts", subject="Hi", text_template="Hello"
    )
    with pytest.raises(ValueError, match="no_such_module.people.*cannot be imported"):
        campaign.start()
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.DRAFT
    for url in (
        reverse("admin:gmail_smtp_newsletters_campaign_add"),
        reverse("admin:gmail_smtp_newsletters_campaign_change", args=[campaign.pk]),
    ):
        assert admin_client.get(url).status_code == 200


# --- the Bounce admin's changelist ----------------------------------------------------------


@pytest.mark.parametrize(
    "param",
    [
        "account__app_password__startswith",
        "account__refresh_token__startswith",
        "outbound__mime__contains",
        "outbound__subject__startswith",
        "report__contains",
        "diagnostic__regex",
        "recipient__startswith",
    ],
)
def test_bounce_changelist_refuses_lookups_it_does_not_offer(db, admin_client, param):
    from .test_admin_security import refused

    address = reverse("admin:django_gmail_smtp_bounce_changelist")
    assert admin_client.get(address).status_code == 200
    assert refused(admin_client.get(address, {param: "a"})), param


# --- faults: a worker gone between Gmail's reply and the recipient's update -------------------


def started_with_rows(evil_list, n=3):
    from django_gmail_smtp.newsletters import planner

    campaign = campaign_for(evil_list, status=Campaign.Status.DRAFT, started_at=None)
    for i in range(n):
        Subscriber.objects.create(
            mailing_list=evil_list, email=f"r{i}@example.net", status=Subscriber.Status.ACTIVE
        )
    campaign.start()
    for _ in range(n):
        if not campaign.recipients.filter(status=CampaignRecipient.Status.PENDING).exists():
            break
        Campaign.objects.filter(pk=campaign.pk).update(planned_at=None)  # a first tick again
        planner.tick()
    return campaign


def test_a_row_sent_without_its_signal_is_settled_by_the_next_tick(evil_list, account, no_dispatch):
    """The worker wrote the outbox row "sent" and died before the receivers updated the
    campaign's recipient: the next tick settles it from the row, and queues no second
    message to that address."""
    from django_gmail_smtp.models import OutboundEmail
    from django_gmail_smtp.newsletters import planner

    campaign = started_with_rows(evil_list, n=1)
    (row,) = OutboundEmail.objects.all()
    OutboundEmail.objects.filter(pk=row.pk).update(status="sent", sent_at=timezone.now())
    planner.tick()
    assert list(campaign.recipients.values_list("status", flat=True)) == ["sent"]
    assert OutboundEmail.objects.count() == 1
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.FINISHED


def test_a_bounce_for_a_deleted_campaign_still_suppresses(evil_list, account, no_dispatch):
    from django_gmail_smtp import signals
    from django_gmail_smtp.enums import BounceKind
    from django_gmail_smtp.models import Bounce, OutboundEmail

    campaign = started_with_rows(evil_list, n=1)
    (row,) = OutboundEmail.objects.all()
    OutboundEmail.objects.filter(pk=row.pk).update(status="sent", sent_at=timezone.now())
    campaign.delete()
    bounce = Bounce.objects.create(
        account=account,
        report_id="k1",
        outbound=row,
        recipient="r0@example.net",
        kind=BounceKind.HARD,
        code="5.1.1",
    )
    signals.email_bounced.send(sender=Bounce, bounce=bounce, outbound=row, account=account)
    (suppression,) = Suppression.objects.all()
    assert suppression.email == "r0@example.net"
    assert suppression.reason == Suppression.Reason.HARD_BOUNCE
    assert Subscriber.objects.get(email="r0@example.net").status == Subscriber.Status.BOUNCED


def test_a_database_connection_lost_mid_slice_leaves_no_half_queued_recipient(
    transactional_db, evil_list, account, no_dispatch, caplog
):
    """The connection drops (PostgreSQL: the backend is terminated, as a failover does) while
    the planner writes the second outbox row of a slice: that tick fails and is logged; no
    recipient is "queued" without its row nor a row without its recipient; the next tick
    queues the slice again and every address ends with exactly one row."""
    from django.db import connection

    from django_gmail_smtp.models import OutboundEmail
    from django_gmail_smtp.newsletters import planner

    from .test_delivery_faults import kill_connection

    campaign = campaign_for(evil_list, status=Campaign.Status.DRAFT, started_at=None)
    for i in range(4):
        Subscriber.objects.create(
            mailing_list=evil_list, email=f"r{i}@example.net", status=Subscriber.Status.ACTIVE
        )
    campaign.start()
    # A pace that lets a first tick queue several: the slice is what the connection loses.
    Campaign.objects.filter(pk=campaign.pk).update(max_per_day=None)
    from django_gmail_smtp.models import GmailAccount

    GmailAccount.objects.filter(pk=account.pk).update(daily_limit=1_000_000)
    inserts = []

    def drop_on_second_insert(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("INSERT") and OutboundEmail._meta.db_table in sql:
            inserts.append(sql)
            if len(inserts) == 2:
                kill_connection(connection)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(drop_on_second_insert):
        planner.tick()
    assert len(inserts) == 2, "the slice should have been cut at its second row"
    assert "planner failed on campaign" in caplog.text
    connection.close()  # what Celery does after a task whose connection broke

    def consistent() -> list[str]:
        rows = dict(OutboundEmail.objects.values_list("pk", "recipients"))
        queued = dict(
            campaign.recipients.filter(status=CampaignRecipient.Status.QUEUED).values_list(
                "outbound_id", "email"
            )
        )
        assert None not in queued, "a recipient queued without its outbox row"
        assert set(queued) == set(rows), "an outbox row without its recipient (or v.v.)"
        for pk, email_ in queued.items():
            assert rows[pk] == [email_]
        return sorted(queued.values())

    assert consistent() == []
    for _ in range(4):
        Campaign.objects.filter(pk=campaign.pk).update(planned_at=None)
        planner.tick()
    assert consistent() == [f"r{i}@example.net" for i in range(4)]


# --- admin: POSTs by a user who may only view ---------------------------------------------------


@pytest.mark.parametrize("who", ["viewer", "no_permission"])
def test_view_only_posts_change_nothing(client, who, evil_list, account):
    """Delete-selected on every changelist, the change forms, the import and a Bounce's page,
    posted by a user who may view (or not even that): refused, nothing changed."""
    from django_gmail_smtp.models import Bounce

    from .factories import staff_user
    from .test_newsletter_admin import VIEW_ONLY

    campaign = campaign_for(evil_list, status=Campaign.Status.DRAFT, started_at=None)
    ann = evil_recipient(campaign)
    suppression = Suppression.objects.create(email="x@example.net", reason="manual")
    bounce = Bounce.objects.create(
        account=account, report_id="k", recipient="x@example.net", kind="hard"
    )
    perms = (*VIEW_ONLY, "view_bounce") if who == "viewer" else ()
    client.force_login(staff_user(who, *perms))
    objects = {
        ("gmail_smtp_newsletters", "mailinglist"): evil_list,
        ("gmail_smtp_newsletters", "subscriber"): ann.subscriber,
        ("gmail_smtp_newsletters", "campaign"): campaign,
        ("gmail_smtp_newsletters", "campaignrecipient"): ann,
        ("gmail_smtp_newsletters", "suppression"): suppression,
        ("django_gmail_smtp", "bounce"): bounce,
    }

    def state():
        return [
            sorted(type(obj).objects.values_list(*[f.attname for f in type(obj)._meta.fields]))
            for obj in objects.values()
        ]

    before = state()
    for (app, model), obj in objects.items():
        changelist = reverse(f"admin:{app}_{model}_changelist")
        response = client.post(
            changelist, {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"}
        )
        assert response.status_code in (200, 302, 403), (model, response.status_code)
        change = reverse(f"admin:{app}_{model}_change", args=[obj.pk])
        assert client.post(change, {"name": "x", "email": "x@example.org"}).status_code == 403
        delete = reverse(f"admin:{app}_{model}_delete", args=[obj.pk])
        assert client.post(delete, {"post": "yes"}).status_code == 403
    imp = reverse("admin:gmail_smtp_newsletters_mailinglist_import", args=[evil_list.pk])
    assert client.post(imp, {"file": ""}).status_code == 403
    assert state() == before


@pytest.mark.parametrize("value", ["not an address", "News\n <news@example.org>"])
def test_a_from_that_is_not_an_address_is_refused_by_the_list_and_campaign_forms(
    db, admin_client, value
):
    """Before: a list's From was not checked at all (its confirmation mail then failed for
    every visitor) and a campaign's From with a line break passed (every message failed)."""
    add = reverse("admin:gmail_smtp_newsletters_mailinglist_add")
    response = admin_client.post(
        add, {"name": "L", "slug": "l", "from_email": value, "double_opt_in": "on"}
    )
    assert response.status_code == 200 and "is not an address" in response.content.decode()
    assert not MailingList.objects.exists()
    from .test_newsletter_admin import campaign_data

    mailing_list = MailingList.objects.create(name="L", slug="l")
    add = reverse("admin:gmail_smtp_newsletters_campaign_add")
    response = admin_client.post(
        add, campaign_data(mailing_list=mailing_list.pk, from_email=value, reply_to=value)
    )
    assert response.status_code == 200 and "is not an address" in response.content.decode()
    assert not Campaign.objects.exists()


# --- the bounce reader ----------------------------------------------------------------------


def test_a_report_in_another_accounts_inbox_changes_nothing(account, make_account, sandbox):
    """A report naming a message account A sent, found in account B's inbox (forwarded there,
    or forged by someone who learnt the Message-ID): ignored, nothing suppressed or bounced."""
    from django_gmail_smtp.bounces import parse_report, record_report
    from django_gmail_smtp.models import Bounce

    from .test_bounces import NOBODY, campaign_rows, gmail_report

    other = make_account(sandbox, "other@example.com")
    _campaign, [recipient] = campaign_rows(account, [NOBODY])
    report = parse_report(
        gmail_report(f"Message-ID: {recipient.outbound.message_id}", NOBODY, to=other.email)
    )
    assert record_report(other, report, key="elsewhere") == []
    assert not Bounce.objects.exists() and not Suppression.objects.exists()
    recipient.refresh_from_db()
    assert recipient.status != CampaignRecipient.Status.BOUNCED
    # The same report in the sender's own inbox is recorded.
    assert len(record_report(account, report, key="home")) == 1
