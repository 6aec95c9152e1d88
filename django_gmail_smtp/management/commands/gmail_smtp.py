"""``manage.py gmail_smtp <subcommand>``: check accounts, send a test message, and more."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_gmail_smtp.conf import connection_settings, get_setting
from django_gmail_smtp.models import GmailAccount, normalize_address


class Command(BaseCommand):
    help = (
        "Work with the Gmail sender accounts: `check` connects and logs in to report what "
        "works and what to fix; `send-test TO` sends one test message; `quota` shows each "
        "account's use of its 24-hour limits; `authorize EMAIL` connects an account with "
        "Google; `retry`, `cancel` and `purge` manage the outbox; `rotate-keys` re-encrypts "
        "secrets; `bounces` reads the bounces in the accounts' inboxes; `newsletter ...` works "
        "with the newsletters sub-app. Run "
        "`manage.py gmail_smtp SUBCOMMAND --help` for each subcommand's options."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        kw: dict[str, Any] = {"formatter_class": argparse.RawDescriptionHelpFormatter}

        check = sub.add_parser(
            "check",
            help="connect to Gmail, log in, and report what works and what to fix",
            description="For each active account (or the one given): open a verified TLS "
            "connection, authenticate (refreshing an OAuth token if needed), and report the "
            "result in plain words. With CeleryGmailBackend, also check that a Celery app is "
            "loaded and that its broker answers (within 2 s). Nothing is sent. Exits 1 if any "
            "account fails or queued mail could not reach a worker.",
            **kw,
        )
        check.add_argument("--account", metavar="EMAIL", help="check only this account")

        test = sub.add_parser(
            "send-test",
            help="send one test message",
            description="Send one short test message to TO through the configured backend's "
            "transport, from the default account (or --account), and print Gmail's reply.",
            **kw,
        )
        test.add_argument("to", metavar="TO", help="recipient address")
        test.add_argument("--account", metavar="EMAIL", help="send from this account")
        test.add_argument("--subject", default="Test message from django-gmail-smtp")

        quota = sub.add_parser(
            "quota",
            help="show each account's use of its rolling 24-hour limits",
            description="For every account (or the one given): messages and recipients used "
            "in the last 24 hours against its limits, the share kept for transactional mail, "
            "whether Gmail has blocked it, and how many messages it can send now (at its limit: "
            "when the next slot frees).",
            **kw,
        )
        quota.add_argument("--account", metavar="EMAIL", help="show only this account")

        for name, verb in (("retry", "retry now"), ("cancel", "cancel")):
            cmd = sub.add_parser(
                name,
                help=f"{verb} outbox messages by id or by filter",
                description=(
                    "Make failed, deferred or cancelled messages due now and hand them to Celery."
                    if name == "retry"
                    else "Cancel messages not sent yet (queued, deferred or failed)."
                )
                + " Give ids, or at least one filter; filters combine.",
                **kw,
            )
            cmd.add_argument("ids", nargs="*", type=int, metavar="ID", help="outbox ids")
            cmd.add_argument(
                "--status",
                action="append",
                choices=["queued", "deferred", "failed", "cancelled"],
                help="only messages in this status (repeatable)",
            )
            cmd.add_argument("--account", metavar="EMAIL", help="only mail from this account")
            cmd.add_argument(
                "--before", metavar="YYYY-MM-DD", help="only messages queued before this date"
            )

        purge = sub.add_parser(
            "purge",
            help="delete old finished mail and drop the bodies of finished mail",
            description="Delete finished outbox rows (sent, failed, cancelled) older than "
            "--delete-sent-after days, and drop the stored message of finished mail older than "
            "--drop-bodies-after days (the row, its status and attempt log stay; a failed row "
            "without its message can no longer be retried). Age counts from sending, or from "
            "failing or cancelling. Queued and deferred mail keeps its message: it is still to "
            "be sent. Run it daily, e.g. from cron or Celery beat.",
            **kw,
        )
        purge.add_argument("--delete-sent-after", type=int, metavar="DAYS", default=None)
        purge.add_argument("--drop-bodies-after", type=int, metavar="DAYS", default=None)

        authorize = sub.add_parser(
            "authorize",
            help="connect an account with Google (OAuth2) from this terminal",
            description="Run Google's consent flow with a loopback redirect: a one-shot web "
            "server on 127.0.0.1 receives Google's answer, so no code is copied by hand. Open "
            "the printed URL in a browser on this machine, sign in as EMAIL and allow access; "
            "the refresh token is then stored, encrypted, on the account (created if missing). "
            "The OAuth client (id and secret from --client-id/--client-secret, the account, "
            'or GMAIL_SMTP["CLIENT_ID"]/["CLIENT_SECRET"]) must be of type "Desktop app".',
            **kw,
        )
        authorize.add_argument("email", metavar="EMAIL", help="the Gmail address to connect")
        authorize.add_argument("--client-id", help="OAuth client id to store on the account")
        authorize.add_argument(
            "--client-secret", help="OAuth client secret to store on the account"
        )
        authorize.add_argument(
            "--port", type=int, default=0, help="loopback port (default: any free port)"
        )
        authorize.add_argument(
            "--no-browser", action="store_true", help="only print the URL; do not open a browser"
        )
        authorize.add_argument(
            "--timeout", type=float, default=300, help="seconds to wait for Google (300)"
        )

        sub.add_parser(
            "rotate-keys",
            help="re-encrypt every stored secret with the newest key",
            description='After putting a new key first in GMAIL_SMTP["ENCRYPTION_KEYS"] (old '
            "keys after it), re-encrypt every account's secrets with the new key. Then the old "
            "keys can be removed from the setting.",
            **kw,
        )

        # Added always, so that without the sub-app it says how to install it.
        from django_gmail_smtp.newsletters import cli as newsletter_cli

        newsletter_cli.add_parser(sub, **kw)

        bounces = sub.add_parser(
            "bounces",
            help="read the bounces in each account's inbox (IMAP) and record them",
            description="Log in to each active account's inbox over IMAP (IMAP_HOST, with the "
            "account's App Password or OAuth token), read the delivery reports that arrived "
            "since the last run, and record each bounced recipient of the outbox once (a hard "
            "bounce suppresses the address in the newsletters). Exits 1 if an inbox could not "
            "be read.",
            **kw,
        )
        bounces.add_argument("--account", metavar="EMAIL", help="read only this account's inbox")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["subcommand"] == "newsletter":
            from django_gmail_smtp.newsletters import cli as newsletter_cli

            newsletter_cli.handle(self, options)
            return
        handler = getattr(self, "handle_" + options["subcommand"].replace("-", "_"))
        handler(**options)

    # --- check -----------------------------------------------------------------------------------
    def _accounts(self, address: str | None) -> list[GmailAccount]:
        from django_gmail_smtp import services

        accounts = services.sender_accounts()
        if address:
            accounts = [a for a in accounts if a.email == normalize_address(address)]
            if not accounts:
                raise CommandError(
                    f"No active account {address}. `manage.py gmail_smtp check` lists them all."
                )
        if not accounts:
            raise CommandError(
                "No active Gmail account, and EMAIL_HOST_USER / EMAIL_HOST_PASSWORD are not set. "
                "Add an account in the admin (Gmail SMTP > Gmail accounts) first."
            )
        return accounts

    def handle_check(self, account: str | None = None, **options: Any) -> None:
        from django_gmail_smtp import services

        try:
            host, port, security = connection_settings()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Server: {host}:{port} ({security}), timeout {get_setting('TIMEOUT')} s")
        celery_failed = self._check_celery()
        failures = 0
        for acct in self._accounts(account):
            label = f"{acct.email} ({acct.get_auth_method_display()}"
            label += ", from EMAIL_HOST_USER)" if acct.from_settings else ")"
            result = services.verify(acct)
            if not result.ok:
                failures += 1
                self.stdout.write(self.style.ERROR(f"FAIL  {label}: {result.detail}"))
            else:
                aliases = ", ".join(acct.aliases()) or "none"
                self.stdout.write(
                    self.style.SUCCESS(f"OK    {label}: TLS verified, logged in")
                    + f"; send-as aliases: {aliases}"
                )
        broken = [f"{failures} account(s) cannot send"] if failures else []
        broken += ["queued mail cannot reach a Celery worker"] if celery_failed else []
        if broken:
            raise CommandError("; ".join(broken) + "; see above for what to fix.")

    def _check_celery(self) -> bool:
        """Report the Celery set-up when CeleryGmailBackend is used; True if mail cannot go."""
        from django_gmail_smtp import celery_setup

        if not celery_setup.celery_backend_in_use():
            return False
        problems = celery_setup.celery_problems(probe=True)
        for problem in problems:
            style, tag = (
                (self.style.ERROR, "FAIL") if problem.stops_mail else (self.style.WARNING, "WARN")
            )
            self.stdout.write(style(f"{tag:6}Celery: {problem.msg}") + f"\n      {problem.hint}")
        if not problems:
            app = celery_setup.loaded_app()
            assert app is not None  # celery_problems() reports a missing app
            broker = celery_setup.broker_for_display(app)
            self.stdout.write(
                self.style.SUCCESS(f"OK    Celery: app {app.main!r}, broker {broker} answers")
            )
        return any(problem.stops_mail for problem in problems)

    # --- bounces ---------------------------------------------------------------------------------
    def handle_bounces(self, account: str | None = None, **options: Any) -> None:
        from django_gmail_smtp.bounces import read_all

        accounts = GmailAccount.objects.active().order_by("pk")
        if account:
            accounts = accounts.filter(email=normalize_address(account))
        if not accounts:
            raise CommandError(
                f"No active account {account}." if account else "No active Gmail account."
            )
        results = read_all(accounts)
        for result in results:
            style = self.style.SUCCESS if result.ok else self.style.ERROR
            self.stdout.write(style(("OK    " if result.ok else "FAIL  ") + result.text))
        failed = sum(not r.ok for r in results)
        if failed:
            raise CommandError(f"{failed} inbox(es) could not be read; see above.")

    # --- quota -----------------------------------------------------------------------------------
    def handle_quota(self, account: str | None = None, **options: Any) -> None:
        from django.utils import timezone

        accounts = self._accounts(account)
        from django_gmail_smtp.stats import room_text

        rows = [("ACCOUNT", "LIMITS", "MESSAGES", "RECIPIENTS", "BULK MAX", "STATE", "NOW")]
        for acct in accounts:
            status = acct.quota_status()
            recipients = f"{status.recipients_used}" + (
                f"/{status.recipients_limit}" if status.recipients_limit else " (no limit)"
            )
            if status.exhausted_until:
                state = f"blocked until {_when(status.exhausted_until)}"
            elif not acct.is_active:
                state = "paused"
            else:
                state = "ok"
            rows.append(
                (
                    acct.email,
                    acct.get_limits_preset_display().split(":")[0],
                    f"{status.messages_used}/{status.messages_limit}",
                    recipients,
                    str(status.bulk_messages_limit),
                    state,
                    room_text(status),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for index, row in enumerate(rows):
            line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
            self.stdout.write(self.style.MIGRATE_HEADING(line) if index == 0 else line)
        self.stdout.write(f"Rolling 24-hour window ending {_when(timezone.now())}.")

    # --- outbox maintenance ----------------------------------------------------------------------
    def _selection(self, ids: list[int], status: list[str] | None, account: str | None, before):
        from datetime import datetime

        from django.utils import timezone

        from django_gmail_smtp import outbox

        if not ids and not status and not account and not before:
            raise CommandError("Give outbox ids or a filter (--status, --account, --before).")
        when = None
        if before:
            try:
                when = timezone.make_aware(datetime.strptime(before, "%Y-%m-%d"))
            except ValueError:
                raise CommandError(f"--before {before!r} is not a date like 2026-01-31.") from None
        return outbox.select(ids=ids, status=status or (), account=account, before=when)

    def handle_retry(self, ids, status=None, account=None, before=None, **options: Any) -> None:
        from django_gmail_smtp import outbox
        from django_gmail_smtp.models import OutboundEmail

        selection = self._selection(ids, status, account, before)
        count = outbox.retry(selection)
        self.stdout.write(self.style.SUCCESS(f"Retried {count} message(s) now."))
        skipped = outbox.body_dropped(selection.exclude(status=OutboundEmail.Status.SENT))
        if skipped:
            self.stderr.write(
                f"{skipped} message(s) could not be retried: their stored message was dropped "
                "after BODY_RETENTION_DAYS."
            )

    def handle_cancel(self, ids, status=None, account=None, before=None, **options: Any) -> None:
        from django_gmail_smtp import outbox

        count = outbox.cancel(self._selection(ids, status, account, before))
        self.stdout.write(self.style.SUCCESS(f"Cancelled {count} message(s)."))

    def handle_purge(
        self, delete_sent_after: int | None = None, drop_bodies_after: int | None = None, **o: Any
    ) -> None:
        from datetime import timedelta

        from django_gmail_smtp import outbox

        if delete_sent_after is None and drop_bodies_after is None:
            raise CommandError("Give --delete-sent-after DAYS and/or --drop-bodies-after DAYS.")
        result = outbox.purge(
            delete_sent_after=None
            if delete_sent_after is None
            else timedelta(days=delete_sent_after),
            drop_bodies_after=None
            if drop_bodies_after is None
            else timedelta(days=drop_bodies_after),
        )
        self.stdout.write(
            self.style.SUCCESS(
                f"Deleted {result['deleted']} old row(s); dropped {result['bodies_dropped']} "
                "message bodies."
            )
        )

    # --- authorize -------------------------------------------------------------------------------
    def handle_authorize(
        self,
        email: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        port: int = 0,
        no_browser: bool = False,
        timeout: float = 300,
        **options: Any,
    ) -> None:
        from django_gmail_smtp import services
        from django_gmail_smtp.loopback import LoopbackReceiver

        account, created = services.account_to_connect(
            email, client_id=client_id, client_secret=client_secret
        )
        with LoopbackReceiver(port=port) as receiver:
            try:
                flow = services.start_connect(account, receiver.redirect_uri)
            except ImproperlyConfigured as exc:
                raise CommandError(services.explain(exc)) from None
            receiver.expect(flow.state)
            self.stdout.write(
                f"Open this URL in a browser on this machine, sign in as {account.email} and "
                f"allow access:\n\n  {flow.url}\n\nWaiting up to {timeout:g} s for Google's "
                f"answer on {receiver.redirect_uri} ..."
            )
            self.stdout.flush()
            if not no_browser:
                import webbrowser

                webbrowser.open(flow.url)
            answer = receiver.wait(timeout)
        if answer is None:
            raise CommandError(
                f"No answer from Google within {timeout:g} s; nothing was changed. Run the "
                "command again and finish the sign-in in the browser."
            )
        result = services.finish_connect(
            account,
            flow,
            state=answer.get("state", ""),
            code=answer.get("code", ""),
            error=answer.get("error", ""),
        )
        if not result.ok:
            raise CommandError(result.text)
        self.stdout.write(
            self.style.SUCCESS(
                f"Connected {account.email} with Google; the refresh token is stored encrypted."
                + (" (new account)" if created else "")
            )
            + f" Run `manage.py gmail_smtp check --account {account.email}` to verify."
        )

    # --- rotate-keys -----------------------------------------------------------------------------
    def handle_rotate_keys(self, **options: Any) -> None:
        from django_gmail_smtp import services

        result = services.rotate_keys()
        for problem in result.unreadable:
            self.stderr.write(problem)
        self.stdout.write(
            self.style.SUCCESS(f"Re-encrypted the secrets of {result.rotated} account(s).")
        )
        if result.unreadable:
            raise CommandError(
                f"{len(result.unreadable)} secret(s) could not be decrypted; see above."
            )

    # --- send-test -----------------------------------------------------------------------------
    def handle_send_test(
        self, to: str, account: str | None = None, subject: str = "", **options: Any
    ) -> None:
        from django_gmail_smtp import services

        sender = self._accounts(account)[0]
        body = (
            "This is a test message sent by `manage.py gmail_smtp send-test`.\n"
            f"Account: {sender.email}\n"
        )
        result = services.send_test(sender, to, subject=subject, body=body)
        if not result.ok:
            raise CommandError(f"Not sent: {result.detail}")
        self.stdout.write(
            self.style.SUCCESS(f"Sent to {to} from {result.sender}.")
            + f" Gmail replied: 250 {result.reply}"
        )
        for recipient, (code, text) in result.refused.items():
            self.stdout.write(self.style.WARNING(f"Refused {recipient}: {code} {text}"))


def _when(moment: Any) -> str:
    from django_gmail_smtp.conf import format_time

    return format_time(moment)
