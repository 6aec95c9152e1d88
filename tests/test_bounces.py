"""Bounces read back over IMAP from a real server (Dovecot, tests/dovecot.py).

Mail is sent through the Gmail sandbox (the outbox, delivered in-process); the non-delivery
reports are built as Gmail sends them (From ``Mail Delivery Subsystem
<mailer-daemon@googlemail.com>``, ``X-Failed-Recipients``, a ``multipart/report`` with the
text, the ``message/delivery-status`` part and the original headers) and put into the
account's Maildir, where Dovecot serves them over implicit TLS verified with the sandbox's CA.
Logins: the account's App Password (Dovecot's passwd-file) and XOAUTH2 (Dovecot's oauth2
passdb, asking about each token a token-info endpoint that answers from the sandbox's OAuth
authority).
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from email.utils import format_datetime, make_msgid

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from django_gmail_smtp import outbox
from django_gmail_smtp.bounces import (
    MalformedReport,
    NotABounce,
    parse_report,
    read_account,
    read_all,
    record_report,
)
from django_gmail_smtp.enums import BounceKind, Health
from django_gmail_smtp.models import Bounce, BounceMailbox, GmailAccount, OutboundEmail
from django_gmail_smtp.signals import email_bounced
from django_gmail_smtp.tasks import beat_schedule, read_bounces

from .dovecot import MISSING, Dovecot
from .factories import (
    APP_PASSWORD,
    SENDER,
    make_oauth_account,
    queued_row,
    staff_user,
    with_keys,
)

needs_dovecot = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

NOBODY = "nobody@example.net"
FULL = "full@example.org"


# --- reports as Gmail sends them ------------------------------------------------------------------


def gmail_report(
    original_headers: bytes | str,
    recipient: str,
    *,
    to: str = SENDER,
    status: str = "5.1.1",
    reply: str = "550-5.1.1 The email account that you tried to reach does not exist.",
    action: str = "failed",
    failed_header: bool = True,
) -> bytes:
    """A non-delivery report in Gmail's shape, about the message with ``original_headers``."""
    if isinstance(original_headers, bytes):
        original_headers = original_headers.decode("utf-8", "replace")
    original_headers = original_headers.replace("\r\n", "\n").strip()
    original_id = next(
        (
            line.split(":", 1)[1].strip()
            for line in original_headers.splitlines()
            if line.lower().startswith("message-id:")
        ),
        "",
    )
    title = "Address not found" if status.startswith("5") else "Message not delivered"
    boundary, inner = uuid.uuid4().hex, uuid.uuid4().hex
    now = timezone.now()
    failed = f"X-Failed-Recipients: {recipient}\n" if failed_header else ""
    text = (
        f"** {title} **\n\nYour message wasn't delivered to {recipient} because the address "
        "couldn't be found, or is unable to receive mail.\n\nLearn more here: "
        "https://support.google.com/mail/?p=NoSuchUser\n\nThe response was:\n\n"
        f"{reply} https://support.google.com/mail/?p=NoSuchUser - gsmtp\n"
    )
    report = f"""\
Return-Path: <>
Received: by 2002:a05:6a10:1234 with SMTP id abc; {format_datetime(now)}
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: {to}
{failed}Auto-Submitted: auto-replied
Subject: Delivery Status Notification (Failure)
References: {original_id}
In-Reply-To: {original_id}
Message-ID: {make_msgid(domain="mx.google.com")}
Date: {format_datetime(now)}
MIME-Version: 1.0
Content-Type: multipart/report; boundary="{boundary}"; report-type=delivery-status

--{boundary}
Content-Type: multipart/related; boundary="{inner}"

--{inner}
Content-Type: text/plain; charset="UTF-8"

{text}
--{inner}
Content-Type: text/html; charset="UTF-8"

<html><body><h2>{title}</h2><p>{text}</p></body></html>
--{inner}--

--{boundary}
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com
Received-From-MTA: dns; {to}
Arrival-Date: {format_datetime(now)}
X-Original-Message-ID: {original_id}

Final-Recipient: rfc822; {recipient}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.{recipient.split("@")[1]}. (192.0.2.1, the server for the domain.)
Diagnostic-Code: smtp; {reply}
 https://support.google.com/mail/?p=NoSuchUser - gsmtp
Last-Attempt-Date: {format_datetime(now)}

--{boundary}
Content-Type: text/rfc822-headers

{original_headers}

--{boundary}--
"""
    return report.replace("\n", "\r\n").encode()


