"""The Django admin in a real browser: Playwright driving Debian's Chromium (headless) against the
example project's admin, served by ``runserver`` on 127.0.0.1 and sending through a Gmail sandbox.

Each step saves a full-page screenshot (1280x800 viewport) to test-artifacts/screenshots/, checks
that no secret is anywhere in the page's HTML, and that the page does not scroll sideways.
The server is another process: state is checked through the pages and the sandbox, and set up
through the site's own Django (``AdminServer.python``) where the admin has no form for it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from django_gmail_smtp.testing import GmailSandbox

from .browser_support import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    ADMIN_USER,
    CHROMIUM,
    CHROMIUM_ARGS,
    SCREENSHOTS,
    VIEWPORT,
    AdminServer,
    chromium_missing,
    reset_screenshots,
)

_missing = chromium_missing()
if _missing:
    pytest.skip(_missing, allow_module_level=True)

from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.integration]
expect.set_options(timeout=15_000)  # a busy CI machine; a passing run waits much less

SENDER = "sender@example.com"
APP_PASSWORD = "abcd efgh ijkl mnop"  # typed as Google shows it
OAUTH_SENDER = "oauth@example.com"
CLIENT_ID = "browser-test-client.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-browser-client-secret-4f7a"
SECRETS = (APP_PASSWORD, APP_PASSWORD.replace(" ", ""), CLIENT_SECRET)

ACCOUNTS = "/admin/django_gmail_smtp/gmailaccount/"
OUTBOX = "/admin/django_gmail_smtp/outboundemail/"

# A message Gmail refused for good, with its attempt log, as the Celery task records it.
FAILED_ROW = """
import sys
from django.core.mail import EmailMultiAlternatives
from django_gmail_smtp.models import GmailAccount, OutboundAttempt, OutboundEmail

sender, to = sys.argv[1:3]
message = EmailMultiAlternatives(
    "Your order #1042 has shipped",
    "Hello Dana,\\n\\nYour order #1042 left our warehouse today.\\n\\nThe Example shop\\n",
    sender,
    [to],
    headers={"Message-ID": "<order-1042.browser-test@example.com>"},
)
message.attach_alternative(
    "<h1>Order #1042 has shipped</h1><p>Hello Dana, your order left our warehouse today.</p>"
    '<p><img src="https://tracker.example.net/pixel.gif" alt=""></p>',
    "text/html",
)
raw = message.message().as_bytes()
reply = "550-5.1.1 The email account that you tried to reach does not exist."
row = OutboundEmail.objects.create(
    status=OutboundEmail.Status.FAILED,
    reason=OutboundEmail.Reason.PERMANENT,
    account=GmailAccount.objects.filter(email=sender).first(),
    account_email=sender,
    from_email=sender,
    recipients=[to],
    subject="Your order #1042 has shipped",
    message_id="<order-1042.browser-test@example.com>",
    mime=raw,
    size=len(raw),
    attempts=1,
    last_error=reply,
    last_code=550,
)
OutboundAttempt.objects.create(
    outbound=row, account_email=sender, outcome="failed", code=550, reply=reply,
    phase="rcpt", worker="celery@worker-1",
)
print(row.pk)
"""

# The App Password account with a message sent in the last 24 hours (when the dashboard test
# runs on its own, or after the account test stopped early).
ACCOUNT_WITH_A_SEND = """
import sys
from django.core.mail import EmailMessage
from django_gmail_smtp.backends import GmailSMTPBackend
from django_gmail_smtp.models import GmailAccount

sender, password, to = sys.argv[1:4]
account, _ = GmailAccount.objects.get_or_create(
    email=sender, defaults={"app_password": password, "is_default": True}
)
if not account.quota_status().messages_used:
    GmailSMTPBackend(account=sender).send_messages([EmailMessage("Hello", "Hi.", sender, [to])])
"""


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gmail() -> Iterator[GmailSandbox]:
    """The Gmail sandbox (STARTTLS) the admin's server sends through."""
    with GmailSandbox(security="starttls") as sandbox:
        sandbox.add_user(SENDER, app_password=APP_PASSWORD)
        yield sandbox


@pytest.fixture(scope="module")
def server(gmail: GmailSandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminServer]:
    """The example project's admin on 127.0.0.1, on its own SQLite database."""
    server = AdminServer(tmp_path_factory.mktemp("admin-site"), gmail.settings()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    reset_screenshots()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, server: AdminServer, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT, base_url=server.url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:  # show what the browser and server saw
        page.screenshot(path=SCREENSHOTS / f"FAILED-{request.node.name}.png", full_page=True)
        print(f"page: {page.url}\nrunserver log (last lines):\n{server.log()[-4000:]}")
    context.close()


@pytest.fixture
def admin(page: Page) -> Page:
    """A page logged in to the admin as the superuser."""
    log_in(page)
    return page


# --- helpers -------------------------------------------------------------------------------------


def log_in(page: Page) -> None:
    page.goto("/admin/login/?next=/admin/")
    page.locator("#id_username").fill(ADMIN_USER)
    page.locator("#id_password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#site-name")).to_be_visible()
    expect(page.get_by_role("heading", name="Site administration")).to_be_visible()


