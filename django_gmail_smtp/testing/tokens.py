"""A local stand-in for Google's OAuth 2.0 endpoints, good enough for google-auth.

``OAuthAuthority`` holds clients, tokens, codes and service accounts and answers the grants;
``TokenServer`` serves it over HTTP on 127.0.0.1:

- ``POST /token``: the ``refresh_token``, ``authorization_code`` (with PKCE) and
  ``urn:ietf:params:oauth:grant-type:jwt-bearer`` (service account, domain-wide delegation)
  grants, with Google's error bodies;
- ``GET /authorize``: the consent screen, answered at once with a redirect; the consenting
  Google user is ``authuser`` (the account picked on the consent page), else
  ``OAuthAuthority.consent_user``, else ``login_hint``, else the sandbox's first user;
- ``POST /revoke``: token revocation.

Like Google, a code granted with the ``openid`` scope is exchanged for an ``id_token`` too: a JWT
naming the consenting user (``sub``; ``email`` and ``email_verified`` with the ``email``
scope), with ``aud`` the client id and ``iss`` ``https://accounts.google.com``. It is signed
HS256 with the client secret (Google signs RS256): clients that receive it straight from the
token endpoint need not check the signature.

Token lifetimes run on the real clock (``time.time``), since the client computing its token's
expiry does too; the sandbox's settable clock only drives the sending quota.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "MAIL_SCOPE",
    "OAuthAuthority",
    "TokenResponse",
    "TokenServer",
    "UserDirectory",
    "make_id_token",
]

logger = logging.getLogger(__name__)

MAIL_SCOPE = "https://mail.google.com/"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCESS_TOKEN_LIFETIME = 3599
AUTH_CODE_LIFETIME = 600
# google-auth always sets the JWT ``aud`` to Google's endpoint, whatever ``token_uri`` says.
GOOGLE_TOKEN_AUDIENCES = frozenset(
    {
        "https://oauth2.googleapis.com/token",
        "https://www.googleapis.com/oauth2/v4/token",
        "https://accounts.google.com/o/oauth2/token",
    }
)
JWT_MAX_LIFETIME = 3600
JWT_LEEWAY = 300

INVALID_GRANT_REVOKED = "Token has been expired or revoked."

ID_TOKEN_ISSUER = "https://accounts.google.com"
# Google reports the short identity scopes by their full names in a token answer.
SCOPE_NAMES = {
    "email": "https://www.googleapis.com/auth/userinfo.email",
    "profile": "https://www.googleapis.com/auth/userinfo.profile",
}


class UserDirectory(Protocol):
    """What the OAuth endpoint needs to know about the sandbox's users."""

    def canonical_user(self, email: str) -> str | None:
        """Return the user's address as registered, or None if there is no such user."""

    def default_consent_user(self) -> str | None:
        """Return the user who consents when the request names none."""


@dataclass(frozen=True)
class TokenResponse:
    """An HTTP answer of the token endpoint."""

    status: int
    body: dict[str, Any]


@dataclass
class _Client:
    secret: str
    redirect_uris: frozenset[str] | None


@dataclass
class _RefreshToken:
    email: str
    client_id: str
    scope: str


@dataclass
class _AccessToken:
    email: str
    expires_at: float
    scope: str
    refresh_token: str | None = None


@dataclass
class _AuthCode:
    client_id: str
    redirect_uri: str
    email: str
    scope: str
    challenge: str | None
    challenge_method: str
    expires_at: float


@dataclass
class _ServiceAccount:
    email: str
    client_id: str
    key_id: str
    public_key: rsa.RSAPublicKey


@dataclass
class _Redirect:
    location: str


@dataclass
class _ErrorPage:
    status: int
    error: str
    description: str


def _error(status: int, error: str, description: str) -> TokenResponse:
    return TokenResponse(status, {"error": error, "error_description": description})


