"""`manage.py gmail_smtp newsletter ...`: each command, its --help, and errors in plain words."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_gmail_smtp.models import GmailAccount
from django_gmail_smtp.newsletters import campaigns, cli
from django_gmail_smtp.newsletters.models import (
    Campaign,
    CampaignRecipient,
    MailingList,
    Subscriber,
    Suppression,
)

from .conftest import SENDER
from .factories import with_keys

pytestmark = pytest.mark.django_db


def newsletter(*args: str) -> str:
    """Run `manage.py gmail_smtp newsletter ARGS` in-process; return what it printed."""
    out = io.StringIO()
    call_command("gmail_smtp", "newsletter", *args, stdout=out, stderr=out)
    return out.getvalue()


def failing(*args: str) -> str:
    """The CommandError's message of a command that must fail."""
    with pytest.raises(CommandError) as info:
        newsletter(*args)
    return str(info.value)


@pytest.fixture
def news(settings, account):
    with_keys(settings, SITE_URL="https://news.example.org")
    mailing_list = MailingList.objects.create(name="News", slug="news", from_email=SENDER)
    for email in ("ann@example.net", "bob@example.net"):
        Subscriber.objects.create(
            mailing_list=mailing_list, email=email, status=Subscriber.Status.ACTIVE
        )
    Subscriber.objects.create(mailing_list=mailing_list, email="cy@example.net")  # pending
    draft = Campaign.objects.create(
        name="Spring letter", mailing_list=mailing_list, subject="Spring", text_template="Hi"
    )
    running = Campaign.objects.create(
        name="Winter letter", mailing_list=mailing_list, subject="Winter", text_template="Hi"
    )
    running.start()
    return {"list": mailing_list, "draft": draft, "running": running}


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), ["lists", "campaigns", "estimate", "start", "progress", "import", "INSTALLED_APPS"]),
        (("start",), ["--yes", "--domain-aligned", "5,000", "progress ID --watch"]),
        (("progress",), ["--watch", "Ctrl-C", "--interval"]),
        (("import",), ["LIST_SLUG", "FILE.csv", "--activate", "header row", "semicolons"]),
        (("estimate",), ["450/day across 1 account"]),
        (("pause",), ["--reason", "resume ID"]),
    ],
)
def test_help_explains(capsys, args, expected):
    """`gmail_smtp newsletter [COMMAND] --help` explains what it does and its options."""
    with pytest.raises(SystemExit) as exited:
        call_command("gmail_smtp", "newsletter", *args, "--help")
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in expected:
        assert words in text, words


def test_top_level_help_names_newsletter():
    from django_gmail_smtp.management.commands.gmail_smtp import Command

    text = Command().create_parser("manage.py", "gmail_smtp").format_help()
    assert "newsletter" in text


def test_without_the_sub_app_a_plain_error(settings):
    settings.INSTALLED_APPS = [
        app for app in settings.INSTALLED_APPS if app != "django_gmail_smtp.newsletters"
    ]
    message = failing("lists")
    assert 'add "django_gmail_smtp.newsletters" to INSTALLED_APPS' in message


# --- lists and campaigns -------------------------------------------------------------------------


def test_lists(news):
    out = newsletter("lists")
    row = next(line for line in out.splitlines() if line.startswith("news "))
    assert row.split()[-4:] == ["1", "2", "0", "0"]  # pending, active, unsubscribed, bounced
    assert "SUBSCRIBED" in out


def test_campaigns(news):
    out = newsletter("campaigns")
    draft = next(line for line in out.splitlines() if "Spring letter" in line)
    running = next(line for line in out.splitlines() if "Winter letter" in line)
    assert draft.startswith(str(news["draft"].pk)) and "draft" in draft
    assert running.startswith(str(news["running"].pk)) and "0/2" in running


def test_estimate_of_a_draft(news):
    out = newsletter("estimate", str(news["draft"].pk))
    assert re.search(
        r"Spring letter: 2 recipient\(s\), about .* at [\d,]+/day across 1 account", out
    )
    assert "example.com has sent 0 bulk message(s) in the last 24 hours" in out
    started = newsletter("estimate", str(news["running"].pk))
    assert "was started" in started and "0/2 sent" in started