# Boxes that scroll sideways (the admin's change list table scrolls inside div.results).
SIDEWAYS = """() => [...document.querySelectorAll('body *:not(textarea)')]
  .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX)
               && e.scrollWidth > e.clientWidth + 1)
  .map(e => `${e.tagName.toLowerCase()}.${e.className}: ${e.scrollWidth} > ${e.clientWidth} px`)"""


def look(page: Page, name: str, gmail: GmailSandbox) -> None:
    """Check that the page holds no secret and fits 1280 px without scrolling sideways, then
    save its full-page screenshot as test-artifacts/screenshots/NAME.png."""
    html = page.content()
    tokens = [*gmail._oauth._refresh, *gmail._oauth._access]  # every token the sandbox issued
    for secret in (*SECRETS, *tokens):
        assert secret not in html, f"{name}: a secret ({secret[:6]}...) is in the page's HTML"
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= VIEWPORT["width"], f"{name}: {width} px wide; it scrolls sideways at 1280x800"
    sideways = page.evaluate(SIDEWAYS)
    assert not sideways, f"{name}: part of the page scrolls sideways, out of sight: {sideways}"
    path = SCREENSHOTS / f"{name}.png"
    if not page.locator("iframe").count():
        page.screenshot(path=path, full_page=True)
        return
    # Chromium does not paint a frame (the sandboxed message preview) that is off screen, even
    # in a full-page capture: make the viewport as tall as the page for the picture.
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    page.evaluate(
        "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
    )
    page.screenshot(path=path, full_page=True)
    page.set_viewport_size(VIEWPORT)


def shown(text: str) -> str:
    """A message as the admin shows it: Django's admin/base.html applies ``capfirst``, so a
    message that starts with an address starts with a capital ("Sender@example.com: ...")."""
    return text[:1].upper() + text[1:]


def success(page: Page) -> Locator:
    return page.locator("ul.messagelist li.success")


def info(page: Page) -> Locator:
    return page.locator("ul.messagelist li.info")


def error(page: Page) -> Locator:
    return page.locator("ul.messagelist li.error")


def account_row(page: Page, email: str) -> Locator:
    return page.locator("#result_list tbody tr").filter(
        has=page.locator("th.field-email a", has_text=email)
    )


def open_account(page: Page, email: str) -> None:
    page.goto(ACCOUNTS)
    account_row(page, email).locator("th.field-email a").click()
    expect(page.locator("#id_email")).to_have_value(email)


# --- the tests -----------------------------------------------------------------------------------


def test_log_in(page: Page, gmail: GmailSandbox) -> None:
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/login/\?next=/admin/$"))
    look(page, "01-login", gmail)
    log_in(page)
    expect(page.get_by_role("link", name="Gmail accounts")).to_be_visible()
    expect(page.get_by_role("link", name="Outbox")).to_be_visible()
    look(page, "02-admin-index", gmail)