def headers_of(data: bytes) -> bytes:
    """The header block of a message as it was sent."""
    data = data.replace(b"\r\n", b"\n")
    return data.split(b"\n\n", 1)[0]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def dovecot(tmp_path, settings, sandbox):
    """A Dovecot IMAP server the bounce reader's settings point at (XOAUTH2 tokens are the
    sandbox's)."""
    if MISSING:
        pytest.skip(MISSING)
    # The sandbox's private OAuth authority: the one that issued the tokens (as Google is).
    server = Dovecot(tmp_path / "imap", token_user=sandbox._oauth.access_token_user)
    with server:
        with_keys(settings, **server.settings())
        yield server


@pytest.fixture
def sent(account, sandbox, no_dispatch, pool):
    """Send a message through the outbox and the sandbox; returns (row, bytes as received)."""

    def send(to: str, subject: str = "Hello") -> tuple[OutboundEmail, bytes]:
        row = queued_row(account, to=[to], subject=subject)
        assert outbox.deliver(row.pk, pool=pool) == "sent"
        row.refresh_from_db()
        delivered = next(d for d in sandbox.deliveries if d.message["Message-ID"] == row.message_id)
        return row, delivered.data

    return send


@pytest.fixture
def bounced_signals():
    calls = []

    def receiver(sender, **kwargs):
        calls.append(kwargs)

    email_bounced.connect(receiver, dispatch_uid="test-bounces")
    yield calls
    email_bounced.disconnect(dispatch_uid="test-bounces")


def a_regular_message(to: str = SENDER) -> bytes:
    return (
        f"From: A friend <friend@example.org>\r\nTo: {to}\r\nSubject: lunch?\r\n"
        f"Message-ID: {make_msgid()}\r\nDate: {format_datetime(timezone.now())}\r\n\r\nHi!\r\n"
    ).encode()


# --- parsing (no server) --------------------------------------------------------------------------


def test_parse_gmail_hard_bounce():
    original = b"From: sender@example.com\nTo: nobody@example.net\nMessage-ID: <abc.1@example.com>"
    report = parse_report(gmail_report(original, NOBODY))
    assert report.original_message_id == "<abc.1@example.com>"
    [recipient] = report.recipients
    assert recipient.address == NOBODY
    assert recipient.kind == BounceKind.HARD
    assert recipient.code == "5.1.1"
    assert recipient.failed
    assert "does not exist" in recipient.diagnostic
    assert "Address not found" in report.text
    assert report.message_id.endswith("@mx.google.com>")


def test_parse_soft_bounce_and_delay():
    original = b"Message-ID: <abc.2@example.com>"
    soft = parse_report(gmail_report(original, FULL, status="4.2.2", reply="452 4.2.2 full"))
    assert soft.recipients[0].kind == BounceKind.SOFT
    assert soft.recipients[0].code == "4.2.2"
    delayed = parse_report(gmail_report(original, FULL, status="4.4.1", action="delayed"))
    assert not delayed.recipients[0].failed


def test_parse_x_failed_recipients_alone():
    """A report with only X-Failed-Recipients and the original quoted in the text."""
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\r\nTo: sender@example.com\r\n"
        b"X-Failed-Recipients: Someone@Example.NET\r\nSubject: Undelivered Mail\r\n\r\n"
        b"550 5.1.1 <someone@example.net>: Recipient address rejected\r\n\r\n"
        b"------ This is a copy of the message's headers. ------\r\n"
        b"Message-ID: <quoted.1@example.com>\r\nSubject: hi\r\n"
    )
    report = parse_report(raw)
    [recipient] = report.recipients
    assert (recipient.address, recipient.code, recipient.kind) == (
        "someone@example.net",
        "5.1.1",
        BounceKind.HARD,
    )
    assert report.original_message_id == "<quoted.1@example.com>"


