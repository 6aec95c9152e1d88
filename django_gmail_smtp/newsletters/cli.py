"""``manage.py gmail_smtp newsletter ...``: lists, campaigns, their estimate and progress, CSV
import, and start/pause/resume/cancel, on a terminal.

The ``gmail_smtp`` command adds these subcommands with :func:`add_parser` and hands them to
:func:`handle`. Nothing here imports the sub-app's models at import time: the command must
still load (and say what to do) when the sub-app is not in ``INSTALLED_APPS``.
"""

from __future__ import annotations

import getpass
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

if TYPE_CHECKING:
    from .campaigns import Progress
    from .models import Campaign

APP = "django_gmail_smtp.newsletters"
NOT_INSTALLED = (
    f'The newsletters sub-app is not installed: add "{APP}" to INSTALLED_APPS (after '
    '"django_gmail_smtp"), run `manage.py migrate`, and try again.'
)
#: errors the campaign lifecycle raises for a user's mistake
USER_ERRORS = (ValueError, LookupError, ImproperlyConfigured)
BAR_WIDTH = 30

__all__ = ["add_parser", "bar_line", "handle"]


def add_parser(sub: Any, **kw: Any) -> None:
    """Add ``newsletter`` and its subcommands to the ``gmail_smtp`` subparsers ``sub``."""
    newsletter = sub.add_parser(
        "newsletter",
        help="newsletters: lists, campaigns, estimate, start/pause/resume, progress, import",
        description="Work with the newsletters sub-app (django_gmail_smtp.newsletters, which "
        "must be in INSTALLED_APPS): list the mailing lists and campaigns, see a draft's "
        "estimate, start, pause, resume or cancel a campaign, watch its progress, and import "
        "subscribers from a CSV file. Run `manage.py gmail_smtp newsletter COMMAND --help` for "
        "each command's options.",
        **kw,
    )
    commands = newsletter.add_subparsers(
        dest="newsletter_command", metavar="COMMAND", required=True
    )
    commands.add_parser(
        "lists",
        help="the mailing lists and their subscriber counts",
        description="Each mailing list: its slug (what `import` takes), its name, and how many "
        "of its subscribers are subscribed, awaiting confirmation, unsubscribed and bounced.",
        **kw,
    )
    commands.add_parser(
        "campaigns",
        help="the campaigns, their status and progress",
        description="Each campaign: its id (what the other commands take), status, audience, "
        "messages sent of its total, and when it is expected to end.",
        **kw,
    )
    estimate = commands.add_parser(
        "estimate",
        help="how long a campaign will take, before starting it",
        description="For a draft: how many recipients it would have and how long sending them "
        "takes at the pace the sender accounts' quotas allow (e.g. 'about 3 days 4 hours at "
        "450/day across 1 account'), and where the From domain stands against Gmail's "
        "5,000-a-day bulk-sender threshold. For a started campaign: its progress.",
        **kw,
    )
    estimate.add_argument("campaign", type=int, metavar="ID", help="the campaign's id")

    start = commands.add_parser(
        "start",
        help="start sending a draft campaign",
        description="Show the estimate, ask for confirmation (unless --yes), then enrol the "
        "audience and start sending. The planner (Celery beat) moves the recipients into the "
        "outbox at the pace the accounts allow; `progress ID --watch` follows it.",
        **kw,
    )
    start.add_argument("campaign", type=int, metavar="ID", help="the campaign's id")
    start.add_argument("--yes", action="store_true", help="start without asking")
    start.add_argument(
        "--domain-aligned",
        action="store_true",
        help="confirm that the From domain has SPF, DKIM and DMARC aligned, so the campaign "
        "may take it past 5,000 messages a day (otherwise sending stops for the day there)",
    )

    pause = commands.add_parser(
        "pause",
        help="pause a running campaign",
        description="Stop moving recipients into the outbox (mail already there still goes "
        "out). `resume ID` continues where it stopped.",
        **kw,
    )
    pause.add_argument("campaign", type=int, metavar="ID", help="the campaign's id")
    pause.add_argument("--reason", default="", help="why; shown in the admin")
    for name, text, description in (
        ("resume", "resume a paused campaign", "Continue a paused campaign where it stopped."),
        (
            "cancel",
            "cancel a campaign",
            "Cancel a running or paused campaign: recipients not sent yet get nothing. This "
            "cannot be undone.",
        ),
        (
            "retry-failed",
            "send again to the recipients whose mail failed",
            "Put the campaign's failed recipients back in line (and resume it if it had "
            "finished); the others are left as they are.",
        ),
    ):
        cmd = commands.add_parser(name, help=text, description=description, **kw)
        cmd.add_argument("campaign", type=int, metavar="ID", help="the campaign's id")

    progress = commands.add_parser(
        "progress",
        help="a campaign's progress (with --watch: a live progress bar)",
        description="Messages sent, waiting, failed and suppressed, the estimated end, why it "
        "waits if it does, and each account's share. With --watch, a progress bar that "
        "updates until the campaign is finished or cancelled (Ctrl-C stops watching; the "
        "campaign goes on).",
        **kw,
    )
    progress.add_argument("campaign", type=int, metavar="ID", help="the campaign's id")
    progress.add_argument("--watch", action="store_true", help="update until finished")
    progress.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="between updates (2)"
    )

    imp = commands.add_parser(
        "import",
        help="import subscribers from a CSV file",
        description="Add the people in FILE to the list LIST_SLUG (and update those already "
        "on it). The file needs a header row: email (required), name, and any other columns, "
        "which become merge fields. UTF-8 with or without a byte-order mark; commas or "
        "semicolons. Repeated, invalid and suppressed addresses, and people who unsubscribed "
        "or bounced, are skipped; the report says which and why. Nothing is imported if the "
        "file cannot be read.",
        **kw,
    )
    imp.add_argument("list", metavar="LIST_SLUG", help="the list's slug (see `lists`)")
    imp.add_argument("file", metavar="FILE.csv", help="the CSV file")
    imp.add_argument(
        "--activate",
        action="store_true",
        help="subscribe them at once (you hold their consent); without it they await confirmation",
    )
    imp.add_argument(
        "--send-confirmations",
        action="store_true",
        help="send the people added awaiting confirmation the confirmation mail (through the "
        "site's email backend); not with --activate",
    )


