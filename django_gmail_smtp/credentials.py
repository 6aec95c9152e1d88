"""What an account logs in with: an App Password, or an OAuth2 access token kept fresh.

OAuth2 tokens are refreshed with google-auth (``google.oauth2.credentials.Credentials`` for a
user's refresh token, ``google.oauth2.service_account.Credentials.with_subject`` for Workspace
domain-wide delegation); the new access token, and a rotated refresh token if Google returns
one, are saved on the account. Refreshes are serialised per account with a row lock, so many
workers do not refresh the same token at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any, Literal

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from .conf import GMAIL_SCOPE, GOOGLE_TOKEN_URI, get_setting, legacy_email_setting
from .crypto import UnreadableSecret
from .exceptions import (
    ConsentRequired,
    EncryptionKeyError,
    GmailConfigurationError,
    NoSenderAccount,
    OAuthClientError,
    TokenRefreshError,
)
from .models import GmailAccount, normalize_address, normalize_app_password

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SMTPCredentials:
    """A login ready for the wire. ``repr()`` never shows the secret."""

    user: str
    mechanism: Literal["PASSWORD", "XOAUTH2"]
    secret: str
    expires_at: datetime | None = None

    def __repr__(self) -> str:
        return f"SMTPCredentials(user={self.user!r}, mechanism={self.mechanism!r}, secret=***)"

    __str__ = __repr__

    def expires_within(self, seconds: float) -> bool:
        if self.expires_at is None:
            return False
        return self.expires_at <= timezone.now() + timedelta(seconds=seconds)


def settings_account() -> GmailAccount | None:
    """An unsaved App Password account from EMAIL_HOST_USER / EMAIL_HOST_PASSWORD, if set."""
    user = legacy_email_setting("EMAIL_HOST_USER", "") or ""
    password = legacy_email_setting("EMAIL_HOST_PASSWORD", "") or ""
    if not user or not password:
        return None
    account = GmailAccount(
        email=normalize_address(user),
        auth_method=GmailAccount.AuthMethod.APP_PASSWORD,
        app_password=normalize_app_password(password),
        is_default=True,
        is_active=True,
    )
    account.from_settings = True
    return account


def _secret(account: GmailAccount, field: str, label: str) -> str:
    value = getattr(account, field)
    if isinstance(value, UnreadableSecret):
        raise EncryptionKeyError(
            f"The {label} of {account.email} cannot be decrypted with the configured keys. "
            'If GMAIL_SMTP["ENCRYPTION_KEYS"] or SECRET_KEY changed, add the old key after the '
            "new one; otherwise enter the secret again in the admin."
        )
    return value or ""


@sensitive_variables("password", "rejected_token")
def credentials_for(
    account: GmailAccount,
    *,
    force_refresh: bool = False,
    rejected_token: str | None = None,
    timeout: float | None = None,
    margin: float | None = None,
) -> SMTPCredentials:
    """The login for ``account``, refreshing its OAuth access token first when needed.

    ``force_refresh`` refreshes even an unexpired token (after Gmail rejected it);
    ``rejected_token`` is the token Gmail refused, so a token another process has already
    replaced is used instead of refreshing again. ``timeout`` and ``margin`` are the sending
    mailer's TIMEOUT and TOKEN_REFRESH_MARGIN (default: GMAIL_SMTP's).
    """
    method = account.auth_method
    if method == GmailAccount.AuthMethod.APP_PASSWORD:
        password = normalize_app_password(_secret(account, "app_password", "App Password"))
        if not password:
            raise GmailConfigurationError(
                f"The account {account.email} has no App Password. Create one at "
                "https://myaccount.google.com/apppasswords and save it on the account."
            )
        return SMTPCredentials(account.email, "PASSWORD", password)
    if method in (GmailAccount.AuthMethod.OAUTH2, GmailAccount.AuthMethod.SERVICE_ACCOUNT):
        return _oauth_credentials(
            account,
            force_refresh=force_refresh,
            rejected=rejected_token,
            timeout=timeout,
            margin=margin,
        )
    raise GmailConfigurationError(
        f"The account {account.email} has an unknown auth_method {method!r}; "
        "use app_password, oauth2 or service_account."
    )


def _from_google(expiry: datetime | None) -> datetime | None:
    """google-auth's expiry (naive UTC) as Django stores times (aware, or naive local)."""
    if expiry is None:
        return None
    if timezone.is_naive(expiry):
        expiry = expiry.replace(tzinfo=dt_timezone.utc)
    return expiry if settings.USE_TZ else timezone.make_naive(expiry)