def test_parse_refuses_what_is_not_a_readable_report():
    with pytest.raises(NotABounce):
        parse_report(a_regular_message())
    broken = (
        b"From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\r\n"
        b'Content-Type: multipart/report; boundary="x"; report-type=delivery-status\r\n\r\n'
        b"--x\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n"
        b"Action: failed\r\n\r\n--x--\r\n"
    )
    with pytest.raises(MalformedReport):
        parse_report(broken)
    with pytest.raises(MalformedReport):
        parse_report(b"")


# --- reading from the IMAP server ----------------------------------------------------------------


@needs_dovecot
@pytest.mark.integration
def test_hard_and_soft_bounces_are_recorded_once(
    dovecot, account, sent, bounced_signals, caplog, settings
):
    dovecot.add_user(SENDER, APP_PASSWORD)
    hard_row, hard_data = sent(NOBODY, "one")
    soft_row, soft_data = sent(FULL, "two")
    dovecot.deliver(SENDER, a_regular_message())
    dovecot.deliver(SENDER, gmail_report(headers_of(hard_data), NOBODY))
    dovecot.deliver(
        SENDER,
        gmail_report(
            headers_of(soft_data),
            FULL,
            status="4.2.2",
            reply="452-4.2.2 The recipient's inbox is out of storage space.",
        ),
    )
    # A report about mail this site never sent, and one that cannot be read.
    stranger = b"From: sender@example.com\r\nMessage-ID: <not-ours@example.com>"
    dovecot.deliver(SENDER, gmail_report(stranger, "someone@example.net"))
    dovecot.deliver(
        SENDER,
        b"From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\r\n"
        b'Content-Type: multipart/report; boundary="x"; report-type=delivery-status\r\n\r\n'
        b"--x\r\nContent-Type: text/plain\r\n\r\ngarbled\r\n--x--\r\n",
    )
    dovecot.deliver(SENDER, a_regular_message())  # not a report: the cursor moves past it
    caplog.set_level(logging.INFO, logger="django_gmail_smtp.bounces")

    [result] = read_all()

    assert result.ok, result.detail
    assert (result.bounces, result.hard, result.soft) == (2, 1, 1), result.text
    assert (result.ignored, result.malformed) == (1, 1), result.text
    hard = Bounce.objects.get(recipient=NOBODY)
    assert (hard.kind, hard.code, hard.outbound_id) == (BounceKind.HARD, "5.1.1", hard_row.pk)
    assert "does not exist" in hard.diagnostic and "Address not found" in hard.report
    soft = Bounce.objects.get(recipient=FULL)
    assert (soft.kind, soft.code, soft.outbound_id) == (BounceKind.SOFT, "4.2.2", soft_row.pk)
    for row in (hard_row, soft_row):
        row.refresh_from_db()
        assert row.status == OutboundEmail.Status.SENT  # Gmail accepted it
        assert row.bounced_at is not None
    assert sorted(c["bounce"].recipient for c in bounced_signals) == [FULL, NOBODY]
    assert {c["outbound"].pk for c in bounced_signals} == {hard_row.pk, soft_row.pk}
    assert "<not-ours@example.com>, which is not in the outbox: ignored" in caplog.text
    assert "cannot be read" in caplog.text
    mailbox = BounceMailbox.objects.get(account=account)
    assert mailbox.health == Health.OK and mailbox.last_uid == 6
    # By default the reader only reads: every message is still in the inbox.
    assert dovecot.folder_count(SENDER, "INBOX") == 6

    # Read again: nothing new. Then as if the inbox were new (UIDVALIDITY changed): every
    # report is read again, and still nothing is counted twice.
    again = read_account(account)
    assert (again.reports, again.bounces) == (0, 0), again.text
    BounceMailbox.objects.filter(account=account).update(uid_validity=1, last_uid=0)
    third = read_account(account)
    assert (third.reports, third.bounces, third.duplicates) == (3, 0, 2), third.text
    assert Bounce.objects.count() == 2
    assert len(bounced_signals) == 2


