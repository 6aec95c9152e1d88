"""Tests of the Gmail sandbox itself, over real sockets, with stdlib and google-auth clients."""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import os
import secrets
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import Request
from google.oauth2 import service_account
from google.oauth2.credentials import Credentials

from django_gmail_smtp.testing import (
    MAIL_SCOPE,
    Delivered,
    GmailSandbox,
    Replies,
    ensure_certificates,
    xoauth2_initial_response,
)
from django_gmail_smtp.testing import certs as certs_module

from ..processes import wait_for

REPO = Path(__file__).resolve().parents[2]
ME = "me@example.com"
APP_PASSWORD = "abcdefghijklmnop"
OTHER = "other@example.com"
OTHER_PASSWORD = "ponmlkjihgfedcba"


@pytest.fixture
def sb() -> Iterator[GmailSandbox]:
    with GmailSandbox() as sandbox:
        sandbox.add_user(ME, app_password="abcd efgh ijkl mnop", aliases=["alias@example.com"])
        sandbox.add_user(OTHER, app_password=OTHER_PASSWORD)
        yield sandbox


@pytest.fixture
def sb_ssl() -> Iterator[GmailSandbox]:
    with GmailSandbox(security="ssl") as sandbox:
        sandbox.add_user(ME, app_password=APP_PASSWORD)
        yield sandbox


def context_for(sandbox: GmailSandbox) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=sandbox.ca_file)


def connect(
    sandbox: GmailSandbox, user: str | None = ME, password: str = APP_PASSWORD
) -> smtplib.SMTP:
    """A verified, EHLO'd (and, given a user, logged-in) client connection."""
    if sandbox.security == "ssl":
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            sandbox.host, sandbox.port, context=context_for(sandbox), timeout=10
        )
    else:
        client = smtplib.SMTP(sandbox.host, sandbox.port, timeout=10)
    try:
        if sandbox.security == "starttls":
            client.starttls(context=context_for(sandbox))
        client.ehlo("client.example")
        if user is not None:
            client.login(user, password)
    except BaseException:
        client.close()
        raise
    return client


def message(subject: str = "Hello", sender: str = ME, to: str = "you@example.net") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHi there.\r\n.leading dot\r\n"
    ).encode()


def send(sandbox: GmailSandbox, subject: str = "Hello", to: list[str] | None = None) -> dict:
    with connect(sandbox) as client:
        return client.sendmail(ME, to or ["you@example.net"], message(subject))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- greeting, EHLO, TLS ------------------------------------------------------------------------


def test_greeting_and_ehlo_before_and_after_starttls(sb: GmailSandbox) -> None:
    with socket.create_connection((sb.host, sb.port), timeout=10) as raw:
        greeting = raw.makefile("rb").readline()
    assert greeting.startswith(b"220 smtp.gmail.com ESMTP ")
    assert greeting.endswith(b" - gsmtp\r\n")

    client = smtplib.SMTP(sb.host, sb.port, timeout=10)
    code, _ = client.ehlo("client.example")
    assert code == 250
    assert client.esmtp_features["size"] == "35882577"
    for feature in ("8bitmime", "pipelining", "smtputf8", "enhancedstatuscodes", "starttls"):
        assert feature in client.esmtp_features
    assert "auth" not in client.esmtp_features

    client.starttls(context=context_for(sb))
    client.ehlo("client.example")
    assert "starttls" not in client.esmtp_features
    assert client.esmtp_features["auth"].split() == [
        "LOGIN", "PLAIN", "XOAUTH2", "PLAIN-CLIENTTOKEN", "OAUTHBEARER", "XOAUTH",
    ]  # fmt: skip
    client.quit()
    assert sb.stats.connections == 2
    assert sb.stats.starttls == 1


def test_commands_before_starttls_are_refused(sb: GmailSandbox) -> None:
    with smtplib.SMTP(sb.host, sb.port, timeout=10) as client:
        client.ehlo("client.example")
        code, text = client.docmd("MAIL", f"FROM:<{ME}>")
        assert (code, text.split(b" gsmtp")[0].rsplit(b" ", 2)[0]) == (
            530,
            b"5.7.0 Must issue a STARTTLS command first.",
        )
        code, _ = client.docmd("AUTH", "PLAIN " + b64(f"\0{ME}\0{APP_PASSWORD}"))
        assert code == 530
    assert sb.stats.plaintext_auth_attempts == 1
    assert sb.stats.logins == 0


def test_mail_without_auth_is_refused(sb: GmailSandbox) -> None:
    with connect(sb, user=None) as client:
        code, text = client.mail(ME)
        assert code == 530
        assert text.startswith(b"5.7.0 Authentication Required.")


def test_certificate_is_verified_for_ip_and_localhost(sb: GmailSandbox) -> None:
    with (
        smtplib.SMTP(sb.host, sb.port, timeout=10) as client,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        client.starttls(context=ssl.create_default_context())  # system CAs only
    with smtplib.SMTP("localhost", sb.port, timeout=10) as client:
        client.starttls(context=context_for(sb))
        client.ehlo("client.example")
        assert "auth" in client.esmtp_features


def test_implicit_tls(sb_ssl: GmailSandbox) -> None:
    with smtplib.SMTP_SSL(sb_ssl.host, sb_ssl.port, context=context_for(sb_ssl)) as client:
        client.ehlo("client.example")
        assert "starttls" not in client.esmtp_features
        assert "XOAUTH2" in client.esmtp_features["auth"]
        client.login(ME, APP_PASSWORD)
        client.sendmail(ME, ["you@example.net"], message())
    [delivered] = sb_ssl.wait_for(1)
    assert delivered.tls_version in ("TLSv1.2", "TLSv1.3")
    assert sb_ssl.settings()["SECURITY"] == "ssl"


def test_implicit_tls_rejects_plaintext_client(sb_ssl: GmailSandbox) -> None:
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError, OSError)):
        smtplib.SMTP(sb_ssl.host, sb_ssl.port, timeout=2)


