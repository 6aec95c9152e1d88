"""Every admin page of the app, as three kinds of user, on all three auth methods: no secret
and no ciphertext is ever rendered, and no query-string lookup the admin does not offer is
accepted (a viewer could otherwise probe a stored message or secret one character at a time).
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import Permission, User
from django.core.mail import EmailMessage
from django.urls import reverse

from django_gmail_smtp.crypto import EncryptedTextField
from django_gmail_smtp.models import GmailAccount, OutboundEmail

from .factories import queued_row, raw_columns, staff_user

pytestmark = pytest.mark.django_db

APP_USER = "apppw@example.com"
OAUTH_USER = "oauth@example.com"
ROBOT_USER = "robot@corp.example"
APP_PASSWORD = "qzxjkvbnmwplrtsh"  # 16 letters, found nowhere else on a page
CLIENT_ID = "987-admin-security.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-matrix-client-secret-Q7v3"
RESET_TOKEN = "c0ffee-reset-7b3f9a1d2e"
ENCRYPTED = [f.name for f in GmailAccount._meta.fields if isinstance(f, EncryptedTextField)]
VIEW_ONLY = ("view_gmailaccount", "view_outboundemail")
STORED, NOT_SET = "Stored (encrypted)", "Not set"  # all a page may say about a secret


USERS = {
    "superuser": lambda: staff_user("root", superuser=True),
    "viewer": lambda: staff_user("viewer", *VIEW_ONLY),
    "no_permission": lambda: staff_user("nobody"),
}


@pytest.fixture
def accounts(sandbox):
    """One account per auth method, each holding distinctive secrets."""
    sandbox.add_user(APP_USER, app_password=APP_PASSWORD)
    sandbox.add_user(OAUTH_USER)
    sandbox.add_user(ROBOT_USER)
    sandbox.add_oauth_client(CLIENT_ID, CLIENT_SECRET)
    key = sandbox.add_service_account("mailer@matrix.iam.gserviceaccount.com", "5150")
    made = {
        "app_password": GmailAccount.objects.create(
            email=APP_USER, app_password=APP_PASSWORD, is_default=True
        ),
        "oauth": GmailAccount.objects.create(
            email=OAUTH_USER,
            auth_method=GmailAccount.AuthMethod.OAUTH2,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            refresh_token=sandbox.issue_refresh_token(OAUTH_USER, CLIENT_ID),
            access_token=sandbox.issue_access_token(OAUTH_USER),
        ),
        "service_account": GmailAccount.objects.create(
            email=ROBOT_USER,
            auth_method=GmailAccount.AuthMethod.SERVICE_ACCOUNT,
            service_account_key=json.dumps(key),
        ),
    }
    for account in made.values():
        account.refresh_from_db()
    return made


def forbidden_strings(accounts: dict[str, GmailAccount]) -> list[str]:
    """Every plaintext secret, the private key's lines, and every stored ciphertext."""
    found: set[str] = set()
    for account in accounts.values():
        found.update(str(getattr(account, name)) for name in ENCRYPTED)
        found.update(value for value in raw_columns(account, *ENCRYPTED).values() if value)
        if account.service_account_key:
            pem = json.loads(account.service_account_key)["private_key"]
            found.update(line for line in pem.splitlines() if len(line) > 40)
            found.add(json.dumps(pem)[1:60])  # the key as it sits in the JSON text
        found.update(value.replace("\n", "\\n") for value in list(found))
    return sorted(s for s in found if len(s) >= 8)


def assert_clean(page: str, forbidden: list[str], where: str) -> None:
    for secret in forbidden:
        assert secret not in page, f"{where} shows a secret or its ciphertext ({secret[:6]}...)"
    assert "gmsenc1:" not in page, f"{where} shows ciphertext"


