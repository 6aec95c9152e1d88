"""Signed tokens in newsletter links: unsubscribe (no expiry) and confirm (double opt-in).

Both are signed with Django's signing (HMAC with ``SECRET_KEY``, each with its own salt), so
nothing is stored per token. A token signed under an older key keeps working while that key is
in ``SECRET_KEY_FALLBACKS``: rotating ``SECRET_KEY`` does not break the unsubscribe links in mail
already delivered (Gmail asks for them to work long after sending).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.core import signing

from ..models import normalize_address

if TYPE_CHECKING:
    from .models import Campaign, Subscriber

UNSUBSCRIBE_SALT = "django_gmail_smtp.newsletters.unsubscribe"
CONFIRM_SALT = "django_gmail_smtp.newsletters.confirm"
#: the third element of a test send's unsubscribe token
TEST_MARK = "test"
#: how long a double opt-in confirmation link works
CONFIRM_MAX_AGE = timedelta(days=7)


def unsubscribe_token(campaign: Campaign | int, email: str, *, test: bool = False) -> str:
    """A URL-safe token naming this campaign and address; it never expires. ``test``: the
    token of a test send or a preview, which unsubscribes nobody (its page says so)."""
    campaign_id = campaign if isinstance(campaign, int) else campaign.pk
    value: list[Any] = [campaign_id, normalize_address(email)]
    if test:
        value.append(TEST_MARK)
    # Signer, not signing.dumps: no timestamp (no expiry), so the token stays short.
    return signing.Signer(salt=UNSUBSCRIBE_SALT).sign_object(value, compress=True)


def read_unsubscribe_token(token: str) -> tuple[int, str] | None:
    """``(campaign_id, email)`` from a token made by :func:`unsubscribe_token`; ``None`` for
    anything else (tampered, truncated, another salt's, garbage, a test send's)."""
    value = _load(signing.Signer(salt=UNSUBSCRIBE_SALT), token)
    return _pair(value)


def read_test_unsubscribe_token(token: str) -> tuple[int, str] | None:
    """``(campaign_id, email)`` from a test send's or preview's token; ``None`` otherwise."""
    value = _load(signing.Signer(salt=UNSUBSCRIBE_SALT), token)
    if isinstance(value, list) and len(value) == 3 and value[2] == TEST_MARK:
        return _pair(value[:2])
    return None


def confirm_token(subscriber: Subscriber) -> str:
    """A URL-safe token confirming this subscription (valid :data:`CONFIRM_MAX_AGE`)."""
    return signing.TimestampSigner(salt=CONFIRM_SALT).sign_object(
        [subscriber.pk, normalize_address(subscriber.email)], compress=True
    )


def read_confirm_token(
    token: str, max_age: timedelta | float = CONFIRM_MAX_AGE
) -> tuple[int, str] | None:
    """``(subscriber_id, email)`` from a token made by :func:`confirm_token` at most
    ``max_age`` ago (a timedelta or seconds); ``None`` when expired or not valid."""
    value = _load(signing.TimestampSigner(salt=CONFIRM_SALT), token, max_age=max_age)
    return _pair(value)


def _load(signer: signing.Signer, token: Any, **kwargs: Any) -> Any:
    if not isinstance(token, str) or not token or len(token) > 1000:
        return None
    try:
        return signer.unsign_object(token, **kwargs)
    except (signing.BadSignature, ValueError, TypeError):
        # BadSignature covers expiry too; a valid signature over a non-JSON value (not one of
        # ours) raises ValueError.
        return None


def _pair(value: Any) -> tuple[int, str] | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], str)
    ):
        return value[0], value[1]
    return None