def _token_valid(account: GmailAccount, margin: float | None = None) -> bool:
    if not account.access_token or isinstance(account.access_token, UnreadableSecret):
        return False
    if account.token_expiry is None:
        return False
    if margin is None:
        margin = get_setting("TOKEN_REFRESH_MARGIN")
    return account.token_expiry > timezone.now() + timedelta(seconds=int(margin))


@sensitive_variables("token", "rejected")
def _oauth_credentials(
    account: GmailAccount,
    *,
    force_refresh: bool,
    rejected: str | None,
    timeout: float | None = None,
    margin: float | None = None,
) -> SMTPCredentials:
    if not force_refresh and _token_valid(account, margin):
        token = account.access_token
        return SMTPCredentials(account.email, "XOAUTH2", token, account.token_expiry)
    try:
        if account.pk is None:
            _refresh(account, timeout)
        else:
            with transaction.atomic():
                locked = GmailAccount.objects.select_for_update().get(pk=account.pk)
                replaced = locked.access_token and locked.access_token != (
                    rejected or account.access_token
                )
                if not (_token_valid(locked, margin) and (not force_refresh or replaced)):
                    _refresh(locked, timeout)
                # else: another process refreshed it meanwhile
                for field in ("access_token", "token_expiry", "refresh_token", "health"):
                    setattr(account, field, getattr(locked, field))
    except (ConsentRequired, OAuthClientError) as exc:
        # Recorded after the row lock's transaction, which the error rolled back.
        account.mark_health(exc.health, exc.detail, exc)
        raise
    token = account.access_token
    return SMTPCredentials(account.email, "XOAUTH2", token, account.token_expiry)


def parse_service_account_key(raw: str) -> dict[str, Any]:
    """Parse and check a service account JSON key; ``ValueError`` says what is wrong."""
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(
            "The service account key is not valid JSON. Paste the whole key file downloaded "
            "from Google Cloud (IAM > Service accounts > Keys)."
        ) from None
    missing = [k for k in ("client_email", "private_key", "token_uri") if not info.get(k)]
    if info.get("type") != "service_account" or missing:
        raise ValueError(
            "This is not a service account key file"
            + (f" (missing {', '.join(missing)})" if missing else "")
            + ". Download a JSON key for the service account from Google Cloud."
        )
    return info


def _token_uri() -> str:
    return str(get_setting("TOKEN_URI"))


