"""Encryption of secrets at rest (Fernet), and the model field that applies it.

Keys come from ``GMAIL_SMTP["ENCRYPTION_KEYS"]``, newest first: the first key encrypts, every
key decrypts, so rotating means putting the new key first and running
``manage.py gmail_smtp rotate-keys``. A key is either a Fernet key
(``Fernet.generate_key()``) or any long passphrase, which is stretched with HKDF. When the
setting is unset, a key is derived from ``SECRET_KEY`` (a system check warns about this in
production: changing SECRET_KEY would make the stored secrets unreadable).
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.db import models

from .conf import get_setting
from .exceptions import EncryptionKeyError

PREFIX = "gmsenc1:"


def _as_fernet_key(key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    try:
        if len(base64.urlsafe_b64decode(raw)) == 32:
            return raw
    except (binascii.Error, ValueError):
        pass
    if len(raw) < 16:
        raise EncryptionKeyError(
            'A key in GMAIL_SMTP["ENCRYPTION_KEYS"] is too short. Use a Fernet key '
            "(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key()"
            ".decode())') or a passphrase of at least 16 characters."
        )
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"django-gmail-smtp", info=b"secrets"
    ).derive(raw)
    return base64.urlsafe_b64encode(derived)


def configured_keys() -> list[str | bytes]:
    """The raw keys in use, newest first (derived from SECRET_KEY when none are set)."""
    keys = get_setting("ENCRYPTION_KEYS")
    if keys is None:
        return [settings.SECRET_KEY]
    if isinstance(keys, (str, bytes)):
        keys = [keys]
    keys = [k for k in keys if k]
    if not keys:
        raise EncryptionKeyError(
            'GMAIL_SMTP["ENCRYPTION_KEYS"] is empty. Give at least one key, or remove the '
            "setting to derive one from SECRET_KEY."
        )
    return list(keys)


@lru_cache(maxsize=8)
def _fernet_for(keys: tuple[str | bytes, ...]) -> MultiFernet:
    return MultiFernet([Fernet(_as_fernet_key(k)) for k in keys])


def fernet() -> MultiFernet:
    """The MultiFernet built from the configured keys (cached per key set)."""
    return _fernet_for(tuple(configured_keys()))


def encrypt(value: str) -> str:
    """Encrypt ``value`` with the newest key; the result is prefixed so it can be recognised."""
    return PREFIX + fernet().encrypt(value.encode("utf-8")).decode("ascii")


def decrypt(token: str) -> str:
    """Decrypt a value made by :func:`encrypt`; raise :class:`EncryptionKeyError` if no key fits."""
    if not token.startswith(PREFIX):
        raise EncryptionKeyError("The stored value is not an encrypted secret.")
    try:
        return fernet().decrypt(token[len(PREFIX) :].encode("ascii")).decode("utf-8")
    except InvalidToken:
        raise EncryptionKeyError(
            "A stored secret cannot be decrypted with any key in "
            'GMAIL_SMTP["ENCRYPTION_KEYS"] (or SECRET_KEY, when that setting is unset). '
            "If a key was rotated, put the old key back after the new one; otherwise enter "
            "the secret again in the admin."
        ) from None


def is_current(token: str) -> bool:
    """True when ``token`` is encrypted with the newest key (no rotation needed)."""
    if not token.startswith(PREFIX):
        return False
    newest = Fernet(_as_fernet_key(configured_keys()[0]))
    try:
        newest.decrypt(token[len(PREFIX) :].encode("ascii"))
    except InvalidToken:
        return False
    return True


class UnreadableSecret(str):
    """A stored secret that no configured key can decrypt.

    It reads as an empty string, so pages still load; using it raises a clear error (see
    :mod:`django_gmail_smtp.credentials`), and saving the row keeps the original ciphertext.
    """

    ciphertext: str

    def __new__(cls, ciphertext: str) -> UnreadableSecret:
        obj = super().__new__(cls, "")
        obj.ciphertext = ciphertext
        return obj

    def __repr__(self) -> str:
        return "<UnreadableSecret>"


class EncryptedTextField(models.TextField):
    """A text field stored encrypted; Python code sees plain text.

    ``dumpdata`` writes the ciphertext (``value_to_string``) and ``loaddata`` accepts it back,
    so a database dump never holds a secret in the clear.
    """

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        return self._decrypt(value)

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(PREFIX):
            return self._decrypt(value)
        return value

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if isinstance(value, UnreadableSecret):
            return value.ciphertext
        if value in (None, ""):
            return value
        return encrypt(value)

    def value_to_string(self, obj: models.Model) -> str:
        value = self.value_from_object(obj)
        if isinstance(value, UnreadableSecret):
            return value.ciphertext
        if value in (None, ""):
            return ""
        return self.get_prep_value(value)

    @staticmethod
    def _decrypt(value: Any) -> Any:
        if not value or not isinstance(value, str):
            return value
        try:
            return decrypt(value)
        except EncryptionKeyError:
            return UnreadableSecret(value)
