"""A newsletter in a real browser: Playwright driving Debian's Chromium (headless) against the
example project's admin (``runserver`` on 127.0.0.1), sending through a Gmail sandbox.

One walk, as a site owner would do it: log in, create a list, import a CSV, write a campaign,
preview it, send a test, start it (the confirmation page shows the estimate), watch progress,
pause, resume, then open the unsubscribe link of a message a reader received: the GET page
unsubscribes nothing, its button (a POST) does.

The test plays the Celery beat and the worker: it runs the planner's ticks and delivers what
they queued in a subprocess with the site's settings (``AdminServer.python``), with a clock it
moves 6 hours at each tick (the account may send 10 messages a day, so a list of 8 takes a
day). The sandbox's Gmail-like daily limit follows the same clock.

Each step saves a full-page screenshot into ``tmp_path/screenshots/`` (copied to
``/tmp/nl_browser_shots/``) after checking that the page does not scroll sideways at 1280 px.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from django_gmail_smtp.testing import GmailSandbox

from .browser_support import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    CHROMIUM,
    CHROMIUM_ARGS,
    VIEWPORT,
    AdminServer,
    chromium_missing,
)

_missing = chromium_missing()
if _missing:
    pytest.skip(_missing, allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.integration]
expect.set_options(timeout=15_000)  # a busy CI machine; a passing run waits much less

SENDER = "news@example.com"
APP_PASSWORD = "abcd efgh ijkl mnop"
DAILY_LIMIT = 10  # 9 a day of newsletter mail (RESERVED_SHARE keeps 10% for transactional)
TICK = 6 * 3600  # seconds of the test's clock between planner ticks (NEWSLETTER_TICK)
SHOTS_COPY = Path("/tmp/nl_browser_shots")
APP = "/admin/gmail_smtp_newsletters/"

READERS = [
    ("ada@example.net", "Ada Lovelace", "London"),
    ("alan@example.net", "Alan Turing", "Manchester"),
    ("grace@example.net", "Grace Hopper", "New York"),
    ("edsger@example.net", "Edsger Dijkstra", "Austin"),
    ("barbara@example.net", "Barbara Liskov", "Boston"),
    ("donald@example.net", "Donald Knuth", "Stanford"),
    ("margaret@example.net", "Margaret Hamilton", "Cambridge"),
    ("ken@example.net", "Ken Thompson", "Murray Hill"),
]
CSV = (
    "email,name,city\n"
    + "".join(f"{e},{n},{c}\n" for e, n, c in READERS)
    + "Grace@Example.NET,Grace again,Arlington\n"  # a repeat: skipped
    + "not-an-address,Nobody,Nowhere\n"  # invalid: skipped
)
SEED = "editor@example.com"

# The sender account: App Password, 10 messages a day, the default (test sends use it too).
ACCOUNT = """
import sys
from django_gmail_smtp.models import GmailAccount
email, password, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
GmailAccount.objects.create(
    email=email, app_password=password, daily_limit=limit, is_default=True
)
"""

# One beat tick and the worker's deliveries, on the test's clock (seconds ahead of real time).
TICK_AND_DELIVER = """
import sys
from datetime import timedelta
from django.utils import timezone
from django_gmail_smtp import outbox, quota
from django_gmail_smtp.models import OutboundEmail
from django_gmail_smtp.newsletters import planner

offset = float(sys.argv[1])
quota.set_clock(lambda: timezone.now() + timedelta(seconds=offset))
queued = planner.tick().get("queued", 0)
due = OutboundEmail.objects.filter(status="queued", priority="bulk").order_by("pk")
outcomes = [outbox.deliver(pk) for pk in due.values_list("pk", flat=True)]
print(queued, outcomes.count("sent"), len(outcomes))
"""

# What the server's database says about a subscription and its campaign mail.
SUBSCRIPTION = """
import sys
from django_gmail_smtp.newsletters.models import CampaignRecipient, Subscriber, Suppression
email = sys.argv[1]
subscriber = Subscriber.objects.get(email=email)
recipients = sorted(CampaignRecipient.objects.filter(email=email).values_list("status", flat=True))
print(subscriber.status, Suppression.objects.filter(email=email).count(), ",".join(recipients))
"""

# Boxes that scroll sideways (the admin's change list table scrolls inside div.results).
SIDEWAYS = """() => [...document.querySelectorAll('body *:not(textarea)')]
  .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX)
               && e.scrollWidth > e.clientWidth + 1)
  .map(e => `${e.tagName.toLowerCase()}.${e.className}: ${e.scrollWidth} > ${e.clientWidth} px`)"""


class Clock:
    """The test's clock: real time plus ``offset`` seconds (the ticks and the sandbox)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def epoch(self) -> float:
        return time.time() + self.offset


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gmail(clock: Clock) -> Iterator[GmailSandbox]:
    """The Gmail sandbox (STARTTLS): the sender may send 10 messages a day, on the test's
    clock, and refuses more like Gmail."""
    with GmailSandbox(security="starttls") as sandbox:
        sandbox.add_user(SENDER, app_password=APP_PASSWORD, daily_limit=DAILY_LIMIT)
        sandbox.clock = clock.epoch
        yield sandbox