@pytest.fixture
def outbound(accounts):
    """A password-reset message in the outbox (its link is what a viewer must not recover)."""
    message = EmailMessage(
        "Password reset",
        f"Reset your password: https://example.org/reset/MQ/{RESET_TOKEN}/\n",
        APP_USER,
        ["victim@example.net"],
    )
    mime = message.message().as_bytes()
    assert RESET_TOKEN.encode() in mime
    return OutboundEmail.objects.create(
        account=accounts["app_password"],
        account_email=APP_USER,
        from_email=APP_USER,
        recipients=["victim@example.net"],
        subject="Password reset",
        message_id="<reset-1@example.org>",
        mime=mime,
        size=len(mime),
    )


def admin_urls(accounts, outbound) -> list[tuple[str, str]]:
    """(name, url) of every admin page of the app, fetched with GET."""
    urls = [
        ("admin index", reverse("admin:index")),
        ("app index", reverse("admin:app_list", args=["django_gmail_smtp"])),
        ("account list", reverse("admin:django_gmail_smtp_gmailaccount_changelist")),
        ("account add", reverse("admin:django_gmail_smtp_gmailaccount_add")),
        ("dashboard", reverse("admin:django_gmail_smtp_dashboard")),
        ("oauth callback", reverse("admin:django_gmail_smtp_oauth_callback")),
        (
            "oauth callback with code",
            reverse("admin:django_gmail_smtp_oauth_callback") + "?state=forged&code=4/0x",
        ),
        ("outbox", reverse("admin:django_gmail_smtp_outboundemail_changelist")),
        ("outbox add", reverse("admin:django_gmail_smtp_outboundemail_add")),
    ]
    for kind, account in accounts.items():
        for page in ("change", "history", "delete"):
            name = f"admin:django_gmail_smtp_gmailaccount_{page}"
            urls.append((f"{kind} {page}", reverse(name, args=[account.pk])))
        urls.append(
            (
                f"{kind} connect",
                reverse("admin:django_gmail_smtp_gmailaccount_connect", args=[account.pk]),
            )
        )
        for operation in ("verify", "send-test", "refresh", "pause", "resume", "unknown"):
            urls.append(
                (
                    f"{kind} {operation}",
                    reverse(
                        "admin:django_gmail_smtp_gmailaccount_operation",
                        args=[account.pk, operation],
                    ),
                )
            )
    for page in ("change", "history", "delete"):
        name = f"admin:django_gmail_smtp_outboundemail_{page}"
        urls.append((f"outbox {page}", reverse(name, args=[outbound.pk])))
    return urls


@pytest.mark.parametrize("who", USERS)
def test_no_admin_page_shows_a_secret_or_ciphertext(client, accounts, outbound, who):
    """Every page, GET, as each user: a sensible status, no secret, no ciphertext."""
    client.force_login(USERS[who]())
    forbidden = forbidden_strings(accounts)
    assert len(forbidden) > 10  # the secrets, the key's lines and the ciphertexts
    for name, url in admin_urls(accounts, outbound):
        response = client.get(url)
        assert response.status_code in (200, 302, 403, 404, 405), (name, response.status_code)
        if who == "no_permission" and "index" not in name:
            assert response.status_code in (302, 403, 404, 405), name
        assert_clean(response.content.decode(), forbidden, f"{name} as {who}")
        if response.status_code == 302:
            followed = client.get(response["Location"])
            assert followed.status_code in (200, 302, 403, 404), (name, "followed")
            assert_clean(followed.content.decode(), forbidden, f"{name} (followed) as {who}")


@pytest.mark.parametrize("kind", ["app_password", "oauth", "service_account"])
@pytest.mark.parametrize("who", ["superuser", "viewer"])
def test_change_page_says_stored_or_not_set(client, accounts, who, kind):
    """The change page tells whether each secret is stored, in words, never by its value."""
    client.force_login(USERS[who]())
    account = accounts[kind]
    url = reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
    response = client.get(url)
    assert response.status_code == 200
    page = response.content.decode()
    assert_clean(page, forbidden_strings(accounts), f"{kind} change page as {who}")
    if who == "viewer":
        # Read-only: "Stored (encrypted)" or "Not set" for each secret, nothing else.
        for name in ("app_password", "client_secret", "refresh_token", "service_account_key"):
            shown = re.search(
                rf'field-{name}_state\b.*?<div class="readonly">(.*?)</div>', page, re.DOTALL
            )
            assert shown, name
            assert shown.group(1) == (STORED if account.has_secret(name) else NOT_SET), name
        assert 'name="app_password"' not in page and "clear_secrets" not in page
    else:
        assert 'type="password"' in page and f"{STORED}; leave empty to keep it." in page