def test_server_without_starttls_catches_careless_clients() -> None:
    with GmailSandbox(offer_starttls=False) as sandbox:
        sandbox.add_user(ME, app_password=APP_PASSWORD)
        with smtplib.SMTP(sandbox.host, sandbox.port, timeout=10) as client:
            client.ehlo("client.example")
            assert "starttls" not in client.esmtp_features
            assert "PLAIN" in client.esmtp_features["auth"]
            with pytest.raises(smtplib.SMTPNotSupportedError):
                client.starttls(context=context_for(sandbox))
        assert sandbox.stats.plaintext_auth_attempts == 0

        with smtplib.SMTP(sandbox.host, sandbox.port, timeout=10) as client:
            client.login(ME, APP_PASSWORD)  # a careless client leaks its password
        assert sandbox.stats.plaintext_auth_attempts == 1


# -- AUTH -------------------------------------------------------------------------------------


def test_app_password_login_and_delivery(sb: GmailSandbox) -> None:
    with connect(sb) as client:
        code, _ = client.mail(ME)
        assert code == 250
        assert client.rcpt("you@example.net")[0] == 250
        code, reply = client.data(message("Greetings"))
    assert code == 250
    [delivered] = sb.deliveries
    assert isinstance(delivered, Delivered)
    assert reply.decode() == (
        f"2.0.0 OK  {int(delivered.received_at)} {delivered.message_id} - gsmtp"
    )
    assert delivered.user == ME
    assert delivered.mail_from == ME
    assert delivered.rcpt_tos == ["you@example.net"]
    assert delivered.message["Subject"] == "Greetings"
    assert delivered.subject == "Greetings"
    assert delivered.data.endswith(b"Hi there.\r\n.leading dot\r\n")  # dot-unstuffed
    assert delivered.mechanism == "PLAIN"
    assert delivered.tls_version in ("TLSv1.2", "TLSv1.3")
    assert sb.stats.logins == 1
    assert sb.stats.messages == 1


def test_app_password_with_spaces_is_stored_without_them(sb: GmailSandbox) -> None:
    with connect(sb, password=APP_PASSWORD):
        pass
    with pytest.raises(smtplib.SMTPAuthenticationError):
        connect(sb, password="abcd efgh ijkl mnop")


def test_login_mechanism(sb: GmailSandbox) -> None:
    with connect(sb, user=None) as client:
        client.user, client.password = ME, APP_PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235
        client.sendmail(ME, ["you@example.net"], message())
    assert sb.wait_for(1)[0].mechanism == "LOGIN"


def test_wrong_password(sb: GmailSandbox) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
        connect(sb, password="wrongwrongwrongw")
    assert excinfo.value.smtp_code == 535
    assert excinfo.value.smtp_error.startswith(
        b"5.7.8 Username and Password not accepted. For more information, go to "
        b"https://support.google.com/mail/?p=BadCredentials"
    )
    assert sb.stats.auth_failures >= 1
    assert sb.stats.logins == 0


def test_unknown_user(sb: GmailSandbox) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
        connect(sb, user="nobody@example.com")
    assert excinfo.value.smtp_code == 535


def test_account_password_rules() -> None:
    with GmailSandbox() as sandbox:
        sandbox.add_user("legacy@example.com", account_password="hunter2")
        sandbox.add_user(
            "strict@example.com",
            app_password=APP_PASSWORD,
            account_password="hunter2",
            require_app_password=True,
        )
        sandbox.add_user("blocked@example.com", app_password=APP_PASSWORD, web_login_required=True)

        connect(sandbox, "legacy@example.com", "hunter2").quit()

        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            connect(sandbox, "strict@example.com", "hunter2")
        assert excinfo.value.smtp_code == 534
        assert excinfo.value.smtp_error.startswith(b"5.7.9 Application-specific password required")
        connect(sandbox, "strict@example.com", APP_PASSWORD).quit()

        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            connect(sandbox, "blocked@example.com", APP_PASSWORD)
        assert excinfo.value.smtp_code == 534
        assert excinfo.value.smtp_error.startswith(
            b"5.7.14 <https://accounts.google.com/signin/continue?"
        )
        assert b"Please log in via your web browser and then try again." in (
            excinfo.value.smtp_error
        )


def test_too_many_failed_logins_on_one_connection(sb: GmailSandbox) -> None:
    with connect(sb, user=None) as client:
        for _ in range(3):
            code, _ = client.docmd("AUTH", "PLAIN " + b64(f"\0{ME}\0nope"))
            assert code == 535
        code, text = client.docmd("AUTH", "PLAIN " + b64(f"\0{ME}\0{APP_PASSWORD}"))
        assert code == 454
        assert text.startswith(b"4.7.0 Too many login attempts, please try again later.")
    connect(sb).quit()  # a new connection starts afresh