@pytest.fixture
def server(gmail: GmailSandbox, tmp_path: Path) -> Iterator[AdminServer]:
    """The example project's site on 127.0.0.1, its newsletter links pointing at it."""
    workdir = tmp_path / "site"
    workdir.mkdir()
    server = AdminServer(workdir, {**gmail.settings(), "NEWSLETTER_TICK": TICK})
    server.env["GMAIL_SMTP_SITE_URL"] = server.url
    # runserver has no TLS: the warning that unsubscribe links should be https is expected.
    server.env["SILENCED_SYSTEM_CHECKS"] = "gmail_smtp_newsletters.W001"
    server.start()
    server.python(ACCOUNT, SENDER, APP_PASSWORD, str(DAILY_LIMIT))
    yield server
    server.stop()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


@pytest.fixture
def page(server: AdminServer, shots: Path) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport=VIEWPORT, base_url=server.url)
        context.set_default_timeout(15_000)
        page = context.new_page()
        try:
            yield page
        finally:
            page.screenshot(path=shots / "zz-last-page.png", full_page=True)
            SHOTS_COPY.mkdir(parents=True, exist_ok=True)
            for old in SHOTS_COPY.glob("*.png"):
                old.unlink()
            for picture in shots.glob("*.png"):
                shutil.copy(picture, SHOTS_COPY / picture.name)
            browser.close()


# --- helpers -------------------------------------------------------------------------------------


def look(page: Page, shots: Path, name: str) -> None:
    """Check that the page fits 1280 px without scrolling sideways (no box on it scrolls
    sideways either) and holds no App Password, then save its full-page screenshot as
    NAME.png."""
    html = page.content()
    for secret in (APP_PASSWORD, APP_PASSWORD.replace(" ", "")):
        assert secret not in html, f"{name}: the App Password is in the page's HTML"
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= VIEWPORT["width"], f"{name}: {width} px wide; it scrolls sideways"
    sideways = page.evaluate(SIDEWAYS)
    assert not sideways, f"{name}: part of the page scrolls sideways, out of sight: {sideways}"
    if page.locator("iframe").count():
        # Chromium does not paint a frame that is off screen, even in a full-page capture.
        height = page.evaluate("document.documentElement.scrollHeight")
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.evaluate(
            "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
        )
        page.screenshot(path=shots / f"{name}.png", full_page=True)
        page.set_viewport_size(VIEWPORT)
    else:
        page.screenshot(path=shots / f"{name}.png", full_page=True)


def buttons_apart(page: Page) -> None:
    """The campaign page's buttons and the admin's HISTORY pill beside them do not overlap,
    nor touch: at least ``gap`` px apart."""
    gap = 6
    pill = page.locator(".object-tools a").first.bounding_box()
    assert pill is not None
    for button in page.locator(".gms-buttons .button").all():
        box = button.bounding_box()
        assert box is not None
        overlap = (
            box["x"] < pill["x"] + pill["width"] + gap
            and pill["x"] < box["x"] + box["width"] + gap
            and box["y"] < pill["y"] + pill["height"] + gap
            and pill["y"] < box["y"] + box["height"] + gap
        )
        assert not overlap, f"{button.inner_text()!r} {box} lies under HISTORY {pill}"


def tick(server: AdminServer, clock: Clock) -> tuple[int, int]:
    """Move the clock one tick on, run the planner and deliver what it queued; return
    (queued, sent)."""
    clock.offset += TICK
    queued, sent, total = map(int, server.python(TICK_AND_DELIVER, str(clock.offset)).split())
    assert sent == total, f"{total - sent} of the {total} queued messages were not sent"
    return queued, sent