def handle(command: BaseCommand, options: dict[str, Any]) -> None:
    """Run ``gmail_smtp newsletter <command>``."""
    if not apps.is_installed(APP):
        raise CommandError(NOT_INSTALLED)
    name = options["newsletter_command"].replace("-", "_")
    Terminal(command).run(name, options)


class Terminal:
    """The newsletter commands, writing to the management command's stdout/stderr."""

    def __init__(self, command: BaseCommand) -> None:
        self.command = command
        self.out = command.stdout
        self.style = command.style

    def run(self, name: str, options: dict[str, Any]) -> None:
        getattr(self, f"do_{name}")(**options)

    # --- looking things up ---------------------------------------------------------------------
    def campaign(self, pk: int) -> Campaign:
        from .models import Campaign

        campaign = Campaign.objects.select_related("mailing_list").filter(pk=pk).first()
        if campaign is None:
            raise CommandError(
                f"No campaign with id {pk}. `manage.py gmail_smtp newsletter campaigns` lists "
                "them with their ids."
            )
        return campaign

    def table(self, rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for index, row in enumerate(rows):
            line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
            self.out.write(self.style.MIGRATE_HEADING(line) if index == 0 else line)

    # --- lists and campaigns -------------------------------------------------------------------
    def do_lists(self, **options: Any) -> None:
        from django.db.models import Count, Q

        from .models import MailingList, Subscriber

        statuses = list(Subscriber.Status)
        counts = {s.value: Count("subscribers", filter=Q(subscribers__status=s)) for s in statuses}
        lists = MailingList.objects.annotate(**counts).order_by("slug")
        if not lists:
            self.out.write("No mailing lists yet. Add one in the admin (Gmail newsletters).")
            return
        rows = [("SLUG", "NAME", *(s.label.upper() for s in statuses))]
        for ml in lists:
            rows.append((ml.slug, ml.name, *(f"{getattr(ml, s.value):,}" for s in statuses)))
        self.table(rows)

    def do_campaigns(self, **options: Any) -> None:
        from .models import Campaign

        campaigns = Campaign.objects.select_related("mailing_list").order_by("pk")
        if not campaigns:
            self.out.write("No campaigns yet. Write one in the admin (Gmail newsletters).")
            return
        rows = [("ID", "STATUS", "NAME", "TO", "SENT", "ENDS")]
        for c in campaigns:
            ml = c.mailing_list
            audience = ml.slug if ml is not None else f"audience: {c.audience}"
            if c.status == Campaign.Status.DRAFT:
                sent, ends = "-", "-"
            else:
                p = c.progress()
                sent = f"{p.sent:,}/{p.total:,}"
                ends = "finished" if p.finished else eta_text(p.eta)
            rows.append((str(c.pk), c.get_status_display(), c.name, audience, sent, ends))
        self.table(rows)

    # --- one campaign --------------------------------------------------------------------------
    def do_estimate(self, campaign: int, **options: Any) -> None:
        from .models import Campaign

        c = self.campaign(campaign)
        if c.status != Campaign.Status.DRAFT:
            self.out.write(f"{c.name} was started; its progress:")
            self.show_progress(c.progress(), c)
            return
        self.show_estimate(c)

    def show_estimate(self, c: Campaign) -> float:
        """Print the draft's estimate and the domain guard; return its messages per day."""
        from . import campaigns

        try:
            estimate = campaigns.estimate(c)
        except USER_ERRORS as exc:
            raise CommandError(f"No estimate for {c.name}: {exc}") from None
        # The pace, then why it waits (if it does) on a line of its own: each said once.
        pace = estimate.describe(with_reason=False)
        self.out.write(
            f"{c.name}: {estimate.total:,} recipient(s)" + (f", {pace}." if pace else ".")
        )
        if estimate.eta:
            self.out.write(f"Expected to end around {eta_text(estimate.eta)}.")
        if estimate.waiting_reason:
            self.out.write(self.style.WARNING(f"Waiting now: {estimate.waiting_reason}"))
        self.show_domain(c, float(estimate.rate_per_day or 0))
        return float(estimate.rate_per_day or 0)

    def show_domain(self, c: Campaign, per_day: float) -> bool:
        """Print the From domain's standing against Gmail's bulk-sender threshold; return
        whether this campaign would take it past the limit unconfirmed."""
        from . import planner

        domain = planner.from_domain(c)
        count, warn_at, limit = planner.domain_usage(domain)
        text = (
            f"{domain} has sent {count:,} bulk message(s) in the last 24 hours (warning at "
            f"{warn_at:,}, limit {limit:,} a day)."
        )
        guarded = planner.domain_guarded(c)
        would_cross = guarded and count + per_day > limit
        if not guarded:
            text += " It is declared aligned (SPF, DKIM, DMARC): no limit applies."
        elif would_cross:
            text += (
                f" At this pace the campaign would pass {limit:,} a day: sending stops there "
                "unless SPF, DKIM and DMARC are aligned (--domain-aligned confirms it)."
            )
        style = self.style.WARNING if count >= warn_at or would_cross else (lambda s: s)
        self.out.write(style(text))
        return would_cross

    def do_start(
        self, campaign: int, yes: bool = False, domain_aligned: bool = False, **options: Any
    ) -> None:
        from .models import Campaign

        c = self.campaign(campaign)
        if c.status != Campaign.Status.DRAFT:
            raise CommandError(
                f"{c.name} is {c.get_status_display()}: only a draft can be started "
                f"(`resume {c.pk}` continues a paused one)."
            )
        if domain_aligned and not c.domain_aligned:
            c.domain_aligned = True
            c.save(update_fields=["domain_aligned", "updated_at"])
        self.show_estimate(c)
        if not yes:
            if not sys.stdin.isatty():
                raise CommandError(
                    "Not started: add --yes to start without being asked (no terminal to ask)."
                )
            answer = input("Start sending? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                raise CommandError("Not started.")
        try:
            count = c.start()
        except USER_ERRORS as exc:
            raise CommandError(f"Not started: {exc}") from None
        self.out.write(
            self.style.SUCCESS(f"Started {c.name}: {count:,} recipient(s) enrolled.")
            + f" `manage.py gmail_smtp newsletter progress {c.pk} --watch` follows it."
        )

    def _lifecycle(self, campaign: int, verb: str, call: Any, done: str) -> None:
        c = self.campaign(campaign)
        try:
            result = call(c)
        except USER_ERRORS as exc:
            raise CommandError(f"Not {verb}: {exc}") from None
        self.out.write(self.style.SUCCESS(done.format(name=c.name, result=result)))

    def do_pause(self, campaign: int, reason: str = "", **options: Any) -> None:
        from django.utils import timezone

        from ..conf import format_time

        why = reason or f"Paused by {_who()} with manage.py on {format_time(timezone.now())}."
        self._lifecycle(
            campaign,
            "paused",
            lambda c: c.pause(why),
            "Paused {name}: nothing more goes into the outbox until you resume it.",
        )

    def do_resume(self, campaign: int, **options: Any) -> None:
        self._lifecycle(campaign, "resumed", lambda c: c.resume(), "Resumed {name}.")

    def do_cancel(self, campaign: int, **options: Any) -> None:
        self._lifecycle(
            campaign,
            "cancelled",
            lambda c: c.cancel(),
            "Cancelled {name}: recipients not sent yet will get nothing.",
        )

    def do_retry_failed(self, campaign: int, **options: Any) -> None:
        c = self.campaign(campaign)
        try:
            count = c.retry_failed()
        except USER_ERRORS as exc:
            raise CommandError(f"Not retried: {exc}") from None
        if not count:
            self.out.write(f"Nothing to retry: no recipient of {c.name} failed.")
            return
        self.out.write(
            self.style.SUCCESS(f"{count:,} failed recipient(s) of {c.name} will be sent again.")
        )

    # --- progress ------------------------------------------------------------------------------
    def do_progress(
        self, campaign: int, watch: bool = False, interval: float = 2.0, **options: Any
    ) -> None:
        c = self.campaign(campaign)
        if not watch:
            self.out.write(f"{c.name} ({c.get_status_display()})")
            self.show_progress(c.progress(), c)
            return
        self.watch(c, max(0.0, interval))

    def show_progress(self, p: Progress, c: Campaign) -> None:
        """The bar, the pace, why it waits, a hint to retry failed mail, the accounts' split;
        each said once (a finished campaign has no pace; the bar's line leaves the waiting
        reason to its own line)."""
        from .models import Campaign

        self.out.write(bar_line(p, waiting=False))
        pace = "" if p.finished else p.describe(with_reason=False)
        if pace:
            self.out.write(f"Pace: {pace}")
        if c.status == Campaign.Status.PAUSED:
            from .campaigns import paused_text

            self.out.write(self.style.WARNING(paused_text(c)))
        elif p.waiting_reason and not p.finished:
            self.out.write(self.style.WARNING(f"Waiting: {p.waiting_reason}"))
        if p.failed and c.status != Campaign.Status.CANCELLED:
            self.out.write(
                f"{p.failed:,} failed: `manage.py gmail_smtp newsletter retry-failed {c.pk}` "
                "sends them again."
            )
        if p.accounts:
            rows = [("ACCOUNT", "SENT", "IN OUTBOX", "BOUNCED", "PER DAY")]
            for a in p.accounts:
                rows.append(
                    (
                        a.email,
                        f"{a.sent:,}",
                        f"{a.queued:,}",
                        f"{a.bounced:,}",
                        f"{a.capacity_per_day:,}",
                    )
                )
            self.table(rows)

    def watch(self, c: Campaign, interval: float) -> None:
        """A progress bar updating in place (one line per update when not on a terminal)
        until the campaign is finished or cancelled, or Ctrl-C."""
        from .models import Campaign

        live = self.out.isatty()
        try:
            while True:
                c.refresh_from_db()
                p = c.progress()
                line = bar_line(p)  # a paused campaign's waiting reason says so
                if live:
                    self.out.write("\r\033[K" + line, ending="")
                    self.out.flush()
                else:
                    self.out.write(line)
                if p.finished or c.status in (Campaign.Status.FINISHED, Campaign.Status.CANCELLED):
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            self.out.write("\nStopped watching; the campaign goes on.")
            return
        if live:
            self.out.write("")
        self.out.write(self.style.SUCCESS(f"{c.name}: {c.get_status_display()}."))

    # --- import --------------------------------------------------------------------------------
    def do_import(
        self,
        list: str,
        file: str,
        activate: bool = False,
        send_confirmations: bool = False,
        **options: Any,
    ) -> None:
        from django.utils import timezone

        from ..conf import format_time
        from .imports import ImportProblem, import_csv
        from .models import MailingList

        mailing_list = MailingList.objects.filter(slug=list).first()
        if mailing_list is None:
            raise CommandError(
                f"No mailing list with slug {list!r}. `manage.py gmail_smtp newsletter lists` "
                "shows the slugs."
            )
        if not os.path.isfile(file):
            raise CommandError(f"No file {file}: give the path of a CSV file.")
        if activate and send_confirmations:
            raise CommandError(
                "Choose one: --activate subscribes them at once, --send-confirmations mails "
                "them the confirmation link; not both."
            )
        source = (
            f"{os.path.basename(file)}, imported by {_who()} with manage.py on "
            f"{format_time(timezone.now())}"
        )
        live = self.out.isatty()

        def progress(rows: int) -> None:
            if live:
                self.out.write(f"\r{rows} rows read", ending="")
                self.out.flush()
            else:
                self.out.write(f"{rows} rows read")

        try:
            with open(file, "rb") as handle:
                report = import_csv(
                    mailing_list,
                    handle,
                    activate=activate,
                    source=source,
                    progress=progress,
                    send_confirmations=send_confirmations,
                )
        except ImportProblem as problem:
            raise CommandError(str(problem)) from None
        except OSError as exc:
            raise CommandError(f"Cannot read {file}: {exc.strerror}.") from None
        if live:
            self.out.write("")
        self.out.write(self.style.SUCCESS(report.summary()))
        for reason, count in report.skipped_by_reason():
            self.out.write(f"  skipped {count}: {reason.label}")
        for line in report.lines[:20]:
            self.out.write(f"  line {line.line}: {line.email or '(empty)'}: {line.text}")
        if report.skipped_total > min(20, len(report.lines)):
            shown = min(20, len(report.lines))
            self.out.write(f"  ... and {report.skipped_total - shown} more skipped line(s).")
        for text in report.confirmation_errors[:20]:
            self.out.write(self.style.WARNING(f"  confirmation mail not sent: {text}"))


def bar_line(p: Progress, *, waiting: bool = True) -> str:
    """``[#########.....................]  30%  300/1,000 sent, 2 failed | ends ... | waiting``
    (``waiting=False``: without why it waits, for output that says it on a line of its own)."""
    total = max(1, p.total)
    done = p.sent + p.failed + p.suppressed + p.cancelled + getattr(p, "bounced", 0)
    filled = min(BAR_WIDTH, round(BAR_WIDTH * done / total))
    parts = [f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {p.percent:3.0f}%"]
    counts = f"{p.sent:,}/{p.total:,} sent"
    for name in ("queued", "failed", "bounced", "suppressed", "cancelled"):
        value = getattr(p, name, 0)
        if value:
            counts += f", {value:,} {'in outbox' if name == 'queued' else name}"
    parts.append(counts)
    parts.append("finished" if p.finished else f"ends {eta_text(p.eta)}")
    if waiting and p.waiting_reason and not p.finished:
        reason = p.waiting_reason
        # A paused campaign's reason says so itself ("Paused by alice on ...").
        parts.append(reason if reason.startswith("Paused") else f"waiting: {reason}")
    return " | ".join(parts)


def eta_text(eta: Any) -> str:
    if eta is None:
        return "not known yet"
    from django.utils import timezone
    from django.utils.timesince import timeuntil

    from ..conf import format_time

    if eta <= timezone.now():
        return f"{format_time(eta)} (any moment now)"
    return f"{format_time(eta)} (in {timeuntil(eta)})"


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (containers)
        return "an unknown user"