def test_service_account_key_typed_with_an_error_is_not_echoed(client, accounts):
    """A key submitted with a form error is not sent back in the page (write-only)."""
    client.force_login(USERS["superuser"]())
    account = accounts["service_account"]
    url = reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
    typed = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----MIIEvgIB"}'
    page = client.post(
        url,
        {
            "email": "not an address",
            "auth_method": "service_account",
            "service_account_key": typed,
            "limits_preset": "workspace",
        },
    ).content.decode()
    assert "errornote" in page or "errorlist" in page
    assert "MIIEvgIB" not in page


# --- query-string lookups ----------------------------------------------------------------------

ACCOUNTS_URL = "admin:django_gmail_smtp_gmailaccount_changelist"
OUTBOX_URL = "admin:django_gmail_smtp_outboundemail_changelist"
PROBES = ("exact", "startswith", "contains", "icontains", "regex", "gt", "isnull", "in")


def refused(response) -> bool:
    """Django's answer to a disallowed or invalid lookup: 400, or a redirect to ?e=1."""
    if response.status_code == 400:
        return True
    return response.status_code == 302 and response["Location"].endswith("?e=1")


def probe_params(model) -> list[str]:
    """Every field of the model with several lookups, plus the secret/body probes of the issue."""
    params = []
    for field in model._meta.concrete_fields:
        for lookup in PROBES:
            params.append(f"{field.name}__{lookup}")
        params.append(field.name)
    return params


def get(client, name: str, params: dict[str, str]):
    return client.get(reverse(name) + "?" + urlencode(params))


ACCOUNTS_OFFERED = {
    "auth_method__exact": "oauth2",
    "auth_method__isnull": "False",
    "health__exact": "unknown",
    "health__isnull": "False",
    "is_active__exact": "1",
    "is_active__isnull": "False",
    "limits_preset__exact": "gmail",
    "limits_preset__isnull": "False",
}


@pytest.mark.parametrize("who", ["superuser", "viewer"])
def test_account_list_refuses_lookups_it_does_not_offer(client, accounts, who):
    """`?app_password__startswith=`, `?refresh_token__...` and friends are refused."""
    client.force_login(USERS[who]())
    secret_params = [f"{name}__{lookup}" for name in ENCRYPTED for lookup in PROBES]
    for param in secret_params:
        for value in ("a", "gmsenc1:", "(", "1", APP_PASSWORD[:3]):
            response = get(client, ACCOUNTS_URL, {param: value})
            assert refused(response), (param, value, response.status_code)
    for param in probe_params(GmailAccount):
        if param not in ACCOUNTS_OFFERED:
            response = get(client, ACCOUNTS_URL, {param: "1"})
            assert refused(response), (param, response.status_code)


@pytest.mark.parametrize("who", ["superuser", "viewer"])
def test_account_list_keeps_its_own_filters(client, accounts, who):
    client.force_login(USERS[who]())
    page = get(client, ACCOUNTS_URL, {"auth_method__exact": "oauth2"})
    assert page.status_code == 200
    assert OAUTH_USER in page.content.decode() and APP_USER not in page.content.decode()
    for param, value in {**ACCOUNTS_OFFERED, "q": "oauth"}.items():
        assert get(client, ACCOUNTS_URL, {param: value}).status_code == 200, param