def test_auth_fault_holds_for_the_connection_and_can_target_a_user(sb: GmailSandbox) -> None:
    sb.fault("auth", reply=Replies.TOO_MANY_LOGINS, user=ME)
    connect(sb, OTHER, OTHER_PASSWORD).quit()
    with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
        connect(sb)  # smtplib tries PLAIN, then LOGIN: both get the 454
    assert excinfo.value.smtp_code == 454
    connect(sb).quit()  # times=1: the next connection logs in


# -- XOAUTH2 ----------------------------------------------------------------------------------


def test_xoauth2_initial_response_and_two_step(sb: GmailSandbox) -> None:
    token = sb.issue_access_token(ME)
    with connect(sb, user=None) as client:
        assert client.docmd("AUTH", "XOAUTH2 " + xoauth2_initial_response(ME, token)) == (
            235,
            b"2.7.0 Accepted",
        )
        client.sendmail(ME, ["you@example.net"], message())
    assert sb.wait_for(1)[0].mechanism == "XOAUTH2"

    with connect(sb, user=None) as client:
        code, challenge = client.docmd("AUTH", "XOAUTH2")
        assert (code, challenge) == (334, b"")
        assert client.docmd(xoauth2_initial_response(ME, token))[0] == 235


def test_xoauth2_with_smtplib_auth(sb: GmailSandbox) -> None:
    token = sb.issue_access_token(ME)
    raw = f"user={ME}\x01auth=Bearer {token}\x01\x01"
    with connect(sb, user=None) as client:
        code, _ = client.auth("XOAUTH2", lambda challenge=None: raw if challenge is None else "")
        assert code == 235


def test_xoauth2_bad_token_follows_gmail(sb: GmailSandbox) -> None:
    with connect(sb, user=None) as client:
        code, challenge = client.docmd("AUTH", "XOAUTH2 " + xoauth2_initial_response(ME, "bad"))
        assert code == 334
        assert json.loads(base64.b64decode(challenge)) == {
            "status": "400",
            "schemes": "Bearer",
            "scope": "https://mail.google.com/",
        }
        code, text = client.docmd("")
        assert code == 535
        assert text.startswith(b"5.7.8 Username and Password not accepted.")
    assert sb.stats.auth_failures == 1


def test_xoauth2_token_must_belong_to_user_and_be_current(sb: GmailSandbox) -> None:
    other_token = sb.issue_access_token(OTHER)
    expired = sb.issue_access_token(ME, expires_in=-1)
    revoked = sb.issue_access_token(ME)
    sb.revoke(revoked)
    for token in (other_token, expired, revoked):
        with connect(sb, user=None) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
                client.auth(
                    "XOAUTH2",
                    lambda c=None, t=token: (
                        f"user={ME}\x01auth=Bearer {t}\x01\x01" if c is None else ""
                    ),
                )
            assert excinfo.value.smtp_code == 535

    token = sb.issue_access_token(ME)
    sb.expire_access_tokens()
    with connect(sb, user=None) as client:
        code, _ = client.docmd("AUTH", "XOAUTH2 " + xoauth2_initial_response(ME, token))
        assert code == 334
        assert client.docmd("")[0] == 535
    fresh = sb.issue_access_token(ME)
    with connect(sb, user=None) as client:
        assert client.docmd("AUTH", "XOAUTH2 " + xoauth2_initial_response(ME, fresh))[0] == 235


# -- envelope rules ---------------------------------------------------------------------------


def test_recipient_cap_per_message(sb: GmailSandbox) -> None:
    recipients = [f"r{i}@example.net" for i in range(102)]
    with connect(sb) as client:
        refused = client.sendmail(ME, recipients, message())
    assert set(refused) == {"r100@example.net", "r101@example.net"}
    code, text = refused["r100@example.net"]
    assert code == 452
    assert text.startswith(
        b"4.5.3 Your message has too many recipients. For more information regarding Google's "
        b"sending limits, visit https://support.google.com/mail/?p=TooManyRecipientsError"
    )
    [delivered] = sb.wait_for(1)
    assert len(delivered.rcpt_tos) == 100


def test_bad_addresses(sb: GmailSandbox) -> None:
    sb.bad_recipients.add("Bounce@Example.net")
    with connect(sb) as client:
        assert client.docmd("MAIL", "FROM:<not an address>")[0] == 555
        code, text = client.docmd("MAIL", "FROM:<no-at-sign>")
        assert (code, text[:20]) == (555, b"5.5.2 Syntax error. ")
        assert client.docmd("MAIL", "FROM:<>")[0] == 250  # the null sender is fine
        code, text = client.docmd("RCPT", "TO:<nobody>")
        assert code == 553
        assert text.startswith(
            b"5.1.3 The recipient address <nobody> is not a valid RFC 5321 address."
        )
        code, text = client.docmd("RCPT", "TO:<bounce@example.net>")
        assert code == 553
        assert b"<bounce@example.net>" in text
        assert client.docmd("RCPT", "TO:<fine@example.net>")[0] == 250
    assert sb.stats.rejected == 4