@sensitive_variables("client_secret", "refresh_token", "info", "creds")
def _refresh(account: GmailAccount, timeout: float | None = None) -> None:
    """Get a new access token from Google and store it (and a rotated refresh token);
    ``timeout``: seconds to wait for Google (default: GMAIL_SMTP's TIMEOUT)."""
    import google.auth.exceptions
    from google.auth.transport.requests import Request

    if account.auth_method == GmailAccount.AuthMethod.SERVICE_ACCOUNT:
        from google.oauth2 import service_account

        try:
            info = parse_service_account_key(
                _secret(account, "service_account_key", "service account key")
            )
        except ValueError as exc:
            raise GmailConfigurationError(f"{account.email}: {exc}") from None
        if _token_uri() != GOOGLE_TOKEN_URI:
            info = {**info, "token_uri": _token_uri()}
        creds = service_account.Credentials.from_service_account_info(
            info, scopes=[GMAIL_SCOPE], subject=account.email
        )
    else:
        from google.oauth2.credentials import Credentials

        refresh_token = _secret(account, "refresh_token", "OAuth refresh token")
        client_id = account.client_id or get_setting("CLIENT_ID")
        client_secret = _secret(account, "client_secret", "OAuth client secret") or get_setting(
            "CLIENT_SECRET"
        )
        if not refresh_token:
            raise ConsentRequired(
                f"The account {account.email} has no OAuth refresh token yet",
                account=account.email,
                phase="token",
            )
        if not client_id or not client_secret:
            raise GmailConfigurationError(
                f"The account {account.email} uses OAuth2 but has no client id/secret, and "
                'GMAIL_SMTP["CLIENT_ID"]/["CLIENT_SECRET"] are not set. Copy them from the '
                "Google Cloud console (APIs & Services > Credentials)."
            )
        creds = Credentials(
            token=None,
            refresh_token=refresh_token,
            token_uri=_token_uri(),
            client_id=client_id,
            client_secret=client_secret,
            scopes=[GMAIL_SCOPE],
        )
    if timeout is None:
        timeout = float(get_setting("TIMEOUT"))
    try:
        creds.refresh(_TimeoutRequest(Request(), timeout))
    except google.auth.exceptions.RefreshError as exc:
        _raise_refresh_error(account, exc)
    except google.auth.exceptions.TransportError as exc:
        raise TokenRefreshError(
            f"Could not reach Google's token endpoint to refresh {account.email}'s access token "
            f"({type(exc).__name__})",
            account=account.email,
            phase="token",
        ) from None

    account.access_token = creds.token
    account.token_expiry = _from_google(creds.expiry)
    update_fields = ["access_token", "token_expiry", "health", "health_detail"]
    new_refresh = getattr(creds, "refresh_token", None)
    if new_refresh and new_refresh != account.refresh_token:
        account.refresh_token = new_refresh
        update_fields.append("refresh_token")
    if account.health == GmailAccount.Health.NEEDS_CONSENT:
        account.health, account.health_detail = GmailAccount.Health.UNKNOWN, ""
    if account.pk and not account.from_settings:
        account.save(update_fields=update_fields)
    logger.info("Refreshed the OAuth access token of %s", account.email)


class _TimeoutRequest:
    """google-auth's Request with our TIMEOUT instead of its 120 s default."""

    def __init__(self, request: Any, timeout: float) -> None:
        self._request, self._timeout = request, timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._timeout)
        return self._request(*args, **kwargs)


def _raise_refresh_error(account: GmailAccount, exc: Exception) -> None:
    data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
    error = str(data.get("error") or "")
    text = str(exc.args[0]) if exc.args else ""
    if not error:
        error = "invalid_grant" if "invalid_grant" in text else error
    description = str(data.get("error_description") or "")
    if error == "invalid_grant":
        raise ConsentRequired(
            f"{account.email} must be connected with Google again ({description or error})",
            account=account.email,
            phase="token",
        ) from None
    if error in ("invalid_client", "unauthorized_client"):
        hint = None
        if account.auth_method == GmailAccount.AuthMethod.SERVICE_ACCOUNT:
            hint = (
                "Google refused the service account for this user. In the Workspace admin "
                "console (Security > API controls > Domain-wide delegation), authorise the "
                "service account's client id for the scope https://mail.google.com/, and check "
                "that the address is a user of that domain."
            )
        raise OAuthClientError(
            f"Google's token endpoint refused the credentials of {account.email} ({error})",
            account=account.email,
            phase="token",
            hint=hint,
        ) from None
    raise TokenRefreshError(
        f"Google's token endpoint refused to refresh {account.email}'s token "
        f"({error or 'no error code'}: {description})",
        account=account.email,
        phase="token",
    ) from None


