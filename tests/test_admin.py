"""The admin pages through Django's test client (the browser tests are in test_browser.py)."""

from __future__ import annotations

import io
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.contrib.auth.models import User
from django.core.mail import send_mail
from django.core.management import call_command
from django.urls import reverse

from django_gmail_smtp import outbox
from django_gmail_smtp.models import GmailAccount, OutboundEmail

from .conftest import APP_PASSWORD, SENDER
from .factories import queued_row, staff_user

pytestmark = pytest.mark.django_db

SECRETS = (APP_PASSWORD, "abcd efgh ijkl mnop", "client-secret-xyz", "1//refresh-token-abc")


def test_changelist_shows_health_quota_and_last_send(client, staff, account, sandbox):
    from django.core.mail import send_mail

    send_mail("s", "b", SENDER, ["t@example.net"])
    page = client.get(reverse("admin:django_gmail_smtp_gmailaccount_changelist")).content.decode()
    assert SENDER in page and "gms-quota-bar" in page and "1 / 500" in page
    assert "gms-ok" in page  # health ok after the send
    assert "Sending dashboard" in page
    for secret in SECRETS:
        assert secret not in page


def test_change_form_never_shows_secrets_and_empty_keeps_them(client, staff, account):
    account.client_secret = "client-secret-xyz"
    account.refresh_token = "1//refresh-token-abc"
    account.save()
    url = reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
    page = client.get(url).content.decode()
    for secret in SECRETS:
        assert secret not in page
    assert "Stored (encrypted); leave empty to keep it." in page
    data = {
        "email": SENDER,
        "auth_method": "app_password",
        "app_password": "",
        "client_id": "",
        "client_secret": "",
        "refresh_token": "",
        "service_account_key": "",
        "send_as_aliases": "",
        "limits_preset": "workspace",
        "daily_limit": "",
        "daily_recipient_limit": "",
        "per_message_recipient_limit": "",
        "is_default": "on",
        "is_active": "on",
    }
    response = client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    account.refresh_from_db()
    assert account.app_password == APP_PASSWORD and account.client_secret == "client-secret-xyz"
    assert account.limits_preset == "workspace"
    history = client.get(url + "history/").content.decode()
    for secret in SECRETS:
        assert secret not in history


def test_replacing_app_password_validates_it(client, staff, account):
    url = reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
    base = {
        "email": SENDER,
        "auth_method": "app_password",
        "limits_preset": "gmail",
        "is_active": "on",
        "is_default": "on",
    }
    page = client.post(url, {**base, "app_password": "my-google-password"}).content.decode()
    assert "An App Password is 16 letters" in page
    assert "my-google-password" not in page  # not echoed back
    assert client.post(url, {**base, "app_password": "qrst uvwx yzab cdef"}).status_code == 302
    account.refresh_from_db()
    assert account.app_password == "qrstuvwxyzabcdef"


def test_verify_and_send_test_buttons(client, staff, account, sandbox):
    url = reverse("admin:django_gmail_smtp_gmailaccount_operation", args=[account.pk, "verify"])
    page = client.post(url, follow=True).content.decode()
    assert "connected over verified TLS and logged in" in page
    url = reverse("admin:django_gmail_smtp_gmailaccount_operation", args=[account.pk, "send-test"])
    page = client.post(url, follow=True).content.decode()
    assert "Test message sent from sender@example.com to admin@example.net" in page
    assert sandbox.deliveries[0].rcpt_tos == ["admin@example.net"]


def test_verify_reports_bad_password_in_plain_words(client, staff, sandbox, make_account):
    account = make_account(sandbox, app_password="wrongwrongwrongw")
    url = reverse("admin:django_gmail_smtp_gmailaccount_operation", args=[account.pk, "verify"])
    page = client.post(url, follow=True).content.decode()
    assert "apppasswords" in page and "wrongwrongwrongw" not in page


def test_pause_and_resume(client, staff, account):
    for operation, active in (("pause", False), ("resume", True)):
        url = reverse(
            "admin:django_gmail_smtp_gmailaccount_operation", args=[account.pk, operation]
        )
        client.post(url)
        account.refresh_from_db()
        assert account.is_active is active


def test_resuming_in_the_form_releases_paused_mail(client, staff, account, pool, no_dispatch):
    account.is_active = False
    account.save()
    row = queued_row(account)  # queued for the paused account: it waits, it is not refused
    assert outbox.deliver(row.pk, pool=pool) == "deferred"
    url = reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
    data = {"email": SENDER, "auth_method": "app_password", "limits_preset": "gmail"}
    assert client.post(url, {**data, "is_active": "on", "is_default": "on"}).status_code == 302
    assert OutboundEmail.objects.get(pk=row.pk).next_attempt_at is not None