@needs_dovecot
@pytest.mark.integration
def test_login_refused_is_shown_and_other_accounts_still_read(
    dovecot, account, make_account, sandbox, sent, capsys
):
    dovecot.add_user(SENDER, "zyxwvutsrqponmlk")  # not the account's App Password
    other = make_account(sandbox, "other@example.com")
    dovecot.add_user(other.email, APP_PASSWORD)

    with pytest.raises(CommandError, match="1 inbox"):
        call_command("gmail_smtp", "bounces")

    out = capsys.readouterr().out
    assert f"FAIL  {SENDER}: not read." in out
    assert "OK    other@example.com: 0 report(s) read" in out
    mailbox = BounceMailbox.objects.get(account=account)
    assert mailbox.health == Health.CREDENTIALS_REJECTED
    assert "refused the login of sender@example.com" in mailbox.health_detail
    assert "sending is not affected" in mailbox.health_detail
    assert APP_PASSWORD not in mailbox.health_detail and "zyxw" not in mailbox.health_detail
    # Sending is not held back by the inbox: the account's own health is untouched.
    account.refresh_from_db()
    assert account.health != GmailAccount.Health.CREDENTIALS_REJECTED
    sent("someone@example.net")  # still sends
    assert BounceMailbox.objects.get(account=other).health == Health.OK

    # Fixed (the account gets the App Password the server takes): the next run shows it.
    account.app_password = "zyxw vuts rqpo nmlk"
    account.save()
    [result] = read_all(GmailAccount.objects.filter(pk=account.pk))
    assert result.ok
    mailbox.refresh_from_db()
    assert (mailbox.health, mailbox.health_detail) == (Health.OK, "")


@needs_dovecot
@pytest.mark.integration
def test_xoauth2_login_with_a_refreshed_token(dovecot, sandbox, db):
    """XOAUTH2 against Dovecot's oauth2 passdb: a stale token is refreshed once, as for SMTP."""
    oauth = make_oauth_account(sandbox)
    dovecot.add_user(oauth.email, "unused-password!")
    # A token the account believes valid, which the server refuses: refreshed, then in.
    GmailAccount.objects.filter(pk=oauth.pk).update(
        access_token="stale-token", token_expiry=timezone.now() + timedelta(hours=1)
    )
    oauth.refresh_from_db()
    row = OutboundEmail.objects.create(
        account=oauth,
        account_email=oauth.email,
        from_email=oauth.email,
        recipients=[NOBODY],
        message_id="<xo.1@example.com>",
        status=OutboundEmail.Status.SENT,
        sent_at=timezone.now(),
    )
    dovecot.deliver(
        oauth.email, gmail_report(b"Message-ID: <xo.1@example.com>", NOBODY, to=oauth.email)
    )

    result = read_account(oauth)

    assert result.ok, result.detail
    assert result.bounces == 1
    assert Bounce.objects.get().outbound_id == row.pk
    oauth.refresh_from_db()
    assert oauth.access_token != "stale-token"  # refreshed at the sandbox's token endpoint
    assert "method=XOAUTH2" in dovecot.log()

    # A refresh token Google no longer honours: the reader says so and does not crash.
    sandbox.expire_access_tokens()
    GmailAccount.objects.filter(pk=oauth.pk).update(refresh_token="1//revoked")
    oauth.refresh_from_db()
    failed = read_account(oauth)
    assert not failed.ok
    mailbox = BounceMailbox.objects.get(account=oauth)
    assert mailbox.health == Health.NEEDS_CONSENT
    assert "Connect the account with Google again" in mailbox.health_detail