USERS_FOR_OUTBOX = {
    "superuser": USERS["superuser"],
    "viewer": USERS["viewer"],
    "body_reader": lambda: staff_user("reader", *VIEW_ONLY, "view_body_outboundemail"),
}
OUTBOX_OFFERED = {
    "status__exact": "queued",
    "status__isnull": "False",
    "priority__exact": "transactional",
    "priority__isnull": "False",
    "account__id__exact": "1",
    "account__isnull": "True",
    "reason__exact": "permanent",
    "reason__isnull": "True",
    "created_at__gte": "2020-01-01",
    "created_at__lt": "2999-01-01",
    "created_at__year": "2024",
    "created_at__month": "1",
    "created_at__day": "1",
    "waiting": "too-long",  # the "Waiting too long" filter
}


@pytest.mark.parametrize("who", USERS_FOR_OUTBOX)
def test_outbox_refuses_lookups_on_the_stored_message(client, outbound, who):
    """`?mime__regex=` / `?mime__contains=` cannot recover a reset link, for anyone."""
    client.force_login(USERS_FOR_OUTBOX[who]())
    prefix = RESET_TOKEN[:4]
    stored = ("mime__regex", "mime__contains", "mime__icontains", "mime__startswith", "mime")
    # A message stored unbuilt: its JSON, and paths into it.
    stored += ("draft__contains", "draft__body", "draft__body__contains", "draft__has_key")
    stored += ("draft__subject__icontains", "draft__alternatives__0__0__regex")
    for param in stored:
        for value in (prefix, f".*{prefix}", "(", "cmVzZXQ="):
            response = get(client, OUTBOX_URL, {param: value})
            assert refused(response), (param, value, response.status_code)
    for param in probe_params(OutboundEmail):
        if param in OUTBOX_OFFERED:
            continue
        response = get(client, OUTBOX_URL, {param: "1"})
        assert refused(response), (param, response.status_code)


@pytest.mark.parametrize("who", USERS_FOR_OUTBOX)
def test_outbox_keeps_its_own_filters_and_never_fails(client, outbound, who):
    """The offered filters work; junk values in them are Django's ?e=1, never a 500."""
    client.force_login(USERS_FOR_OUTBOX[who]())
    for param, value in OUTBOX_OFFERED.items():
        assert get(client, OUTBOX_URL, {param: value}).status_code == 200, param
    page = get(client, OUTBOX_URL, {"status__exact": "queued"}).content.decode()
    assert "Password reset" in page
    for param in OUTBOX_OFFERED:
        for junk in ("x(", "99999999999999999999999"):
            response = get(client, OUTBOX_URL, {param: junk})
            assert response.status_code in (200, 302, 400), (param, junk, response.status_code)


@pytest.mark.parametrize("who", USERS_FOR_OUTBOX)
def test_outbox_search_reaches_bodies_only_with_view_body(client, outbound, who):
    """The search box finds words of the message only for users who may read bodies."""
    user = USERS_FOR_OUTBOX[who]()
    client.force_login(user)
    can_read = user.has_perm("django_gmail_smtp.view_body_outboundemail")
    for term in (RESET_TOKEN, RESET_TOKEN[:6], "reset/MQ"):
        response = get(client, OUTBOX_URL, {"q": term})
        assert response.status_code == 200
        found = "Password reset" in response.content.decode()
        assert found is can_read, (who, term)
    # What every viewer sees anyway stays searchable.
    for term in ("victim@example.net", "Password"):
        assert "Password reset" in get(client, OUTBOX_URL, {"q": term}).content.decode()


def test_outbox_bodies_hidden_without_their_permission(client, account, no_dispatch):
    """Reset links in stored bodies must not be readable with only the view permission."""
    row = queued_row(account, subject="Reset your password")
    user = staff_user("viewer", "view_outboundemail")
    client.force_login(user)
    url = reverse("admin:django_gmail_smtp_outboundemail_change", args=[row.pk])
    page = client.get(url).content.decode()
    assert "Hidden: message bodies hold" in page and "srcdoc" not in page
    user.user_permissions.add(Permission.objects.get(codename="view_body_outboundemail"))
    user = User.objects.get(pk=user.pk)  # drop the permission cache
    client.force_login(user)
    assert '<pre class="gms-text">b' in client.get(url).content.decode()