def _b64url_decode(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _granted_scope(scope: str) -> str:
    """The scope as Google's token endpoint reports it (``email`` -> ``.../userinfo.email``)."""
    return " ".join(SCOPE_NAMES.get(s, s) for s in scope.split())


def _scope_has(scope: str, short_name: str) -> bool:
    names = scope.split()
    return short_name in names or SCOPE_NAMES.get(short_name) in names


def make_id_token(
    email: str, client_id: str, key: str, *, with_email: bool = True, now: float | None = None
) -> str:
    """An OpenID Connect id_token for ``email``, as the token endpoint returns it (HS256)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": ID_TOKEN_ISSUER,
        "azp": client_id,
        "aud": client_id,
        "sub": str(int.from_bytes(hashlib.sha256(email.lower().encode()).digest()[:8], "big")),
        "iat": issued,
        "exp": issued + ACCESS_TOKEN_LIFETIME,
    }
    if with_email:
        claims.update(email=email, email_verified=True)
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signature = hmac.new(key.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def _pkce_s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass
class OAuthAuthority:
    """The sandbox's OAuth state: clients, tokens, codes and service accounts. Thread-safe."""

    users: UserDirectory
    on_request: Callable[[], None] = lambda: None
    now: Callable[[], float] = time.time
    token_uri: str = ""
    """Set by the server once it listens; accepted as a JWT audience."""
    rotate_refresh_tokens: bool = False
    """Refreshing returns a new refresh token and invalidates the old one."""
    consent_user: str | None = None
    """Who consents at ``/authorize``, overriding ``login_hint`` (not ``authuser``)."""
    consent_error: str | None = None
    """If set (e.g. ``"access_denied"``), ``/authorize`` redirects with this error."""

    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _clients: dict[str, _Client] = field(default_factory=dict, repr=False)
    _refresh: dict[str, _RefreshToken] = field(default_factory=dict, repr=False)
    _access: dict[str, _AccessToken] = field(default_factory=dict, repr=False)
    _codes: dict[str, _AuthCode] = field(default_factory=dict, repr=False)
    _service_accounts: dict[str, _ServiceAccount] = field(default_factory=dict, repr=False)

    # -- registration -------------------------------------------------------------------------

    def add_client(
        self, client_id: str, client_secret: str, redirect_uris: Iterable[str] | None = None
    ) -> None:
        """Register an OAuth client; ``redirect_uris=None`` accepts any redirect URI."""
        uris = frozenset(redirect_uris) if redirect_uris is not None else None
        with self._lock:
            self._clients[client_id] = _Client(client_secret, uris)

    def add_service_account(
        self, email: str, client_id: str, *, auth_uri: str = "", token_uri: str = ""
    ) -> dict[str, str]:
        """Register a service account with domain-wide delegation; return its JSON key info."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        with self._lock:
            self._service_accounts[email.lower()] = _ServiceAccount(
                email, client_id, key_id, key.public_key()
            )
        local, _, domain = email.partition("@")
        project = domain.split(".", 1)[0] if domain.endswith(".iam.gserviceaccount.com") else local
        return {
            "type": "service_account",
            "project_id": project,
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": client_id,
            "auth_uri": auth_uri,
            "token_uri": token_uri or self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
            + urllib.parse.quote(email),
            "universe_domain": "googleapis.com",
        }

    # -- tokens -------------------------------------------------------------------------------

    def issue_refresh_token(self, email: str, client_id: str, scope: str = MAIL_SCOPE) -> str:
        """Mint a refresh token for a known user and client."""
        with self._lock:
            user = self._require_user(email)
            if client_id not in self._clients:
                raise ValueError(f"no sandbox OAuth client {client_id!r}; add_oauth_client() first")
            token = "1//0" + secrets.token_urlsafe(48)
            self._refresh[token] = _RefreshToken(user, client_id, scope)
            return token

    def issue_access_token(
        self,
        email: str,
        expires_in: float = 3600,
        *,
        scope: str = MAIL_SCOPE,
        refresh_token: str | None = None,
    ) -> str:
        """Mint an access token for a known user, valid for ``expires_in`` seconds."""
        with self._lock:
            user = self._require_user(email)
            token = "ya29.a0" + secrets.token_urlsafe(48)
            self._access[token] = _AccessToken(user, self.now() + expires_in, scope, refresh_token)
            return token

    def revoke(self, token: str) -> bool:
        """Revoke a refresh token (and the access tokens it produced) or an access token."""
        with self._lock:
            if self._refresh.pop(token, None) is not None:
                for key in [k for k, v in self._access.items() if v.refresh_token == token]:
                    del self._access[key]
                return True
            return self._access.pop(token, None) is not None

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far invalid."""
        with self._lock:
            self._access.clear()

    def access_token_user(self, token: str, scope: str = MAIL_SCOPE) -> str | None:
        """Return the user an unexpired access token with ``scope`` belongs to, else None."""
        with self._lock:
            entry = self._access.get(token)
            if entry is None or entry.expires_at <= self.now():
                return None
            if scope not in entry.scope.split():
                return None
            return entry.email

    # -- HTTP-level operations ----------------------------------------------------------------

    def token_request(
        self, form: Mapping[str, str], basic_auth: tuple[str, str] | None = None
    ) -> TokenResponse:
        """Answer ``POST /token`` like Google does."""
        self.on_request()
        grant_type = form.get("grant_type", "")
        if grant_type == "refresh_token":
            return self._refresh_grant(form, basic_auth)
        if grant_type == "authorization_code":
            return self._code_grant(form, basic_auth)
        if grant_type == JWT_BEARER_GRANT:
            return self._jwt_grant(form)
        if not grant_type:
            return _error(400, "invalid_request", "Missing required parameter: grant_type")
        return _error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")

    def revoke_request(self, form: Mapping[str, str]) -> TokenResponse:
        """Answer ``POST /revoke``."""
        self.on_request()
        if self.revoke(form.get("token", "")):
            return TokenResponse(200, {})
        return _error(400, "invalid_token", "Token expired or revoked")

    def authorize(self, params: Mapping[str, str]) -> _Redirect | _ErrorPage:
        """Answer ``GET /authorize``: consent at once and redirect, or show an error page."""
        self.on_request()
        client_id = params.get("client_id", "")
        redirect_uri = params.get("redirect_uri", "")
        with self._lock:
            client = self._clients.get(client_id)
            if client is None:
                return _ErrorPage(400, "invalid_client", "The OAuth client was not found.")
            if not redirect_uri:
                return _ErrorPage(
                    400, "invalid_request", "Missing required parameter: redirect_uri"
                )
            if client.redirect_uris is not None and redirect_uri not in client.redirect_uris:
                return _ErrorPage(400, "redirect_uri_mismatch", "Bad redirect_uri.")
        state = params.get("state")
        if params.get("response_type") != "code":
            return _ErrorPage(400, "unsupported_response_type", "Only response_type=code.")
        scope = params.get("scope", "")
        if not scope:
            return _ErrorPage(400, "invalid_request", "Missing required parameter: scope")
        challenge = params.get("code_challenge") or None
        method = params.get("code_challenge_method") or ("plain" if challenge else "")
        if challenge and method not in ("S256", "plain"):
            return _ErrorPage(400, "invalid_request", "Invalid code_challenge_method.")
        if self.consent_error:
            return _Redirect(_with_query(redirect_uri, error=self.consent_error, state=state))
        email = self._consenting_user(params.get("authuser", ""), params.get("login_hint", ""))
        if email is None:
            return _ErrorPage(400, "access_denied", "The sandbox has no user to consent.")
        code = "4/0" + secrets.token_urlsafe(40)
        with self._lock:
            self._codes[code] = _AuthCode(
                client_id=client_id,
                redirect_uri=redirect_uri,
                email=email,
                scope=scope,
                challenge=challenge,
                challenge_method=method,
                expires_at=self.now() + AUTH_CODE_LIFETIME,
            )
        return _Redirect(_with_query(redirect_uri, code=code, state=state, scope=scope))

    # -- grants -------------------------------------------------------------------------------

    def _authenticate_client(
        self, form: Mapping[str, str], basic_auth: tuple[str, str] | None
    ) -> str | None:
        client_id, secret = basic_auth or (form.get("client_id", ""), form.get("client_secret", ""))
        client = self._clients.get(client_id)
        if client is None or not hmac.compare_digest(
            client.secret.encode("utf-8"), secret.encode("utf-8")
        ):
            return None
        return client_id

    def _refresh_grant(
        self, form: Mapping[str, str], basic_auth: tuple[str, str] | None
    ) -> TokenResponse:
        with self._lock:
            client_id = self._authenticate_client(form, basic_auth)
            if client_id is None:
                return _error(401, "invalid_client", "Unauthorized")
            token = form.get("refresh_token", "")
            entry = self._refresh.get(token)
            if entry is None:
                return _error(400, "invalid_grant", INVALID_GRANT_REVOKED)
            if entry.client_id != client_id:
                return _error(401, "unauthorized_client", "Unauthorized")
            if self.users.canonical_user(entry.email) is None:
                return _error(400, "invalid_grant", "Account has been deleted")
            body: dict[str, Any] = {}
            if self.rotate_refresh_tokens:
                del self._refresh[token]
                token = "1//0" + secrets.token_urlsafe(48)
                self._refresh[token] = entry
                body["refresh_token"] = token
            access = self.issue_access_token(
                entry.email, ACCESS_TOKEN_LIFETIME, scope=entry.scope, refresh_token=token
            )
        body.update(
            access_token=access,
            expires_in=ACCESS_TOKEN_LIFETIME,
            scope=entry.scope,
            token_type="Bearer",
        )
        return TokenResponse(200, body)

    def _code_grant(
        self, form: Mapping[str, str], basic_auth: tuple[str, str] | None
    ) -> TokenResponse:
        with self._lock:
            client_id = self._authenticate_client(form, basic_auth)
            if client_id is None:
                return _error(401, "invalid_client", "Unauthorized")
            code = self._codes.pop(form.get("code", ""), None)  # single use
            if code is None or code.expires_at <= self.now():
                return _error(400, "invalid_grant", "Malformed auth code.")
            if code.client_id != client_id:
                return _error(400, "invalid_grant", "Bad Request")
            if code.redirect_uri != form.get("redirect_uri", ""):
                return _error(400, "redirect_uri_mismatch", "Bad Request")
            if code.challenge is not None:
                verifier = form.get("code_verifier", "")
                if not verifier:
                    return _error(400, "invalid_grant", "Missing code verifier.")
                expected = _pkce_s256(verifier) if code.challenge_method == "S256" else verifier
                if not hmac.compare_digest(expected.encode(), code.challenge.encode()):
                    return _error(400, "invalid_grant", "Invalid code verifier.")
            scope = _granted_scope(code.scope)
            refresh = self.issue_refresh_token(code.email, client_id, scope)
            access = self.issue_access_token(
                code.email, ACCESS_TOKEN_LIFETIME, scope=scope, refresh_token=refresh
            )
            secret = self._clients[client_id].secret
        body = {
            "access_token": access,
            "expires_in": ACCESS_TOKEN_LIFETIME,
            "refresh_token": refresh,
            "scope": scope,
            "token_type": "Bearer",
        }
        if _scope_has(scope, "openid"):
            body["id_token"] = make_id_token(
                code.email, client_id, secret, with_email=_scope_has(scope, "email"), now=self.now()
            )
        return TokenResponse(200, body)

    def _jwt_grant(self, form: Mapping[str, str]) -> TokenResponse:
        try:
            header_b64, payload_b64, signature_b64 = form.get("assertion", "").split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(payload_b64))
            signature = _b64url_decode(signature_b64)
        except (ValueError, binascii.Error):
            return _error(400, "invalid_grant", "Invalid JWT: unable to parse.")
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return _error(400, "invalid_grant", "Invalid JWT: unable to parse.")
        if header.get("alg") != "RS256":
            return _error(400, "invalid_grant", "Invalid JWT Signature.")
        with self._lock:
            account = self._service_accounts.get(str(claims.get("iss", "")).lower())
        if account is None:
            return _error(400, "invalid_grant", "Invalid grant: account not found")
        try:
            account.public_key.verify(
                signature,
                f"{header_b64}.{payload_b64}".encode("ascii"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return _error(400, "invalid_grant", "Invalid JWT Signature.")
        audiences = GOOGLE_TOKEN_AUDIENCES | ({self.token_uri} if self.token_uri else set())
        if claims.get("aud") not in audiences:
            return _error(
                400,
                "invalid_grant",
                "Invalid JWT: Failed audience check. The right audience is " + self.token_uri,
            )
        now = time.time()
        try:
            iat, exp = float(claims["iat"]), float(claims["exp"])
        except (KeyError, TypeError, ValueError):
            iat = exp = 0.0
        if not (iat - JWT_LEEWAY <= now < exp + JWT_LEEWAY and 0 < exp - iat <= JWT_MAX_LIFETIME):
            return _error(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                "timeframe. Check your iat and exp values in the JWT claim.",
            )
        scope = str(claims.get("scope", ""))
        subject = str(claims.get("sub", ""))
        user = self.users.canonical_user(subject) if subject else None
        if user is None or MAIL_SCOPE not in scope.split():
            return _error(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client "
                "not authorized for any of the scopes requested.",
            )
        access = self.issue_access_token(user, ACCESS_TOKEN_LIFETIME, scope=scope)
        return TokenResponse(
            200,
            {"access_token": access, "expires_in": ACCESS_TOKEN_LIFETIME, "token_type": "Bearer"},
        )

    # -- helpers ------------------------------------------------------------------------------

    def _require_user(self, email: str) -> str:
        user = self.users.canonical_user(email)
        if user is None:
            raise ValueError(f"no sandbox user {email!r}; add_user() first")
        return user

    def _consenting_user(self, authuser: str, login_hint: str) -> str | None:
        for candidate in (authuser, self.consent_user, login_hint):
            if candidate:
                user = self.users.canonical_user(candidate)
                if user is not None:
                    return user
        return self.users.default_consent_user()


def _with_query(url: str, **params: str | None) -> str:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    separator = "&" if urllib.parse.urlsplit(url).query else "?"
    return url + separator + query


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    authority: OAuthAuthority


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "ESF"
    sys_version = ""

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path not in ("/token", "/revoke"):
            self._send_json(404, {"error": "not_found"})
            return
        form = self._read_form()
        if path == "/token":
            response = self.server.authority.token_request(form, self._basic_auth())
        else:
            response = self.server.authority.revoke_request(form)
        self._send_json(response.status, response.body)

    def do_GET(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        if split.path != "/authorize":
            self._send_json(404 if split.path != "/token" else 405, {"error": "not_found"})
            return
        params = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        answer = self.server.authority.authorize(params)
        if isinstance(answer, _Redirect):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", answer.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        page = (
            f"<!doctype html><title>Error {answer.status}: {answer.error}</title>"
            f"<h1>Error {answer.status}: {answer.error}</h1><p>{answer.description}</p>"
            f"<p>Request details: error={answer.error}</p>"
        ).encode()
        self.send_response(answer.status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def _read_form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if self.headers.get_content_type() == "application/json":
            try:
                data = json.loads(raw or b"{}")
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        return dict(urllib.parse.parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))

    def _basic_auth(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, _, secret = decoded.partition(":")
        return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body, indent=2).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-cache, no-store, max-age=0, must-revalidate")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("token endpoint %s: " + format, self.address_string(), *args)


class TokenServer:
    """Serves an ``OAuthAuthority`` over HTTP in a background thread."""

    def __init__(self, authority: OAuthAuthority, host: str = "127.0.0.1", port: int = 0) -> None:
        self.authority = authority
        self._address = (host, port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._httpd is None:
            raise RuntimeError("the token server is not running")
        host, port = self._httpd.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        """Bind and start serving."""
        if self._httpd is not None:
            raise RuntimeError("the token server is already running")
        server_class = _HTTPServer6 if ":" in self._address[0] else _HTTPServer
        httpd = server_class(self._address, _Handler)
        httpd.authority = self.authority
        self._httpd = httpd
        self.authority.token_uri = self.base_url + "/token"
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="gmail-sandbox-oauth",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port. Safe to call twice."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