@needs_dovecot
@pytest.mark.integration
@pytest.mark.parametrize("action", ["label", "move"])
def test_processed_reports_labelled_or_moved(dovecot, account, sent, settings, action):
    with_keys(settings, BOUNCE_ACTION=action, BOUNCE_LABEL="Bounces")
    dovecot.add_user(SENDER, APP_PASSWORD)
    _row, data = sent(NOBODY)
    dovecot.deliver(SENDER, a_regular_message())
    dovecot.deliver(SENDER, gmail_report(headers_of(data), NOBODY))

    result = read_account(account)

    assert result.ok and result.bounces == 1, result.text
    assert dovecot.folder_count(SENDER, "Bounces") == 1
    # Labelling keeps the report in the inbox (Gmail: a second label); moving takes it out.
    assert dovecot.folder_count(SENDER, "INBOX") == (2 if action == "label" else 1)


@needs_dovecot
@pytest.mark.integration
def test_task_reads_every_active_account(dovecot, account, sent, settings):
    dovecot.add_user(SENDER, APP_PASSWORD)
    _row, data = sent(NOBODY)
    dovecot.deliver(SENDER, gmail_report(headers_of(data), NOBODY))

    assert read_bounces() == {"accounts": 1, "unreadable": 0, "bounces": 1}

    assert "django-gmail-smtp-read-bounces" not in beat_schedule()  # opt-in
    with_keys(settings, BOUNCE_INTERVAL=600)
    entry = beat_schedule()["django-gmail-smtp-read-bounces"]
    assert entry["task"] == "django_gmail_smtp.tasks.read_bounces"
    assert entry["schedule"] == 600.0


# --- the newsletters ------------------------------------------------------------------------------


def campaign_rows(account, addresses, *, mailing_list=None, status="running"):
    """A running campaign on ``mailing_list`` with one sent recipient per address (each with
    its outbox row, as the planner would have left them)."""
    from django_gmail_smtp.newsletters.models import (
        Campaign,
        CampaignRecipient,
        MailingList,
        Subscriber,
    )

    mailing_list = mailing_list or MailingList.objects.create(name="News", slug="news")
    campaign = Campaign.objects.create(
        name="May", mailing_list=mailing_list, subject="May", text_template="x", status=status
    )
    recipients = []
    for n, address in enumerate(addresses):
        subscriber, _ = Subscriber.objects.get_or_create(
            mailing_list=mailing_list, email=address, defaults={"status": "active"}
        )
        row = OutboundEmail.objects.create(
            account=account,
            account_email=account.email,
            from_email=account.email,
            recipients=[address],
            message_id=f"<c{campaign.pk}.{n}@example.com>",
            status=OutboundEmail.Status.SENT,
            priority=OutboundEmail.Priority.BULK,
            sent_at=timezone.now(),
        )
        recipients.append(
            CampaignRecipient.objects.create(
                campaign=campaign,
                subscriber=subscriber,
                email=address,
                status=CampaignRecipient.Status.SENT,
                outbound=row,
                account_email=account.email,
                sent_at=timezone.now(),
            )
        )
    return campaign, recipients


@needs_dovecot
@pytest.mark.integration
def test_newsletter_hard_bounce_suppresses_and_marks(dovecot, account, settings):
    from django_gmail_smtp.newsletters.models import CampaignRecipient, Subscriber, Suppression

    dovecot.add_user(SENDER, APP_PASSWORD)
    campaign, [gone, fine] = campaign_rows(account, [NOBODY, "fine@example.org"])
    headers = f"From: {SENDER}\r\nTo: {NOBODY}\r\nMessage-ID: {gone.outbound.message_id}"
    dovecot.deliver(SENDER, gmail_report(headers, NOBODY))

    assert read_account(account).bounces == 1

    suppression = Suppression.objects.get(email=NOBODY)
    assert suppression.reason == Suppression.Reason.HARD_BOUNCE
    assert suppression.mailing_list_id == campaign.mailing_list_id
    assert suppression.campaign_id == campaign.pk
    assert "5.1.1" in suppression.detail and "Address not found" in suppression.detail
    gone.refresh_from_db()
    assert gone.status == CampaignRecipient.Status.BOUNCED
    assert "5.1.1" in gone.error
    assert Subscriber.objects.get(email=NOBODY).status == Subscriber.Status.BOUNCED
    fine.refresh_from_db()
    assert fine.status == CampaignRecipient.Status.SENT
    assert not Suppression.objects.filter(email="fine@example.org").exists()

    # The next campaign to the list does not mail the bounced address.
    from django_gmail_smtp.newsletters.models import Campaign

    with_keys(settings, SITE_URL="https://news.example.com")
    june = Campaign.objects.create(
        name="June", mailing_list=campaign.mailing_list, subject="June", text_template="x"
    )
    june.start()
    enrolled = dict(june.recipients.values_list("email", "status"))
    assert enrolled.get(NOBODY, CampaignRecipient.Status.SUPPRESSED) == (
        CampaignRecipient.Status.SUPPRESSED
    )
    assert enrolled["fine@example.org"] == CampaignRecipient.Status.PENDING