def test_app_password_account_verify_send_test_and_quota(admin: Page, gmail: GmailSandbox) -> None:
    page = admin
    # Add the account through the form, App Password typed with Google's spaces.
    page.goto(ACCOUNTS)
    page.get_by_role("link", name="Add Gmail account").click()
    page.locator("#id_email").fill(SENDER)
    page.locator("#id_auth_method").select_option("app_password")
    page.locator("#id_app_password").fill(APP_PASSWORD)
    page.locator("#id_is_default").check()
    look(page, "03-account-add-form", gmail)
    page.locator("input[name=_save]").click()
    expect(success(page)).to_contain_text("was added successfully")

    # In the list: not checked yet, nothing sent.
    row = account_row(page, SENDER)
    expect(row.locator(".gms-badge")).to_have_text("not checked yet")
    expect(row.locator(".gms-quota-text")).to_have_text("0 / 500")
    expect(row.locator("td.field-last_send")).to_have_text("never")
    look(page, "04-accounts-new", gmail)

    # Verify: a plain-words answer, and the health badge turns ok.
    open_account(page, SENDER)
    expect(page.locator("input[type=password]").first).to_have_value("")
    page.get_by_role("button", name="Verify").click()
    expect(success(page)).to_have_text(
        shown(f"Verified {SENDER}: connected over verified TLS and logged in. Ready to send.")
    )
    look(page, "05-account-verified", gmail)
    page.goto(ACCOUNTS)
    badge = account_row(page, SENDER).locator(".gms-badge")
    expect(badge).to_have_text("ok")
    expect(badge).to_have_class("gms-badge gms-ok")
    assert badge.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(223, 240, 216)", (
        "admin.css is not applied"
    )

    # Send a test message to the signed-in user: Gmail (the sandbox) accepts it.
    open_account(page, SENDER)
    page.get_by_role("button", name="Send test message to me").click()
    expect(success(page)).to_contain_text(
        f"Test message sent from {SENDER} to {ADMIN_EMAIL}. Gmail replied: 2.0.0 OK"
    )
    look(page, "06-account-test-sent", gmail)
    [test_message] = [d for d in gmail.deliveries if d.subject == f"Test message from {SENDER}"]
    assert test_message.rcpt_tos == [ADMIN_EMAIL] and test_message.user == SENDER
    assert test_message.mechanism in ("PLAIN", "LOGIN") and test_message.tls_version

    # The quota bar moved: 1 of 500, and the last send is filled in.
    page.goto(ACCOUNTS)
    row = account_row(page, SENDER)
    expect(row.locator(".gms-quota-text")).to_have_text("1 / 500")
    expect(row.locator(".gms-quota-used")).to_have_attribute("style", "width:0.2%")
    expect(row.locator("td.field-last_send")).not_to_have_text("never")
    look(page, "07-accounts-after-send", gmail)


def test_connect_with_google(admin: Page, gmail: GmailSandbox, server: AdminServer) -> None:
    page = admin
    gmail.add_user(OAUTH_SENDER)  # a Google account with no App Password
    gmail.add_oauth_client(CLIENT_ID, CLIENT_SECRET)

    page.goto(ACCOUNTS + "add/")
    page.locator("#id_email").fill(OAUTH_SENDER)
    page.locator("#id_auth_method").select_option("oauth2")
    page.locator("#id_client_id").fill(CLIENT_ID)
    page.locator("#id_client_secret").fill(CLIENT_SECRET)
    page.locator("input[name=_continue]").click()
    expect(success(page)).to_contain_text("was added successfully")
    expect(page.locator(".field-client_secret .help")).to_contain_text("Stored (encrypted)")
    look(page, "08-oauth-account", gmail)

    # Connect with Google: the admin -> the sandbox's consent stand-in -> the admin's callback.
    visited: list[str] = []
    page.on("request", lambda request: visited.append(request.url))
    page.get_by_role("button", name="Connect with Google").click()
    expect(success(page)).to_have_text(
        f"Connected {OAUTH_SENDER} with Google: the refresh token is stored (encrypted). "
        "Use Verify to check that Gmail accepts it."
    )
    [consent] = [url for url in visited if url.startswith(gmail.auth_uri + "?")]
    params = parse_qs(urlsplit(consent).query)
    assert params["login_hint"] == [OAUTH_SENDER] and params["client_id"] == [CLIENT_ID]
    assert params["redirect_uri"] == [f"{server.url}{ACCOUNTS}oauth/callback/"]
    assert any(url.startswith(params["redirect_uri"][0] + "?") for url in visited)
    expect(page.locator(".field-refresh_token .help")).to_contain_text("Stored (encrypted)")
    look(page, "09-oauth-connected", gmail)

    # The stored token works: Verify logs in with XOAUTH2.
    page.get_by_role("button", name="Verify").click()
    expect(success(page)).to_contain_text(
        shown(f"Verified {OAUTH_SENDER}: connected over verified TLS")
    )

    # The Google user declines: an error in plain words, nothing changed.
    gmail.consent_error = "access_denied"
    try:
        page.get_by_role("button", name="Connect with Google").click()
        expect(error(page)).to_have_text(
            f"Google did not connect {OAUTH_SENDER}: the Google user declined to grant access. "
            "Nothing was changed."
        )
    finally:
        gmail.consent_error = None
    look(page, "10-oauth-declined", gmail)

    page.goto(ACCOUNTS)
    expect(account_row(page, OAUTH_SENDER).locator(".gms-badge")).to_have_text("ok")
    open_account(page, OAUTH_SENDER)
    page.get_by_role("link", name="History").click()
    expect(page.locator("#change-history")).to_be_visible()
    look(page, "11-account-history", gmail)