def test_any_from_is_accepted_and_gmail_rewrite_is_reported(sb: GmailSandbox) -> None:
    with connect(sb) as client:
        client.sendmail(
            "someone@else.example", ["you@example.net"], message(sender="x@else.example")
        )
        client.sendmail(ME, ["you@example.net"], message(sender="Alias <alias@example.com>"))
    first, second = sb.wait_for(2)
    assert first.mail_from == "someone@else.example"
    assert first.gmail_from == ME
    assert second.gmail_from == "alias@example.com"


def test_size_limit() -> None:
    with GmailSandbox(size_limit=2000) as sandbox:
        sandbox.add_user(ME, app_password=APP_PASSWORD)
        big = message() + b"x" * 3000 + b"\r\n"
        with connect(sandbox) as client:
            assert client.esmtp_features["size"] == "2000"
            with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
                client.sendmail(ME, ["you@example.net"], big)  # smtplib sends SIZE=
            assert excinfo.value.smtp_code == 552
            # Without SIZE=, the body itself is refused after DATA.
            client.mail(ME)
            client.rcpt("you@example.net")
            code, text = client.data(big)
            assert code == 552
            assert text.startswith(b"5.3.4 Your message exceeded Google's message size limits")
            client.sendmail(ME, ["you@example.net"], message())
        assert len(sandbox.wait_for(1)) == 1


def test_long_lines_are_accepted(sb: GmailSandbox) -> None:
    body = b"Subject: long\r\n\r\n" + b"y" * 20000 + b"\r\n"
    with connect(sb) as client:
        client.sendmail(ME, ["you@example.net"], body)
    assert sb.wait_for(1)[0].data == body


# -- quota ------------------------------------------------------------------------------------


def test_daily_message_limit_at_mail_from_and_rolling_window(sb: GmailSandbox) -> None:
    now = [1_700_000_000.0]
    sb.clock = lambda: now[0]
    sb.set_quota(ME, messages=2)
    send(sb)
    send(sb)
    with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
        send(sb)
    assert excinfo.value.smtp_code == 550
    assert excinfo.value.smtp_error.startswith(
        b"5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits "
        b"go to https://support.google.com/a/answer/166852"
    )
    assert sb.quota_usage(ME) == (2, 2)
    now[0] += 24 * 3600 + 1
    send(sb)
    assert len(sb.deliveries) == 3
    assert sb.deliveries[-1].received_at == now[0]


def test_daily_limit_after_data() -> None:
    with GmailSandbox() as sandbox:
        sandbox.add_user(ME, app_password=APP_PASSWORD, daily_limit=1)
        sandbox.quota_phase = "data"
        send(sandbox)
        with pytest.raises(smtplib.SMTPDataError) as excinfo:
            send(sandbox)
        assert excinfo.value.smtp_code == 550
        assert len(sandbox.deliveries) == 1


def test_daily_recipient_limit(sb: GmailSandbox) -> None:
    sb.set_quota(ME, recipients=3)
    send(sb, to=["a@example.net", "b@example.net"])
    refused = send(sb, to=["c@example.net", "d@example.net"])
    assert refused["d@example.net"][0] == 550
    with pytest.raises(smtplib.SMTPSenderRefused):
        send(sb)
    assert [d.rcpt_tos for d in sb.deliveries] == [
        ["a@example.net", "b@example.net"],
        ["c@example.net"],
    ]
    send_as_other = connect(sb, OTHER, OTHER_PASSWORD)
    send_as_other.sendmail(OTHER, ["a@example.net"], message())  # quotas are per user
    send_as_other.quit()