@pytest.mark.django_db
def test_soft_bounces_suppress_after_the_limit(account, settings):
    from django_gmail_smtp.newsletters.models import CampaignRecipient, Suppression

    with_keys(settings, BOUNCE_SOFT_LIMIT=2)
    _campaign, [first] = campaign_rows(account, [FULL])
    _campaign2, [second] = campaign_rows(account, [FULL], mailing_list=first.campaign.mailing_list)
    for n, recipient in enumerate((first, second)):
        report = parse_report(
            gmail_report(
                f"Message-ID: {recipient.outbound.message_id}", FULL, status="4.2.2", reply="452"
            )
        )
        assert len(record_report(account, report, key=f"soft-{n}")) == 1
        recipient.refresh_from_db()
        assert recipient.status == CampaignRecipient.Status.BOUNCED
        suppressed = Suppression.objects.filter(email=FULL).first()
        if n == 0:
            assert suppressed is None  # one soft bounce: counted, not suppressed
    assert suppressed is not None and suppressed.reason == Suppression.Reason.SOFT_BOUNCE
    assert "2 soft bounces" in suppressed.detail


@pytest.mark.django_db
def test_soft_bounces_older_than_the_window_do_not_count(account, settings):
    from django_gmail_smtp.newsletters.bounce_receivers import SOFT_BOUNCE_WINDOW
    from django_gmail_smtp.newsletters.models import Suppression

    with_keys(settings, BOUNCE_SOFT_LIMIT=2)
    _campaign, [first] = campaign_rows(account, [FULL])
    lists = {"mailing_list": first.campaign.mailing_list}
    _campaign2, [second] = campaign_rows(account, [FULL], **lists)
    _campaign3, [third] = campaign_rows(account, [FULL], **lists)

    def soft_bounce(recipient, key: str) -> None:
        report = parse_report(
            gmail_report(
                f"Message-ID: {recipient.outbound.message_id}", FULL, status="4.2.2", reply="452"
            )
        )
        assert len(record_report(account, report, key=key)) == 1

    soft_bounce(first, "old")
    # A mailbox full long ago, its report read only today (a first read of the inbox): by the
    # report's date, that bounce no longer counts.
    Bounce.objects.filter(recipient=FULL).update(
        reported_at=timezone.now() - SOFT_BOUNCE_WINDOW - timedelta(days=1)
    )
    soft_bounce(second, "recent")
    assert not Suppression.objects.filter(email=FULL).exists()
    soft_bounce(third, "again")  # two within the window: suppressed
    suppressed = Suppression.objects.get(email=FULL)
    assert "2 soft bounces" in suppressed.detail


@pytest.mark.django_db
def test_bounce_rate_pauses_the_campaign(account, settings):
    from django_gmail_smtp.newsletters.models import Campaign

    with_keys(settings, NEWSLETTER_BREAKER_MINIMUM=4, NEWSLETTER_BREAKER_RATE=0.3)
    addresses = [f"r{n}@example.org" for n in range(4)]
    campaign, recipients = campaign_rows(account, addresses)

    def bounce(recipient):
        headers = f"Message-ID: {recipient.outbound.message_id}"
        record_report(account, parse_report(gmail_report(headers, recipient.email)), key=headers)

    bounce(recipients[0])  # 1 of 4: 25%, under the rate
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.RUNNING
    bounce(recipients[1])  # 2 of 4: 50%
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.PAUSED
    assert "2 of the 4 messages it sent bounced" in campaign.paused_reason