def test_connect_with_google_flow(client, staff, sandbox, make_account, settings):
    """Start -> the sandbox's consent stand-in -> callback: the refresh token is stored."""
    sandbox.add_oauth_client("client-1", "client-secret-xyz")
    account = make_account(sandbox, client_id="client-1", client_secret="client-secret-xyz")
    start = reverse("admin:django_gmail_smtp_gmailaccount_connect", args=[account.pk])
    response = client.post(start)
    assert response.status_code == 302
    consent = urlsplit(response["Location"])
    params = parse_qs(consent.query)
    assert params["access_type"] == ["offline"] and params["prompt"] == ["consent"]
    assert params["scope"] == ["https://mail.google.com/ openid email"]
    assert params["code_challenge_method"] == ["S256"] and params["login_hint"] == [SENDER]
    assert params["redirect_uri"] == [
        "http://testserver/admin/django_gmail_smtp/gmailaccount/oauth/callback/"
    ]
    # The "browser" follows the sandbox's consent redirect back to the admin.
    back = requests.get(response["Location"], allow_redirects=False, timeout=5).headers["Location"]
    page = client.get(back, follow=True).content.decode()
    assert "Connected sender@example.com with Google" in page
    account.refresh_from_db()
    assert account.auth_method == "oauth2" and account.refresh_token
    # A replayed callback (state already used) is refused.
    page = client.get(back, follow=True).content.decode()
    assert "does not match a connection started from this browser session" in page


def test_connect_reports_google_refusal(client, staff, sandbox, make_account):
    sandbox.add_oauth_client("client-1", "client-secret-xyz")
    sandbox.consent_error = "access_denied"
    account = make_account(sandbox, client_id="client-1", client_secret="client-secret-xyz")
    response = client.post(
        reverse("admin:django_gmail_smtp_gmailaccount_connect", args=[account.pk])
    )
    back = requests.get(response["Location"], allow_redirects=False, timeout=5).headers["Location"]
    page = client.get(back, follow=True).content.decode()
    assert "declined to grant access" in page


def test_connect_behind_proxy_builds_public_redirect_uri(
    client, staff, sandbox, make_account, settings
):
    settings.USE_X_FORWARDED_HOST = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.ALLOWED_HOSTS = ["*"]
    sandbox.add_oauth_client("client-1", "s")
    account = make_account(sandbox, client_id="client-1", client_secret="s")
    response = client.post(
        reverse("admin:django_gmail_smtp_gmailaccount_connect", args=[account.pk]),
        HTTP_X_FORWARDED_HOST="mail.example.org",
        HTTP_X_FORWARDED_PROTO="https",
    )
    redirect_uri = parse_qs(urlsplit(response["Location"]).query)["redirect_uri"][0]
    assert (
        redirect_uri
        == "https://mail.example.org/admin/django_gmail_smtp/gmailaccount/oauth/callback/"
    )


def test_permissions_gate_connect_and_send_test(client, account, sandbox):
    client.force_login(staff_user("clerk", "view_gmailaccount"))
    change = reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
    page = client.get(change).content.decode()
    assert ">Connect with Google</button>" not in page and "Send test message" not in page
    for name, args in (
        ("admin:django_gmail_smtp_gmailaccount_connect", [account.pk]),
        ("admin:django_gmail_smtp_gmailaccount_operation", [account.pk, "send-test"]),
        ("admin:django_gmail_smtp_gmailaccount_operation", [account.pk, "verify"]),
    ):
        assert client.post(reverse(name, args=args)).status_code == 403
    assert (
        client.get(reverse("admin:django_gmail_smtp_oauth_callback") + "?state=x").status_code
        == 403
    )
    assert sandbox.deliveries == []


def test_dashboard_renders_svg_charts(client, staff, account, sandbox):
    from django.core.mail import send_mail

    send_mail("s", "b", SENDER, ["a@example.net", "b@example.net"])
    page = client.get(reverse("admin:django_gmail_smtp_dashboard")).content.decode()
    assert page.count('<svg class="gms-chart"') == 2 and "Per day, last 30 days" in page
    assert "<script" not in page.split('id="content-main"')[1].split("</section>")[0]
    assert "2 messages" not in page and "1 messages" in page and "2 recipients" in page


def test_admin_pages_without_use_tz(client, settings, account, sandbox):
    settings.USE_TZ = False
    send_mail("s", "b", SENDER, ["t@example.net"])
    client.force_login(User.objects.create_superuser("a", "a@example.net", "pw"))
    assert client.get(reverse("admin:django_gmail_smtp_gmailaccount_changelist")).status_code == 200
    assert client.get(reverse("admin:django_gmail_smtp_dashboard")).status_code == 200
    call_command("gmail_smtp", "quota", stdout=io.StringIO())