def default_account() -> GmailAccount:
    """The default sender: the account flagged default, else the only active one, else settings."""
    from .services import eligible_accounts

    accounts = list(eligible_accounts()[:2])
    if accounts and (accounts[0].is_default or len(accounts) == 1):
        return accounts[0]
    fallback = settings_account()
    if fallback is not None and not accounts:
        return fallback
    if accounts:
        raise NoSenderAccount(
            "Several active Gmail accounts exist but none is marked as the default. Tick "
            "'default account' on one of them in the admin."
        )
    raise NoSenderAccount(
        "There is no active Gmail account to send from, and EMAIL_HOST_USER / "
        "EMAIL_HOST_PASSWORD are not set. Add an account in the admin (Gmail SMTP > Gmail "
        "accounts) or set EMAIL_HOST_USER and EMAIL_HOST_PASSWORD (an App Password)."
    )


# --- consent: the OAuth 2.0 authorization-code flow with PKCE ----------------------------------

#: Gmail SMTP plus the consenting user's identity (an id_token with the email address), so a
#: grant made by another Google user is refused instead of replacing working credentials.
CONSENT_SCOPE = f"{GMAIL_SCOPE} openid email"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")


@dataclass(frozen=True)
class Authorization:
    """A started consent flow: send the user to ``url``; keep ``state`` and ``verifier``."""

    url: str
    state: str
    verifier: str
    redirect_uri: str

    def __repr__(self) -> str:
        return f"Authorization(redirect_uri={self.redirect_uri!r}, state=***, verifier=***)"


def oauth_client(account: GmailAccount) -> tuple[str, str]:
    """The OAuth client id and secret of ``account`` (its own, else GMAIL_SMTP's)."""
    client_id = account.client_id or str(get_setting("CLIENT_ID") or "")
    secret = _secret(account, "client_secret", "OAuth client secret") or str(
        get_setting("CLIENT_SECRET") or ""
    )
    if not client_id or not secret:
        raise GmailConfigurationError(
            f"To connect {account.email} with Google, give an OAuth client id and secret, on "
            'the account or as GMAIL_SMTP["CLIENT_ID"] / ["CLIENT_SECRET"]. Create a "Web '
            'application" (or "Desktop app", for the command line) OAuth client in the Google '
            "Cloud console, APIs & Services > Credentials."
        )
    return client_id, secret


def start_authorization(account: GmailAccount, redirect_uri: str) -> Authorization:
    """Build Google's consent URL (offline access, forced consent, PKCE S256, a fresh state)."""
    import base64
    import hashlib
    import secrets
    from urllib.parse import urlencode

    client_id, _secret_value = oauth_client(account)
    state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    params = {
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "response_type": "code",
        "scope": CONSENT_SCOPE,
        "access_type": "offline",
        "prompt": "consent",
        "state": state,
        "code_challenge": challenge.decode().rstrip("="),
        "code_challenge_method": "S256",
        "login_hint": account.email,
    }
    url = f"{get_setting('AUTH_URI')}?{urlencode(params)}"
    return Authorization(url=url, state=state, verifier=verifier, redirect_uri=redirect_uri)