# --- the admin ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_lists_bounces_per_account(admin_client, account, client):
    row = OutboundEmail.objects.create(
        account=account,
        account_email=account.email,
        from_email=account.email,
        recipients=[NOBODY],
        message_id="<adm.1@example.com>",
        status=OutboundEmail.Status.SENT,
    )
    record_report(
        account, parse_report(gmail_report(b"Message-ID: <adm.1@example.com>", NOBODY)), key="k"
    )

    page = admin_client.get("/admin/django_gmail_smtp/bounce/")
    assert page.status_code == 200
    assert NOBODY in page.content.decode() and "hard (permanent)" in page.content.decode()
    accounts = admin_client.get("/admin/django_gmail_smtp/gmailaccount/").content.decode()
    assert f"/admin/django_gmail_smtp/bounce/?account__id__exact={account.pk}" in accounts
    rows = admin_client.get("/admin/django_gmail_smtp/outboundemail/").content.decode()
    assert "sent, bounced" in rows
    detail = admin_client.get(f"/admin/django_gmail_smtp/outboundemail/{row.pk}/change/")
    assert f"{NOBODY}: hard (permanent) 5.1.1" in detail.content.decode()
    dashboard = admin_client.get("/admin/django_gmail_smtp/gmailaccount/dashboard/")
    assert "Bounces per day" in dashboard.content.decode()
    assert ": 1 hard bounces</title>" in dashboard.content.decode()
    # Probing other fields (the report's text) through the query string is refused.
    assert admin_client.get("/admin/django_gmail_smtp/bounce/?report__contains=x").status_code == (
        400
    )


@pytest.mark.django_db
def test_bounce_admin_is_read_only_and_needs_its_permission(client, account):
    bounce = Bounce.objects.create(
        account=account, recipient=NOBODY, kind=BounceKind.HARD, code="5.1.1", report_id="r"
    )
    client.force_login(staff_user("viewer", "view_bounce"))
    assert client.get("/admin/django_gmail_smtp/bounce/").status_code == 200
    page = client.get(f"/admin/django_gmail_smtp/bounce/{bounce.pk}/change/").content.decode()
    assert NOBODY in page and 'name="_save"' not in page
    assert client.get(f"/admin/django_gmail_smtp/bounce/{bounce.pk}/delete/").status_code == 403
    client.force_login(staff_user("nobody"))
    assert client.get("/admin/django_gmail_smtp/bounce/").status_code == 403


@needs_dovecot
@pytest.mark.integration
def test_tls_is_verified(dovecot, account, settings, tmp_path):
    """A server whose certificate the configured CA did not sign is not logged in to."""
    from django_gmail_smtp.testing.certs import ensure_certificates

    dovecot.add_user(SENDER, APP_PASSWORD)
    with_keys(settings, CA_FILE=str(ensure_certificates(tmp_path / "other-ca").ca_file))

    result = read_account(account)

    assert not result.ok
    assert "could not be verified" in result.detail
    assert "Login: user=<sender@example.com>" not in dovecot.log()
    mailbox = BounceMailbox.objects.get(account=account)
    assert mailbox.health == Health.UNKNOWN  # not a credentials problem
    assert "could not be verified" in mailbox.health_detail


# --- the mailto half of List-Unsubscribe ----------------------------------------------------------


def unsubscribe_email(sender: str, subject: str, to: str = SENDER) -> bytes:
    """The email a mail program sends for ``<mailto:TO?subject=...>``."""
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {make_msgid()}\r\n"
        f"Date: {format_datetime(timezone.now())}\r\nContent-Type: text/plain\r\n\r\n"
        "This message was automatically generated by Gmail.\r\n"
    ).encode()