def test_outbox_list_search_preview_and_actions(client, staff, account, sandbox, no_dispatch):
    from django.core.mail import EmailMultiAlternatives

    from django_gmail_smtp.backends import CeleryGmailBackend

    message = EmailMultiAlternatives("Invoice 42", "text body", SENDER, ["bob@example.net"])
    message.attach_alternative('<p onclick="x()">Hi<script>alert(1)</script></p>', "text/html")
    message.attach("invoice.pdf", b"%PDF-1.4", "application/pdf")
    CeleryGmailBackend().send_messages([message])
    row = OutboundEmail.objects.get()
    OutboundEmail.objects.filter(pk=row.pk).update(status="failed", reason="permanent")
    changelist = reverse("admin:django_gmail_smtp_outboundemail_changelist")
    assert "Invoice 42" in client.get(changelist + "?q=bob@example.net").content.decode()
    assert "Invoice 42" not in client.get(changelist + "?q=nobody@").content.decode()
    assert "Invoice 42" in client.get(changelist + "?status__exact=failed").content.decode()
    page = client.get(
        reverse("admin:django_gmail_smtp_outboundemail_change", args=[row.pk])
    ).content.decode()
    assert 'sandbox=""' in page and "invoice.pdf" in page and "application/pdf" in page
    assert "<script>alert(1)</script>" not in page  # only inside the escaped srcdoc
    client.post(changelist, {"action": "retry_now", "_selected_action": [row.pk]})
    row.refresh_from_db()
    assert row.status == "queued"
    client.post(changelist, {"action": "cancel", "_selected_action": [row.pk]})
    row.refresh_from_db()
    assert row.status == "cancelled"


def test_list_actions_verify_pause_resume(client, staff, account, sandbox):
    changelist = reverse("admin:django_gmail_smtp_gmailaccount_changelist")
    selected = {"_selected_action": [account.pk]}
    page = client.post(changelist, {"action": "verify", **selected}, follow=True).content.decode()
    assert f"Verified {SENDER}: connected over verified TLS" in page
    client.post(changelist, {"action": "pause", **selected})
    account.refresh_from_db()
    assert account.is_active is False
    client.post(changelist, {"action": "resume", **selected})
    account.refresh_from_db()
    assert account.is_active is True
    page = client.post(changelist, {"action": "send_test", **selected}, follow=True)
    assert "Test message sent from" in page.content.decode()
    assert sandbox.deliveries[0].rcpt_tos == ["admin@example.net"]


# --- issue 10: admin polish ----------------------------------------------------------------------

DATE = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}"


def row_html(page: str, pk: int) -> str:
    """The changelist row (``<tr>...</tr>``) of object ``pk``."""
    import re

    match = re.search(rf'<tr>(?:(?!</tr>).)*value="{pk}"(?:(?!</tr>).)*</tr>', page, re.S)
    assert match, f"no row for {pk}"
    return match.group(0)


def test_quota_column_says_room_now_and_the_next_slot_only_at_the_limit(
    client, staff, account, sandbox
):
    from django.core.mail import send_mail

    for i in range(5):
        send_mail(f"s{i}", "b", SENDER, ["t@example.net"])
    changelist = reverse("admin:django_gmail_smtp_gmailaccount_changelist")
    dashboard = reverse("admin:django_gmail_smtp_dashboard")
    row = row_html(client.get(changelist).content.decode(), account.pk)
    assert "5 / 500" in row and "room for 495 messages now" in row
    assert "next slot" not in row.lower()
    page = client.get(dashboard).content.decode()
    assert "Room now" in page and "495 messages" in page and "Next slot frees" not in page

    GmailAccount.objects.filter(pk=account.pk).update(daily_limit=5)  # now at its limit
    row = row_html(client.get(changelist).content.decode(), account.pk)
    assert "5 / 5" in row and "room for" not in row
    assert "at the limit; next slot frees" in row and "gms-quota-room-full" in row
    page = client.get(dashboard).content.decode()
    assert "Next slot frees" in page and "Room now" not in page


def test_outbox_attempts_count_the_log(client, staff, account, sandbox, no_dispatch):
    from django_gmail_smtp.tasks import send_outbound_email

    row = queued_row(account)
    send_outbound_email(row.pk)  # the task's code, in this process, over the sandbox
    row.refresh_from_db()
    assert row.status == OutboundEmail.Status.SENT and row.log.count() == 1
    import re

    page = client.get(reverse("admin:django_gmail_smtp_outboundemail_changelist")).content
    cell = re.search(r'<td class="field-attempt[^"]*">(\d+)</td>', row_html(page.decode(), row.pk))
    assert cell.group(1) == "1"
    detail = client.get(reverse("admin:django_gmail_smtp_outboundemail_change", args=[row.pk]))
    assert "1 (see the log below)" in detail.content.decode()