def test_quota_holds_under_concurrency() -> None:
    with GmailSandbox() as sandbox:
        sandbox.add_user(ME, app_password=APP_PASSWORD, daily_limit=5)
        sandbox.quota_phase = "data"  # every sender gets past MAIL FROM: the race is at the end
        results: list[str] = []

        def worker() -> None:
            try:
                send(sandbox)
                results.append("sent")
            except smtplib.SMTPDataError:
                results.append("refused")

        threads = [threading.Thread(target=worker) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(results) == ["refused"] * 7 + ["sent"] * 5
        assert len(sandbox.deliveries) == 5


# -- faults -----------------------------------------------------------------------------------


def test_connect_faults(sb: GmailSandbox) -> None:
    sb.fault("connect", reply="421 4.7.0 Try again later, closing connection.")
    with pytest.raises(smtplib.SMTPConnectError) as excinfo:
        smtplib.SMTP(sb.host, sb.port, timeout=10)
    assert excinfo.value.smtp_code == 421

    sb.fault("connect", drop=True)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        smtplib.SMTP(sb.host, sb.port, timeout=10)

    connect(sb).quit()
    assert sb.stats.connections == 3


def test_ehlo_and_starttls_faults(sb: GmailSandbox) -> None:
    sb.fault("ehlo", reply="421 4.7.0 Temporary System Problem.  Try again later (10). - gsmtp")
    with smtplib.SMTP(sb.host, sb.port, timeout=10) as client:
        assert client.ehlo("client.example")[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()

    sb.fault("starttls", reply="454 4.7.0 TLS not available due to local problem")
    with smtplib.SMTP(sb.host, sb.port, timeout=10) as client:
        client.ehlo("client.example")
        with pytest.raises(smtplib.SMTPResponseException) as excinfo:
            client.starttls(context=context_for(sb))
        assert excinfo.value.smtp_code == 454

    sb.fault("starttls", drop=True)
    with smtplib.SMTP(sb.host, sb.port, timeout=10) as client:
        client.ehlo("client.example")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.starttls(context=context_for(sb))


def test_421_closes_the_connection(sb: GmailSandbox) -> None:
    reply = "421 4.7.0 Temporary System Problem.  Try again later (10). - gsmtp"
    sb.fault("mail", reply=reply)
    with connect(sb) as client:
        code, text = client.docmd("MAIL", f"FROM:<{ME}>")
        assert (code, text) == (421, reply[4:].encode())
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    assert sb.stats.rejected == 1


@pytest.mark.parametrize(
    ("phase", "exception"),
    [
        ("mail", smtplib.SMTPSenderRefused),
        ("rcpt", smtplib.SMTPRecipientsRefused),
        ("data", smtplib.SMTPDataError),
        ("after_data", smtplib.SMTPDataError),
    ],
)
def test_transaction_faults_reply(sb: GmailSandbox, phase: str, exception: type) -> None:
    sb.fault(phase, reply="451 4.3.0 Mail server temporarily rejected message.")
    with pytest.raises(exception):
        send(sb)
    assert sb.deliveries == []
    send(sb)  # consumed
    assert len(sb.deliveries) == 1


@pytest.mark.parametrize("phase", ["mail", "rcpt", "data", "after_data"])
def test_transaction_faults_drop(sb: GmailSandbox, phase: str) -> None:
    sb.fault(phase, drop=True)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(sb)
    assert sb.deliveries == []


def test_fault_times_and_user(sb: GmailSandbox) -> None:
    fault = sb.fault("mail", reply="451 4.3.0 Try later", times=2, user=OTHER)
    send(sb)  # not OTHER: unaffected
    for _ in range(2):
        with connect(sb, OTHER, OTHER_PASSWORD) as client, pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail(OTHER, ["you@example.net"], message())
    with connect(sb, OTHER, OTHER_PASSWORD) as client:
        client.sendmail(OTHER, ["you@example.net"], message())
    assert fault.fired == 2
    assert [d.user for d in sb.deliveries] == [ME, OTHER]


def test_fault_delay(sb: GmailSandbox) -> None:
    slow = sb.fault("data", delay=0.5)  # a slow server, then business as usual
    assert slow.reply is None
    started = time.monotonic()
    send(sb)
    assert time.monotonic() - started >= 0.5
    assert len(sb.deliveries) == 1

    sb.fault("mail", delay=0.2, reply="451 4.3.0 Try later")
    with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
        send(sb)
    assert excinfo.value.smtp_code == 451

    sb.fault("data", delay=5)
    with connect(sb) as client:
        client.sock.settimeout(0.3)
        with pytest.raises((TimeoutError, smtplib.SMTPServerDisconnected)):
            client.sendmail(ME, ["you@example.net"], message())
    assert len(sb.deliveries) == 1


def test_fault_validation(sb: GmailSandbox) -> None:
    with pytest.raises(ValueError):
        sb.fault("helo")
    with pytest.raises(ValueError):
        sb.fault("mail", reply="oops")


# -- observation ------------------------------------------------------------------------------


def test_wait_for_names_what_arrived(sb: GmailSandbox) -> None:
    send(sb, subject="Only one")
    with pytest.raises(AssertionError, match=r"got 1: .*'Only one'"):
        sb.wait_for(2, timeout=0.2)


def test_wait_for_blocks_until_delivery(sb: GmailSandbox) -> None:
    timer = threading.Timer(0.3, send, args=(sb,))
    timer.start()
    try:
        assert len(sb.wait_for(1, timeout=10)) == 1
    finally:
        timer.join()


def test_concurrent_clients(sb: GmailSandbox) -> None:
    def worker(n: int) -> None:
        with connect(sb) as client:
            for i in range(3):
                client.sendmail(ME, ["you@example.net"], message(f"{n}-{i}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    delivered = sb.wait_for(24)
    assert len({d.message_id for d in delivered}) == 24
    assert sb.stats.connections == 8


def test_reset_keeps_users(sb: GmailSandbox) -> None:
    sb.fault("mail", times=None)
    with pytest.raises(smtplib.SMTPSenderRefused):
        send(sb)
    sb.reset()
    assert sb.stats.rejected == 0
    send(sb)
    assert len(sb.deliveries) == 1
    sb.reset()
    assert sb.deliveries == []
    assert sb.stats.messages == 0


def test_settings_and_lifecycle() -> None:
    sandbox = GmailSandbox()
    with pytest.raises(RuntimeError):
        _ = sandbox.port
    sandbox.start()
    try:
        settings = sandbox.settings()
        assert settings == {
            "HOST": "127.0.0.1",
            "PORT": sandbox.port,
            "SECURITY": "starttls",
            "CA_FILE": sandbox.ca_file,
            "TOKEN_URI": f"http://127.0.0.1:{urllib.parse.urlsplit(sandbox.token_uri).port}/token",
            "AUTH_URI": sandbox.token_uri.replace("/token", "/authorize"),
        }
        assert Path(sandbox.ca_file).is_file()
        assert "GmailSandbox starttls" in repr(sandbox)
    finally:
        sandbox.stop()
    sandbox.stop()  # idempotent
    assert not sandbox.running


def test_start_is_fast() -> None:
    with GmailSandbox():  # certificates exist after this
        pass
    started = time.perf_counter()
    with GmailSandbox():
        elapsed = time.perf_counter() - started
    assert elapsed < 0.5


def test_stop_drops_open_connections(sb: GmailSandbox) -> None:
    client = connect(sb)
    sb.stop()
    with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
        client.noop()
    client.close()


# -- certificates -----------------------------------------------------------------------------


def test_certificates_in_a_directory_are_reused(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path / "certs")
    assert files.ca_file == tmp_path / "certs" / "ca.pem"
    cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    ca = x509.load_pem_x509_certificate(files.ca_file.read_bytes())
    cert.verify_directly_issued_by(ca)
    if os.name == "posix":
        assert files.key_file.stat().st_mode & 0o077 == 0

    before = files.cert_file.read_bytes()
    certs_module._cache.clear()  # as if in a new process
    assert ensure_certificates(tmp_path / "certs").cert_file.read_bytes() == before

    files.key_file.write_text("garbage")
    certs_module._cache.clear()
    regenerated = ensure_certificates(tmp_path / "certs")
    assert regenerated.cert_file.read_bytes() != before
    serialization.load_pem_private_key(regenerated.key_file.read_bytes(), password=None)


def test_cert_dir_option(tmp_path: Path) -> None:
    with GmailSandbox(cert_dir=tmp_path) as sandbox:
        sandbox.add_user(ME, app_password=APP_PASSWORD)
        assert sandbox.ca_file == str(tmp_path / "ca.pem")
        connect(sandbox).quit()


# -- OAuth endpoint ---------------------------------------------------------------------------


def post_form(url: str, form: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def xoauth2_works(sandbox: GmailSandbox, user: str, token: str) -> bool:
    with connect(sandbox, user=None) as client:
        code, _ = client.docmd("AUTH", "XOAUTH2 " + xoauth2_initial_response(user, token))
        if code == 334:
            code, _ = client.docmd("")
        return code == 235


def test_refresh_grant_with_google_auth(sb: GmailSandbox) -> None:
    sb.add_oauth_client("client-id", "client-secret")
    refresh_token = sb.issue_refresh_token(ME, "client-id")
    credentials = Credentials(
        None,
        refresh_token=refresh_token,
        token_uri=sb.token_uri,
        client_id="client-id",
        client_secret="client-secret",
        scopes=[MAIL_SCOPE],
    )
    credentials.refresh(Request())
    assert credentials.valid
    assert xoauth2_works(sb, ME, credentials.token)
    assert not xoauth2_works(sb, OTHER, credentials.token)

    status, body = post_form(
        sb.token_uri,
        {
            "grant_type": "refresh_token",
            "client_id": "client-id",
            "client_secret": "client-secret",
            "refresh_token": refresh_token,
        },
    )
    assert status == 200
    assert body["expires_in"] == 3599
    assert body["scope"] == MAIL_SCOPE
    assert body["token_type"] == "Bearer"
    assert "refresh_token" not in body

    sb.revoke(refresh_token)
    with pytest.raises(RefreshError, match="invalid_grant"):
        credentials.refresh(Request())
    assert not xoauth2_works(sb, ME, body["access_token"])  # revoked with its refresh token
    status, body = post_form(
        sb.token_uri,
        {
            "grant_type": "refresh_token",
            "client_id": "client-id",
            "client_secret": "client-secret",
            "refresh_token": refresh_token,
        },
    )
    assert (status, body) == (
        400,
        {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
    )
    assert sb.stats.token_requests == 4


def test_refresh_grant_bad_client_and_rotation(sb: GmailSandbox) -> None:
    sb.add_oauth_client("client-id", "client-secret")
    refresh_token = sb.issue_refresh_token(ME, "client-id")
    form = {
        "grant_type": "refresh_token",
        "client_id": "client-id",
        "client_secret": "wrong",
        "refresh_token": refresh_token,
    }
    assert post_form(sb.token_uri, form) == (
        401,
        {"error": "invalid_client", "error_description": "Unauthorized"},
    )

    sb.rotate_refresh_tokens = True
    status, body = post_form(sb.token_uri, {**form, "client_secret": "client-secret"})
    assert status == 200
    assert body["refresh_token"] != refresh_token
    status, _ = post_form(sb.token_uri, {**form, "client_secret": "client-secret"})
    assert status == 400  # the old one died
    status, _ = post_form(
        sb.token_uri,
        {**form, "client_secret": "client-secret", "refresh_token": body["refresh_token"]},
    )
    assert status == 200


def test_service_account_with_domain_wide_delegation(sb: GmailSandbox) -> None:
    info = sb.add_service_account("svc@project.iam.gserviceaccount.com", client_id="1234")
    assert info["type"] == "service_account"
    assert info["token_uri"] == sb.token_uri
    credentials = service_account.Credentials.from_service_account_info(
        info, scopes=[MAIL_SCOPE]
    ).with_subject(ME)
    credentials.refresh(Request())
    assert xoauth2_works(sb, ME, credentials.token)

    stranger = service_account.Credentials.from_service_account_info(
        info, scopes=[MAIL_SCOPE]
    ).with_subject("nobody@example.com")
    with pytest.raises(RefreshError, match="unauthorized_client"):
        stranger.refresh(Request())

    wrong_scope = service_account.Credentials.from_service_account_info(
        info, scopes=["https://www.googleapis.com/auth/gmail.readonly"]
    ).with_subject(ME)
    with pytest.raises(RefreshError, match="unauthorized_client"):
        wrong_scope.refresh(Request())

    forged_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = dict(info)
    forged["private_key"] = forged_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    impostor = service_account.Credentials.from_service_account_info(
        forged, scopes=[MAIL_SCOPE]
    ).with_subject(ME)
    with pytest.raises(RefreshError, match="invalid_grant"):
        impostor.refresh(Request())


def authorize(sandbox: GmailSandbox, **params: str) -> http.client.HTTPResponse:
    split = urllib.parse.urlsplit(sandbox.auth_uri)
    connection = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
    connection.request("GET", split.path + "?" + urllib.parse.urlencode(params))
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def redirect_query(response: http.client.HTTPResponse) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(response.headers["Location"]).query))


def test_authorization_code_flow_with_pkce(sb: GmailSandbox) -> None:
    sb.add_oauth_client("web-client", "web-secret")
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    redirect_uri = "http://127.0.0.1:8000/oauth/callback"
    params = {
        "client_id": "web-client",
        "redirect_uri": redirect_uri,
        "response_type": "code",
        "scope": MAIL_SCOPE,
        "state": "xyz",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "access_type": "offline",
        "prompt": "consent",
        "login_hint": OTHER,
    }
    response = authorize(sb, **params)
    assert response.status == 302
    location = urllib.parse.urlsplit(response.headers["Location"])
    assert location._replace(query="").geturl() == redirect_uri
    query = dict(urllib.parse.parse_qsl(location.query))
    assert query["state"] == "xyz"
    assert query["scope"] == MAIL_SCOPE

    exchange = {
        "grant_type": "authorization_code",
        "code": query["code"],
        "client_id": "web-client",
        "client_secret": "web-secret",
        "redirect_uri": redirect_uri,
        "code_verifier": "not-the-verifier",
    }
    status, body = post_form(sb.token_uri, exchange)
    assert (status, body["error"]) == (400, "invalid_grant")

    code = redirect_query(authorize(sb, **params))["code"]
    status, body = post_form(sb.token_uri, {**exchange, "code": code, "code_verifier": verifier})
    assert status == 200
    assert set(body) == {"access_token", "expires_in", "refresh_token", "scope", "token_type"}
    assert xoauth2_works(sb, OTHER, body["access_token"])  # the login_hint user consented
    status, _ = post_form(sb.token_uri, {**exchange, "code": code, "code_verifier": verifier})
    assert status == 400  # codes are single use

    status, refreshed = post_form(
        sb.token_uri,
        {
            "grant_type": "refresh_token",
            "client_id": "web-client",
            "client_secret": "web-secret",
            "refresh_token": body["refresh_token"],
        },
    )
    assert status == 200
    assert xoauth2_works(sb, OTHER, refreshed["access_token"])


def test_authorize_errors_and_consent_options(sb: GmailSandbox) -> None:
    base = {
        "client_id": "web-client",
        "redirect_uri": "http://localhost/cb",
        "response_type": "code",
        "scope": MAIL_SCOPE,
        "state": "s1",
    }
    split = urllib.parse.urlsplit(sb.auth_uri)
    connection = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
    connection.request("GET", split.path + "?" + urllib.parse.urlencode(base))
    response = connection.getresponse()
    assert response.status == 400
    assert b"error=invalid_client" in response.read()
    connection.close()

    sb.add_oauth_client("web-client", "web-secret")
    sb.consent_user = OTHER
    response = authorize(sb, **base, login_hint=ME)
    code = redirect_query(response)["code"]
    status, body = post_form(
        sb.token_uri,
        {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": "web-client",
            "client_secret": "web-secret",
            "redirect_uri": "http://localhost/cb",
        },
    )
    assert status == 200
    assert xoauth2_works(sb, OTHER, body["access_token"])

    sb.consent_error = "access_denied"
    response = authorize(sb, **base)
    assert response.status == 302
    assert redirect_query(response) == {"error": "access_denied", "state": "s1"}


# -- packaging: pytest plugin and management command --------------------------------------------


@pytest.mark.integration
def test_pytest_plugin_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_uses_fixtures.py").write_text(
        textwrap.dedent(
            """
            import smtplib, ssl

            def test_both(gmail_sandbox, gmail_sandbox_ssl):
                assert gmail_sandbox.security == "starttls"
                assert gmail_sandbox_ssl.security == "ssl"
                gmail_sandbox.add_user("me@example.com", app_password="abcdefghijklmnop")
                context = ssl.create_default_context(cafile=gmail_sandbox.ca_file)
                with smtplib.SMTP(gmail_sandbox.host, gmail_sandbox.port) as client:
                    client.starttls(context=context)
                    client.login("me@example.com", "abcdefghijklmnop")
                    client.sendmail("me@example.com", ["y@example.net"], b"Subject: x\\r\\n\\r\\n")
                assert len(gmail_sandbox.wait_for(1)) == 1

            def test_fresh(gmail_sandbox):
                assert gmail_sandbox.deliveries == []
            """
        )
    )
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "django_gmail_smtp.testing.pytest_plugin",
         "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


COMMAND_RUNNER = """
import sys
import django
from django.conf import settings

settings.configure(INSTALLED_APPS=[])
django.setup()
from django.core.management import call_command
from django_gmail_smtp.management.commands.gmail_sandbox import Command

call_command(Command(), *sys.argv[1:])
"""


def _ignore_sigint() -> None:
    # What a non-interactive shell does to a job it starts in the background (`cmd &`): the
    # process inherits SIGINT ignored, so Python raises no KeyboardInterrupt on Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.integration
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_management_command(tmp_path: Path, stop_signal: signal.Signals) -> None:
    ready = tmp_path / "ready.json"
    spool = tmp_path / "spool"
    process = subprocess.Popen(
        [sys.executable, "-c", COMMAND_RUNNER, "--port", "0", "--user", f"{ME}:{APP_PASSWORD}",
         "--cert-dir", str(tmp_path / "certs"), "--spool", str(spool), "--ready-file", str(ready),
         "--daily-limit", "5"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_ignore_sigint,
    )  # fmt: skip

    def started() -> bool:
        assert process.poll() is None, process.communicate()
        return ready.exists()

    try:
        wait_for(started, 30, "the sandbox command to get ready")
        info = json.loads(ready.read_text())
        assert info["ca_file"] == str(tmp_path / "certs" / "ca.pem")
        context = ssl.create_default_context(cafile=info["ca_file"])
        with smtplib.SMTP(info["host"], info["port"], timeout=10) as client:
            client.starttls(context=context)
            client.login(ME, APP_PASSWORD)
            client.sendmail(ME, ["you@example.net"], message("From the command"))
        wait_for(lambda: list(spool.glob("*.eml")), 10, "the message to be spooled")
        process.send_signal(stop_signal)
        try:
            stdout, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sandbox command did not stop on {stop_signal.name}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stderr
    [eml] = spool.glob("*.eml")
    assert b"Subject: From the command" in eml.read_bytes()
    assert "GMAIL_SMTP = {" in stdout
    assert f'    "PORT": {info["port"]},' in stdout
    assert "accepted from me@example.com" in stdout
    assert "'From the command'" in stdout
    assert "Gmail sandbox stopped." in stdout
    assert not ready.exists()


def test_oauth_port_defaults_next_to_the_smtp_port() -> None:
    from django.core.management import CommandError

    from django_gmail_smtp.management.commands.gmail_sandbox import oauth_port_for

    assert oauth_port_for(2587, None) == 2588  # fixed: printed settings survive a restart
    assert oauth_port_for(2587, 9000) == 9000
    assert oauth_port_for(0, None) == 0  # any free port for both
    assert oauth_port_for(0, 9000) == 9000
    with pytest.raises(CommandError, match="--oauth-port"):
        oauth_port_for(65535, None)
    with pytest.raises(CommandError, match="from 0 to 65535"):
        oauth_port_for(2587, 70000)


def _free_port_pair() -> int:
    """A port P such that P and P + 1 are both free just now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    pytest.fail("no two adjacent free ports on 127.0.0.1")


def _run_command_until_ready(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """Start ``gmail_sandbox`` with ``args``, read its ready file, stop it; return the file's
    content and the command's output."""
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-c", COMMAND_RUNNER, "--cert-dir", str(tmp_path / "certs"),
         "--ready-file", str(ready), *args],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip

    def started() -> bool:
        assert process.poll() is None, process.communicate()
        return ready.exists()

    try:
        wait_for(started, 30, "the sandbox command to get ready")
        info = json.loads(ready.read_text())
        # The endpoint really listens there: an empty grant is refused the way Google does.
        request = urllib.request.Request(info["token_uri"], data=b"grant_type=refresh_token")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (400, 401)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stderr
    return info, stdout


@pytest.mark.integration
def test_management_command_oauth_uris_survive_a_restart(tmp_path: Path) -> None:
    port = _free_port_pair()
    first, first_out = _run_command_until_ready(tmp_path, "--port", str(port))
    second, second_out = _run_command_until_ready(tmp_path, "--port", str(port))
    token_uri = f"http://127.0.0.1:{port + 1}/token"
    assert first["token_uri"] == second["token_uri"] == token_uri
    assert first["auth_uri"] == second["auth_uri"] == f"http://127.0.0.1:{port + 1}/authorize"
    for output in (first_out, second_out):
        assert f'    "TOKEN_URI": "{token_uri}",' in output

    explicit = _free_port_pair()
    info, output = _run_command_until_ready(tmp_path, "--port", "0", "--oauth-port", str(explicit))
    assert info["token_uri"] == f"http://127.0.0.1:{explicit}/token"
    assert f'    "AUTH_URI": "http://127.0.0.1:{explicit}/authorize",' in output


def test_old_import_paths_keep_working() -> None:
    """The sandbox was one module, ``testing.server``; its names still import from there."""
    import django_gmail_smtp.testing as testing
    from django_gmail_smtp.testing import sandbox, server, smtp, state

    assert server.GmailSandbox is sandbox.GmailSandbox is testing.GmailSandbox
    assert server.GmailSMTP is smtp.GmailSMTP  # tests monkeypatch it through server
    assert server.Fault is state.Fault and server.Replies is testing.Replies
    assert {name for name in testing.__all__ if hasattr(server, name)} >= {
        "GMAIL_MAX_RECIPIENTS", "GMAIL_SIZE_LIMIT", "PHASES", "Delivered", "Fault",
        "GmailSandbox", "Replies", "SandboxStats", "xoauth2_initial_response",
    }  # fmt: skip