def success(page: Page):
    return page.locator("ul.messagelist li.success")


# --- the walk ------------------------------------------------------------------------------------


def test_a_newsletter_from_list_to_unsubscribe(
    page: Page, server: AdminServer, gmail: GmailSandbox, clock: Clock, shots: Path, tmp_path: Path
) -> None:
    # Log in: the newsletters have their section on the admin's index.
    page.goto("/admin/login/?next=/admin/")
    page.locator("#id_username").fill(ADMIN_USER)
    page.locator("#id_password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("link", name="Mailing lists")).to_be_visible()
    expect(page.get_by_role("link", name="Campaigns")).to_be_visible()
    look(page, shots, "01-admin-index")

    # A list.
    page.goto(APP + "mailinglist/add/")
    page.locator("#id_name").fill("Example weekly")
    page.locator("#id_slug").fill("example-weekly")
    page.locator("#id_from_email").fill(f"Example weekly <{SENDER}>")
    look(page, shots, "02-list-add")
    page.locator("input[name=_continue]").click()
    expect(success(page)).to_contain_text("was added successfully")

    # Import CSV: 8 added, the repeat and the invalid line skipped with their reasons.
    page.get_by_role("link", name="Import CSV").click()
    csv_file = tmp_path / "readers.csv"
    csv_file.write_text(CSV)
    page.locator("input[type=file]").set_input_files(csv_file)
    page.get_by_label("Subscribe them now (I hold their consent)").check()
    look(page, shots, "03-import-form")
    page.get_by_role("button", name="Import").click()
    report = page.locator("section.gms-nl-report")
    expect(report).to_contain_text("Added8")
    expect(report).to_contain_text("Skipped2")
    expect(report).to_contain_text("the same address is on an earlier line")
    expect(report).to_contain_text("not-an-address")
    look(page, shots, "04-import-report")
    report.get_by_role("link", name="See the list's subscribers").click()
    expect(page.locator("#result_list tbody tr")).to_have_count(len(READERS))
    look(page, shots, "05-subscribers")

    # A campaign: templates with merge fields; the test recipient.
    page.goto(APP + "campaign/add/")
    page.locator("#id_name").fill("Issue 1")
    page.locator("#id_mailing_list").select_option(label="Example weekly")
    page.locator("#id_subject").fill("Example weekly for {{ subscriber.name }}")
    page.locator("#id_text_template").fill(
        "Hello {{ subscriber.name }},\n\nThe news from {{ subscriber.fields.city }}.\n\n"
        "Unsubscribe: {{ unsubscribe_url }}\n"
    )
    page.locator("#id_html_template").fill(
        "<h1>Hello {{ subscriber.name }}</h1><p>The news from "
        "<b>{{ subscriber.fields.city }}</b>.</p>"
    )
    page.locator("#id_seed_emails").fill(SEED)
    look(page, shots, "06-campaign-add")
    page.locator("input[name=_continue]").click()
    expect(success(page)).to_contain_text("was added successfully")
    change_url = page.url

    # Preview as a chosen subscriber: the text and the HTML (in a sandboxed frame).
    page.get_by_role("button", name="Preview").click()
    page.locator("#id_subscriber").select_option(label="grace@example.net (Grace Hopper)")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("table.gms-headers")).to_contain_text("Example weekly for Grace Hopper")
    expect(page.locator("pre.gms-text")).to_contain_text("The news from New York.")
    expect(page.frame_locator("iframe.gms-preview").locator("h1")).to_have_text(
        "Hello Grace Hopper"
    )
    look(page, shots, "07-preview")
    page.locator("pre.gms-text").screenshot(path=shots / "07b-preview-text.png")

    # Send test: at once, to the test recipient, marked [Test].
    page.get_by_role("button", name=f"Send test to {SEED}").click()
    expect(success(page)).to_contain_text(f"Test sent to {SEED}")
    look(page, shots, "08-test-sent")
    [test_mail] = gmail.wait_for(1)
    assert test_mail.rcpt_tos == [SEED] and test_mail.subject.startswith("[Test] Example weekly")
    assert test_mail.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    # Start: the confirmation page gives the estimate first.
    page.goto(change_url)
    page.get_by_role("button", name="Start sending").click()
    estimate = page.locator(".gms-nl-estimate")
    expect(estimate).to_have_text(
        re.compile(r"8 recipients: about 2\d hours( \d+ minutes)? at 9/day across 1 account\.")
    )
    look(page, shots, "09-start-confirm")
    page.get_by_role("button", name="Yes, start sending").click()
    expect(success(page)).to_contain_text("Started: 8 recipient(s) enrolled.")
    progress = page.locator(".field-progress_panel")
    expect(progress).to_contain_text("0 of 8 sent")
    buttons_apart(page)
    look(page, shots, "10-started")

    # Watch: each tick (6 hours) sends 2 or 3 (9 a day).
    sent = 0
    for step in (1, 2):
        queued, delivered = tick(server, clock)
        assert queued in (2, 3), queued
        sent += delivered
        page.reload()
        expect(progress).to_contain_text(f"{sent} of 8 sent")
        look(page, shots, f"11-progress-{step}")

    # Pause: nothing more goes out, however much time passes.
    page.get_by_role("button", name="Pause").click()
    expect(success(page)).to_contain_text("Paused")
    expect(progress).to_contain_text(f"{sent} of 8 sent")
    # Said once, plainly: who paused it and when, as its status (not again under progress).
    expect(page.locator(".field-state")).to_have_text(
        re.compile(r"Paused by admin on \d{4}-\d\d-\d\d \d\d:\d\d \w+\.")
    )
    expect(progress).not_to_contain_text("Paused")
    buttons_apart(page)
    look(page, shots, "12-paused")
    assert tick(server, clock) == (0, 0)
    page.reload()
    expect(progress).to_contain_text(f"{sent} of 8 sent")

    # Resume: the next tick sends again.
    page.get_by_role("button", name="Resume").click()
    expect(page.get_by_role("button", name="Pause")).to_be_visible()
    queued, delivered = tick(server, clock)
    assert queued > 0
    sent += delivered
    page.reload()
    expect(progress).to_contain_text(f"{sent} of 8 sent")
    look(page, shots, "13-resumed")
    page.get_by_role("button", name="Recipients").click()
    expect(page.locator("#result_list tbody tr")).to_have_count(len(READERS))
    look(page, shots, "14-recipients")

    # A reader opens the unsubscribe link of the message she received.
    campaign_mail = [d for d in gmail.deliveries if d.rcpt_tos != [SEED]]
    assert len(campaign_mail) == sent
    reader = campaign_mail[0].rcpt_tos[0]
    header = str(campaign_mail[0].message["List-Unsubscribe"])
    link = re.search(r"<(http[^>]+)>", header).group(1)
    assert link.startswith(server.url + "/newsletters/unsubscribe/"), header
    assert f"<mailto:{SENDER}?subject=unsubscribe" in header
    page.goto(link)
    expect(page.get_by_role("heading", name="Unsubscribe")).to_be_visible()
    expect(page.locator("main")).to_contain_text(f"Stop sending Example weekly to {reader}?")
    look(page, shots, "15-unsubscribe-page")
    # The GET (what a link scanner does too) changed nothing.
    assert server.python(SUBSCRIPTION, reader) == "active 0 sent"
    page.get_by_role("button", name="Unsubscribe").click()
    assert urlsplit(page.url).path == urlsplit(link).path  # answered in place, no redirect
    look(page, shots, "16-unsubscribed")
    status, suppressions, _recipients = server.python(SUBSCRIPTION, reader).split()
    assert (status, suppressions) == ("unsubscribed", "1")

    # In the admin: on the suppression list, with how and where.
    page.goto(APP + "suppression/")
    row = page.locator("#result_list tbody tr").filter(has_text=reader)
    expect(row).to_have_count(1)
    expect(row).to_contain_text("unsubscribed")
    look(page, shots, "17-suppression-list")

    # The rest goes out; the campaign finishes with every reader sent exactly one message.
    for _ in range(8):
        if sent == len(READERS):
            break
        sent += tick(server, clock)[1]
    page.goto(change_url)
    expect(page.locator(".field-state")).to_contain_text("finished")
    expect(progress).to_contain_text("8 of 8 sent")
    expect(page.get_by_role("button", name="Retry failed")).to_have_count(0)  # none failed
    look(page, shots, "18-finished")
    page.goto(APP + "campaign/")
    expect(page.locator("td.field-bounced_column")).to_have_text("0")
    look(page, shots, "19-campaigns")
    received = sorted(d.rcpt_tos[0] for d in gmail.deliveries if d.rcpt_tos != [SEED])
    assert received == sorted(e for e, _n, _c in READERS)