def test_estimate_says_each_thing_once_with_thousands_separators(news):
    big = MailingList.objects.create(name="Big", slug="big", from_email=SENDER)
    Subscriber.objects.bulk_create(
        Subscriber(mailing_list=big, email=f"r{i}@example.net", status=Subscriber.Status.ACTIVE)
        for i in range(4000)
    )
    draft = Campaign.objects.create(
        name="Big letter", mailing_list=big, subject="Big", text_template="Hi"
    )
    out = newsletter("estimate", str(draft.pk))
    assert "Big letter: 4,000 recipient(s), about" in out
    assert "warning at 4,000, limit 5,000 a day" in out
    # An account that cannot send: no pace to tell, the reason once.
    GmailAccount.objects.update(is_active=False)
    out = newsletter("estimate", str(draft.pk))
    assert "Big letter: 4,000 recipient(s)." in out
    [reason] = [line for line in out.splitlines() if line.startswith("Waiting now: ")]
    assert out.count(reason.removeprefix("Waiting now: ")) == 1, out


def test_progress_of_a_finished_campaign_says_it_once(news):
    running = news["running"]
    running.recipients.update(status=CampaignRecipient.Status.SENT, account_email=SENDER)
    assert campaigns.finish_if_done(running)
    out = newsletter("progress", str(running.pk))
    assert "2/2 sent" in out and "| finished" in out
    assert "Pace:" not in out and "0 failed" not in out and "retry-failed" not in out


def test_unknown_campaign_in_plain_words(news):
    for command in ("estimate", "start", "pause", "resume", "cancel", "retry-failed", "progress"):
        message = failing(command, "999999")
        assert message.startswith("No campaign with id 999999."), command
        assert "newsletter campaigns" in message


def test_a_campaign_id_must_be_a_number(news):
    assert "invalid int value" in failing("start", "spring")


# --- start, pause, resume, cancel, retry ---------------------------------------------------------


def test_start_with_yes_enrols(news):
    draft = news["draft"]
    out = newsletter("start", str(draft.pk), "--yes")
    assert "Started Spring letter: 2 recipient(s) enrolled." in out
    draft.refresh_from_db()
    assert draft.status == Campaign.Status.RUNNING and draft.recipients.count() == 2
    assert "only a draft can be started" in failing("start", str(draft.pk), "--yes")


def test_start_asks_first(news, monkeypatch):
    draft = news["draft"]
    # Not on a terminal: nobody to ask, so --yes is needed.
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert "add --yes" in failing("start", str(draft.pk))
    # On a terminal: the answer decides.
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert failing("start", str(draft.pk)) == "Not started."
    assert Campaign.objects.get(pk=draft.pk).status == Campaign.Status.DRAFT
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert "enrolled" in newsletter("start", str(draft.pk), "--domain-aligned")
    draft.refresh_from_db()
    assert draft.status == Campaign.Status.RUNNING and draft.domain_aligned


def test_pause_resume_cancel_retry(news):
    running = news["running"]
    pk = str(running.pk)
    assert "Paused Winter letter" in newsletter("pause", pk, "--reason", "checking the links")
    running.refresh_from_db()
    assert running.status == Campaign.Status.PAUSED
    assert running.paused_reason == "checking the links"
    out = newsletter("progress", pk)
    assert "Paused: checking the links" in out and out.count("checking the links") == 1
    assert "Resumed Winter letter." in newsletter("resume", pk)
    assert "only a paused campaign can be resumed" in failing("resume", pk)
    # Paused without a reason: who and when, said once.
    newsletter("pause", pk)
    out = newsletter("progress", pk)
    assert re.search(r"^Paused by .+ with manage\.py on \d{4}-\d\d-\d\d", out, re.M), out
    assert out.count("Paused by") == 1 and "paused: paused" not in out.lower()
    newsletter("resume", pk)
    # Nothing failed: nothing to retry, and no hint to.
    assert "retry-failed" not in newsletter("progress", pk)
    assert (
        newsletter("retry-failed", pk).strip()
        == "Nothing to retry: no recipient of Winter letter failed."
    )
    CampaignRecipient.objects.filter(campaign=running, email="bob@example.net").update(
        status=CampaignRecipient.Status.FAILED
    )
    assert f"1 failed: `manage.py gmail_smtp newsletter retry-failed {pk}`" in newsletter(
        "progress", pk
    )
    assert "1 failed recipient(s) of Winter letter" in newsletter("retry-failed", pk)
    assert "Cancelled Winter letter" in newsletter("cancel", pk)
    assert Campaign.objects.get(pk=pk).status == Campaign.Status.CANCELLED
    assert "Not paused: The campaign is cancelled" in failing("pause", pk)


# --- progress ------------------------------------------------------------------------------------