@sensitive_variables("secret", "payload", "data")
def finish_authorization(
    account: GmailAccount, *, code: str, verifier: str, redirect_uri: str
) -> GmailAccount:
    """Exchange the authorization code and store the tokens (encrypted) on the account.

    The grant is stored only if the Google user who consented (the token answer's id_token)
    is the account's address or one of its configured send-as aliases; otherwise
    ``OAuthClientError`` is raised and the stored credentials are left as they were.
    """
    import requests

    client_id, secret = oauth_client(account)
    payload = {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": client_id,
        "client_secret": secret,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    try:
        response = requests.post(_token_uri(), data=payload, timeout=float(get_setting("TIMEOUT")))
        data = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise TokenRefreshError(
            f"Could not exchange Google's authorization code for {account.email} "
            f"({type(exc).__name__}); try connecting again",
            account=account.email,
            phase="consent",
        ) from None
    if response.status_code != 200 or "error" in data:
        error = str(data.get("error") or response.status_code)
        description = str(data.get("error_description") or "")
        raise OAuthClientError(
            f"Google refused the authorization code for {account.email} ({error}"
            + (f": {description}" if description else "")
            + ")",
            account=account.email,
            phase="consent",
            hint="Start 'Connect with Google' again; check that the redirect URI is listed for "
            "the OAuth client in the Google Cloud console.",
        )
    if GMAIL_SCOPE not in str(data.get("scope", GMAIL_SCOPE)).split():
        raise OAuthClientError(
            f"Google granted {data.get('scope')!r}, not {GMAIL_SCOPE} (needed for SMTP)",
            account=account.email,
            phase="consent",
            hint="Connect again and leave the 'Read, compose, send' permission ticked.",
        )
    refresh = data.get("refresh_token")
    if not refresh:
        raise OAuthClientError(
            f"Google returned no refresh token for {account.email}",
            account=account.email,
            phase="consent",
            hint="Remove this app's access at https://myaccount.google.com/permissions and "
            "connect again, so Google asks for consent and issues a refresh token.",
        )
    _check_identity(account, _consented_address(account, data, client_id))
    account.auth_method = GmailAccount.AuthMethod.OAUTH2
    account.refresh_token = refresh
    account.access_token = data.get("access_token", "")
    expires_in = int(data.get("expires_in") or 0)
    account.token_expiry = timezone.now() + timedelta(seconds=expires_in) if expires_in else None
    account.health, account.health_detail = GmailAccount.Health.UNKNOWN, ""
    account.save()
    account.release_deferred()  # mail that waited for new credentials is tried again
    logger.info("Connected %s with Google (OAuth2)", account.email)
    return account


def _jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified: ``ValueError`` if it is not one."""
    import base64
    import binascii

    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a JWT") from None
    if not isinstance(claims, dict):
        raise ValueError("not a JWT")
    return claims


@sensitive_variables("data")
def _consented_address(account: GmailAccount, data: dict[str, Any], client_id: str) -> str:
    """The verified address of the Google user who consented, from the token answer.

    The id_token came straight from the token endpoint over TLS, so (per Google's OpenID
    Connect docs) its signature need not be checked; its issuer and audience are.
    """
    kept = f"Nothing was changed: the stored credentials of {account.email} were kept."
    token = data.get("id_token")
    if not token or not isinstance(token, str):
        raise OAuthClientError(
            f"Google's answer does not say which Google user consented (no id_token, so the "
            f"scopes 'openid email' were not granted). {kept}",
            account=account.email,
            phase="consent",
            hint="Connect again and allow Google to share the account's email address; check "
            "that the OAuth consent screen in the Google Cloud console lists the scopes "
            "openid and email (.../auth/userinfo.email).",
        )
    try:
        claims = _jwt_claims(token)
    except ValueError:
        claims = {}
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if claims.get("iss") not in GOOGLE_ISSUERS or client_id not in audiences:
        raise OAuthClientError(
            f"Google's answer carries an id_token that was not issued by Google for this OAuth "
            f"client. {kept}",
            account=account.email,
            phase="consent",
            hint="Check TOKEN_URI in GMAIL_SMTP (it must be Google's token endpoint) and "
            "connect again.",
        )
    email = claims.get("email")
    if not email or claims.get("email_verified") not in (True, "true"):
        raise OAuthClientError(
            f"Google's answer does not give a verified email address for the Google user who "
            f"consented. {kept}",
            account=account.email,
            phase="consent",
            hint="Connect again and allow Google to share the account's email address.",
        )
    return normalize_address(str(email))


def _check_identity(account: GmailAccount, consented: str) -> None:
    """Refuse a grant made by a Google user who is not the account (nor a configured alias)."""
    if consented == normalize_address(account.email) or consented in account.aliases():
        return
    raise OAuthClientError(
        f"The Google user {consented} consented, but this connection was for {account.email}; "
        f"the new token was discarded and the stored credentials of {account.email} were kept",
        account=account.email,
        phase="consent",
        hint=f"Connect again and sign in to Google as {account.email} (on Google's page, choose "
        "'Use another account' if another user is signed in). If "
        f"{consented} is a verified send-as alias of this account, add it to the account's "
        "send-as aliases first.",
    )