def mailto_subject(campaign, address: str) -> str:
    """The subject of the mailto in the message the campaign sends ``address``, decoded as
    a mail program decodes the URL's query."""
    from urllib.parse import parse_qs, urlsplit

    from django_gmail_smtp.newsletters.render import Renderer

    header = str(Renderer(campaign).headers(address)["List-Unsubscribe"])
    mailto = next(p.strip(" <>") for p in header.split(",") if "mailto:" in p)
    assert urlsplit(mailto).path == SENDER
    [subject] = parse_qs(urlsplit(mailto).query)["subject"]
    return subject


@needs_dovecot
@pytest.mark.integration
def test_unsubscribe_emails_are_read_from_the_inbox(dovecot, account, settings, caplog):
    """An unsubscribe email (List-Unsubscribe's mailto) in the sending account's inbox
    unsubscribes the address its token names, also when the subject came URL-quoted; a
    tampered token, or a person's own mail about unsubscribing, changes nothing."""
    from django_gmail_smtp.newsletters.models import Subscriber, Suppression

    with_keys(settings, SITE_URL="https://news.example.com")
    dovecot.add_user(SENDER, APP_PASSWORD)
    ann, bob, cy = "ann@example.net", "bob@example.net", "cy@example.net"
    campaign, _recipients = campaign_rows(account, [ann, bob, cy])
    campaign.from_email = SENDER  # its mailto goes to the sending account's inbox
    campaign.save()
    subject = mailto_subject(campaign, ann)
    assert subject.startswith("unsubscribe ") and " " not in subject.split(" ", 1)[1]
    dovecot.deliver(SENDER, unsubscribe_email(ann, subject))
    # A mail program that left the subject as it is in the URL: "unsubscribe%20TOKEN".
    quoted = mailto_subject(campaign, bob).replace(" ", "%20")
    dovecot.deliver(SENDER, unsubscribe_email(f"Bob <{bob}>", quoted))
    # Cy's token with one character changed: not valid.
    token = mailto_subject(campaign, cy).split(" ", 1)[1]
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    dovecot.deliver(SENDER, unsubscribe_email(cy, f"unsubscribe {tampered}"))
    dovecot.deliver(SENDER, unsubscribe_email(cy, "how do I unsubscribe from this?"))

    with caplog.at_level(logging.INFO):
        result = read_account(account)

    assert result.ok and result.handled == {"unsubscribe email(s)": 2}, result.text
    assert "2 unsubscribe email(s)" in result.text
    for address in (ann, bob):
        assert Subscriber.objects.get(email=address).status == Subscriber.Status.UNSUBSCRIBED
        suppression = Suppression.objects.get(email=address)
        assert suppression.reason == Suppression.Reason.UNSUBSCRIBED
        assert suppression.mailing_list_id == campaign.mailing_list_id
        assert "an unsubscribe email (List-Unsubscribe mailto)" in suppression.detail
    assert Subscriber.objects.get(email=cy).status == Subscriber.Status.ACTIVE
    assert not Suppression.objects.filter(email=cy).exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "carries a token that is not valid" in w] == [
        f"An unsubscribe email from {cy} in the inbox of {SENDER} carries a token that is not "
        "valid (tampered or not this site's): nothing changed, and it is left in the inbox"
    ]
    # Read again: nothing is looked at twice.
    assert read_account(account).handled == {}


@pytest.mark.parametrize(
    "subject, token",
    [
        ("unsubscribe .eJyLVjI0:abc-_1", ".eJyLVjI0:abc-_1"),
        ("Unsubscribe%20.eJyLVjI0:abc", ".eJyLVjI0:abc"),
        ("  unsubscribe   tok:en  ", "tok:en"),
        ("how do I unsubscribe?", None),
        ("Re: unsubscribe tok:en", None),
        ("unsubscribe tok:en please", None),
        ("", None),
    ],
)
def test_the_token_of_an_unsubscribe_subject(subject, token):
    from django_gmail_smtp.newsletters.mailto import token_from_subject

    assert token_from_subject(subject) == token