def test_outbox_retry_failed_message(admin: Page, gmail: GmailSandbox, server: AdminServer) -> None:
    page = admin
    row_id = server.python(FAILED_ROW, SENDER, "dana@example.org")
    checkbox = f'input.action-select[value="{row_id}"]'
    page.goto(OUTBOX)
    look(page, "12-outbox", gmail)

    # Filter by status: failed.
    page.locator('#changelist-filter details[data-filter-title="status"]').get_by_role(
        "link", name="failed", exact=True
    ).click()
    expect(page).to_have_url(re.compile(re.escape(f"{OUTBOX}?status__exact=failed") + "$"))
    row = page.locator("#result_list tbody tr").filter(has=page.locator(checkbox))
    expect(row.locator(".gms-badge")).to_have_text("failed (refused by Gmail)")
    expect(row.locator("td.field-recipients_short")).to_have_text("dana@example.org")
    look(page, "13-outbox-failed", gmail)

    # The message: headers, the HTML in a sandboxed frame, the text, and the attempt log.
    row.locator("th.field-subject_short a").click()
    frame = page.locator("iframe.gms-preview")
    expect(frame).to_have_attribute("sandbox", "")
    expect(page.frame_locator("iframe.gms-preview").locator("h1")).to_have_text(
        "Order #1042 has shipped"
    )
    expect(page.locator("pre.gms-text")).to_contain_text("Your order #1042 left our warehouse")
    attempts = page.locator("#log-group")
    expect(attempts).to_contain_text("550-5.1.1 The email account that you tried to reach")
    expect(attempts).to_contain_text("celery@worker-1")
    look(page, "14-outbox-message", gmail)

    # Back to the list: select it and run "Retry now".
    page.go_back()
    page.locator(checkbox).check()
    page.locator("select[name=action]").select_option("retry_now")
    # The actions button says "Go" up to Django 6.0 and "Run" from 6.1.
    page.locator('.actions button[type="submit"][name="index"]').click()
    expect(success(page)).to_have_text("1 message(s) handed to Celery again.")
    expect(page.locator(checkbox)).to_have_count(0)  # no longer failed
    look(page, "15-outbox-retried", gmail)

    page.goto(f"{OUTBOX}?status__exact=queued")
    row = page.locator("#result_list tbody tr").filter(has=page.locator(checkbox))
    expect(row.locator(".gms-badge")).to_have_text("queued")
    # One attempt so far (Gmail's 550, in the log), whatever the retry reset.
    expect(row.locator("td.field-attempt_count")).to_have_text("1")
    look(page, "16-outbox-queued", gmail)


def test_dashboard(admin: Page, gmail: GmailSandbox, server: AdminServer) -> None:
    page = admin
    server.python(ACCOUNT_WITH_A_SEND, SENDER, APP_PASSWORD, ADMIN_EMAIL)
    page.goto(ACCOUNTS)
    page.get_by_role("link", name="Sending dashboard").click()
    expect(page.get_by_role("heading", name="Gmail sending dashboard")).to_be_visible()
    card = page.locator("section.gms-card").filter(has=page.get_by_role("heading", name=SENDER))
    expect(card.locator("svg.gms-chart")).to_have_count(2)
    expect(card.locator("svg.gms-chart title").first).to_contain_text("per hour, last 24 hours")
    expect(card.get_by_role("group", name="Quota, rolling 24 hours")).to_contain_text("Messages")
    expect(card.get_by_role("group", name="Outbox, last 30 days")).to_contain_text("Failed")
    # 24 hourly slots, and the messages sent in the last hours are drawn.
    heights = (
        card.locator("svg.gms-chart")
        .first.locator("rect.gms-m")
        .evaluate_all("rects => rects.map(r => parseFloat(r.getAttribute('height')))")
    )
    assert len(heights) == 24 and sum(heights) > 0
    look(page, "17-dashboard", gmail)

    # On a phone (400 px) the charts shrink with the page; their labels stay readable.
    page.set_viewport_size({"width": 400, "height": 800})
    try:
        chart = card.locator("svg.gms-chart").first
        labels = chart.locator("text.gms-axis:visible")
        sizes = labels.evaluate_all("ts => ts.map(t => t.getBoundingClientRect().height)")
        assert sizes and min(sizes) >= 9, f"chart labels {sizes} px high at 400 px wide"
        boxes = labels.evaluate_all(
            "ts => ts.filter(t => t.getAttribute('text-anchor') === 'middle')"
            ".map(t => { const r = t.getBoundingClientRect(); return [r.left, r.right]; })"
        )
        overlaps = [a for a, b in itertools.pairwise(boxes) if a[1] > b[0]]
        assert not overlaps, f"x labels overlap at 400 px: {overlaps}"
        page.screenshot(path=SCREENSHOTS / "18-dashboard-400px.png", full_page=True)
    finally:
        page.set_viewport_size(VIEWPORT)