def test_progress(news):
    out = newsletter("progress", str(news["running"].pk))
    assert "Winter letter (sending)" in out
    assert re.search(r"\[\.{30}\]\s+0% \| 0/2 sent", out)
    assert re.search(r"Pace: about .* across 1 account", out)
    assert "ACCOUNT" in out and SENDER in out


def test_progress_watch_until_finished(news, monkeypatch):
    """--watch prints the bar until the campaign finishes (here: as each wait passes, one more
    recipient is sent, then the campaign finishes)."""
    running = news["running"]
    waits = []

    def one_more_sent(seconds):
        waits.append(seconds)
        recipient = running.recipients.filter(status=CampaignRecipient.Status.PENDING).first()
        CampaignRecipient.objects.filter(pk=recipient.pk).update(
            status=CampaignRecipient.Status.SENT, account_email=SENDER
        )
        campaigns.finish_if_done(Campaign.objects.get(pk=running.pk))

    monkeypatch.setattr(cli.time, "sleep", one_more_sent)
    out = newsletter("progress", str(running.pk), "--watch", "--interval", "0.5")
    bars = [line for line in out.splitlines() if line.startswith("[")]
    assert len(bars) == 3 and waits == [0.5, 0.5]
    assert "1/2 sent" in bars[1] and "  50%" in bars[1]
    assert "#" * 30 in bars[2] and "2/2 sent" in bars[2] and "finished" in bars[2]
    assert out.rstrip().endswith("Winter letter: finished.")


def test_progress_watch_stops_on_ctrl_c(news, monkeypatch):
    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", interrupted)
    out = newsletter("progress", str(news["running"].pk), "--watch")
    assert "Stopped watching; the campaign goes on." in out
    assert Campaign.objects.get(pk=news["running"].pk).status == Campaign.Status.RUNNING


# --- import --------------------------------------------------------------------------------------


def test_import(news, tmp_path):
    Suppression.objects.create(email="gone@example.net", reason=Suppression.Reason.MANUAL)
    path = tmp_path / "people.csv"
    path.write_bytes(
        "\ufeffemail;name;city\nnew@example.net;New;Lyon\nnew@example.net;Again;\n"
        "gone@example.net;;\nbad address;;\n".encode()
    )
    out = newsletter("import", "news", str(path), "--activate")
    assert "4 rows read" in out
    assert "4 row(s) read: 1 added (active), 0 updated" in out
    assert "skipped 1: on the suppression list" in out
    assert "line 3: new@example.net: the same address is on an earlier line (line 2)" in out
    assert "line 5: bad address: not a valid email address" in out
    new = Subscriber.objects.get(email="new@example.net")
    assert new.status == Subscriber.Status.ACTIVE and new.fields == {"city": "Lyon"}
    assert new.consent_source.startswith("people.csv, imported by ")
    assert "with manage.py" in new.consent_source


def test_import_sends_confirmation_mail_when_asked(news, sandbox, tmp_path):
    sandbox.bad_recipients = {"refused@example.net"}
    path = tmp_path / "people.csv"
    path.write_text("email\nfresh@example.net\nrefused@example.net\ncy@example.net\n")
    out = newsletter("import", "news", str(path), "--send-confirmations")
    assert "2 added (awaiting confirmation), 0 updated, 1 already on the list unchanged" in out
    assert "Confirmation mail sent to 1, not sent to 1 (see below)." in out
    assert "confirmation mail not sent: refused@example.net: " in out
    [delivered] = sandbox.wait_for(1)
    assert delivered.rcpt_tos == ["fresh@example.net"]  # cy was on the list already
    assert "https://news.example.org/newsletters/confirm/" in delivered.message.get_body(
        ("plain",)
    ).get_content().replace("=\n", "")
    assert Subscriber.objects.get(email="refused@example.net").status == "pending"
    message = failing("import", "news", str(path), "--send-confirmations", "--activate")
    assert message.startswith("Choose one: --activate subscribes them at once")


def test_import_errors_in_plain_words(news, tmp_path):
    missing = tmp_path / "nowhere.csv"
    assert failing("import", "news", str(missing)) == (
        f"No file {missing}: give the path of a CSV file."
    )
    assert "No mailing list with slug 'olds'" in failing("import", "olds", str(missing))
    headless = tmp_path / "headless.csv"
    headless.write_text("ann@example.net,Ann\n")
    message = failing("import", "news", str(headless))
    assert "The file has no email column" in message and "email,name" in message
    assert Subscriber.objects.count() == 3