def test_outbox_row_shows_every_date_in_one_format(client, staff, account, sandbox, no_dispatch):
    import re

    from django_gmail_smtp.tasks import send_outbound_email

    row = queued_row(account)
    send_outbound_email(row.pk)
    page = client.get(reverse("admin:django_gmail_smtp_outboundemail_changelist")).content
    html = row_html(page.decode(), row.pk)
    created = re.search(r'<td class="field-(?:created|queued)_at[^"]*">([^<]*)</td>', html)[1]
    sent = re.search(r'<td class="field-when[^"]*">([^<]*)</td>', html).group(1)
    assert re.fullmatch(DATE, created) and re.fullmatch(DATE, sent), (created, sent)
    detail = client.get(
        reverse("admin:django_gmail_smtp_outboundemail_change", args=[row.pk])
    ).content.decode()
    attempt_at = re.search(r'<td class="field-at_time">\s*<p>([^<]*)</p>', detail).group(1)
    assert re.fullmatch(DATE, attempt_at.strip()), attempt_at


def test_outbox_footer_counts_outbound_emails(client, staff, account, sandbox, no_dispatch):
    changelist = reverse("admin:django_gmail_smtp_outboundemail_changelist")
    queued_row(account, subject="one")
    assert "1 outbound email<" in client.get(changelist).content.decode()
    queued_row(account, subject="two")
    page = client.get(changelist).content.decode()
    assert "2 outbound emails" in page and "2 outbox" not in page
    # The app index still calls the list "Outbox".
    assert ">Outbox<" in client.get(reverse("admin:index")).content.decode()


def test_outbox_flags_mail_waiting_too_long(client, staff, account, sandbox, no_dispatch):
    from datetime import timedelta

    from django.utils import timezone

    changelist = reverse("admin:django_gmail_smtp_outboundemail_changelist")
    queued_row(account, subject="fresh")
    page = client.get(changelist).content.decode()
    assert "waiting longer than expected" not in page  # just queued: nothing to say

    stuck = queued_row(account, subject="stuck")
    hour_ago = timezone.now() - timedelta(hours=1)
    OutboundEmail.objects.filter(pk=stuck.pk).update(created_at=hour_ago, updated_at=hour_ago)
    late = queued_row(account, subject="late")
    OutboundEmail.objects.filter(pk=late.pk).update(
        status=OutboundEmail.Status.DEFERRED, reason="retry", next_attempt_at=hour_ago
    )
    page = client.get(changelist).content.decode()
    assert "2 messages waiting longer than expected" in page
    assert "Celery worker is running" in page and "CELERY_BROKER_URL" in page
    assert "?waiting=too-long" in page

    filtered = client.get(changelist + "?waiting=too-long").content.decode()
    assert "stuck" in filtered and "late" in filtered and ">fresh<" not in filtered
    assert "2 outbound emails" in filtered


def test_error_advice_is_set_apart_from_gmails_reply(client, staff, sandbox, make_account):
    account = make_account(sandbox, app_password="wrongwrongwrongw")
    url = reverse("admin:django_gmail_smtp_gmailaccount_operation", args=[account.pk, "verify"])
    page = client.post(url, follow=True).content.decode()
    assert "gsmtp&quot;. What to do: " in page
    # Text stored before the fix runs on ("- gsmtp The App ..."): shown on two lines.
    row = OutboundEmail.objects.create(
        status=OutboundEmail.Status.FAILED,
        account_email=account.email,
        from_email=account.email,
        recipients=["to@example.net"],
        last_error="Refused. Gmail replied: 535 5.7.8 Not accepted. x1 - gsmtp The App Password "
        "was refused.",
    )
    detail = client.get(
        reverse("admin:django_gmail_smtp_outboundemail_change", args=[row.pk])
    ).content.decode()
    assert "x1 - gsmtp<br>The App Password was refused." in detail


def test_chart_keeps_major_labels_for_narrow_screens():
    import re
    from datetime import datetime, timedelta

    from django_gmail_smtp.stats import bar_chart

    hours = [(f"{(datetime(2026, 1, 1) + timedelta(hours=h)):%H}h", h, h) for h in range(24)]
    svg = str(bar_chart(hours, title="t"))
    labels = re.findall(r'<text [^>]*class="(gms-axis[^"]*)"[^>]*>(\d+h)</text>', svg)
    assert len(labels) == 12  # every other hour on a wide screen
    major = [text for css, text in labels if "gms-axis-minor" not in css]
    assert major == ["00h", "04h", "08h", "12h", "16h", "20h"]  # what a phone shows
    days = [(f"{d:02d} Jan", d, 1) for d in range(1, 31)]
    major = re.findall(r'class="gms-axis"[^>]*>(\d\d Jan)<', str(bar_chart(days, title="t")))
    assert 5 <= len(major) <= 8
