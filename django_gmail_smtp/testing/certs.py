"""A throwaway certificate authority and server certificate for the Gmail sandbox.

The sandbox's TLS is real: clients verify the server certificate against ``ca.pem`` exactly as
they would verify smtp.gmail.com against the system trust store. The certificate is valid for
``localhost``, ``127.0.0.1`` and ``::1``.

The CA's private key is never written anywhere: once the server certificate is signed it is
discarded, so the CA cannot be used to mint any other certificate.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import logging
import os
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateFiles", "client_ssl_context", "ensure_certificates", "server_ssl_context"]

logger = logging.getLogger(__name__)

CA_FILENAME = "ca.pem"
CERT_FILENAME = "server.pem"
KEY_FILENAME = "server-key.pem"

_DNS_NAMES = ("localhost",)
_IP_ADDRESSES = ("127.0.0.1", "::1")
_CA_LIFETIME = datetime.timedelta(days=3650)
_CERT_LIFETIME = datetime.timedelta(days=825)
# A certificate found on disk is replaced when it has less than this left to live.
_RENEW_BEFORE = datetime.timedelta(days=30)

_lock = threading.Lock()
_cache: dict[str, CertificateFiles] = {}
_temp_dir: str | None = None


@dataclass(frozen=True)
class CertificateFiles:
    """Paths of the sandbox's PEM files."""

    directory: Path
    ca_file: Path
    """The CA certificate; give it to clients (``GMAIL_SMTP["CA_FILE"]``)."""
    cert_file: Path
    """The server certificate followed by the CA certificate."""
    key_file: Path
    """The server's private key (mode 0600)."""


def ensure_certificates(directory: str | os.PathLike[str] | None = None) -> CertificateFiles:
    """Return the sandbox certificates in ``directory``, creating them if needed.

    Without ``directory`` the files go to a temporary directory removed when the process exits.
    With one, valid files already there are reused, so a site's ``CA_FILE`` setting can point at
    a stable path across sandbox restarts. Results are cached per process and directory.
    """
    with _lock:
        if directory is None:
            target = Path(_process_temp_dir())
        else:
            target = Path(directory).expanduser().resolve()
        key = str(target)
        cached = _cache.get(key)
        if cached is not None and _files_exist(cached):
            return cached
        files = CertificateFiles(
            directory=target,
            ca_file=target / CA_FILENAME,
            cert_file=target / CERT_FILENAME,
            key_file=target / KEY_FILENAME,
        )
        if not _reusable(files):
            _generate(files)
        _cache[key] = files
        return files


def server_ssl_context(files: CertificateFiles) -> ssl.SSLContext:
    """Return a server-side TLS context that presents the sandbox certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert_file), str(files.key_file))
    return context


def client_ssl_context(files: CertificateFiles | str | os.PathLike[str]) -> ssl.SSLContext:
    """Return a verifying client TLS context that trusts the sandbox CA (and nothing else)."""
    ca_file = files.ca_file if isinstance(files, CertificateFiles) else Path(files)
    return ssl.create_default_context(cafile=str(ca_file))


def _process_temp_dir() -> str:
    global _temp_dir
    if _temp_dir is None or not os.path.isdir(_temp_dir):
        _temp_dir = tempfile.mkdtemp(prefix="gmail-sandbox-")
        atexit.register(shutil.rmtree, _temp_dir, True)
    return _temp_dir


def _files_exist(files: CertificateFiles) -> bool:
    return files.ca_file.is_file() and files.cert_file.is_file() and files.key_file.is_file()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _not_valid_after(cert: x509.Certificate) -> datetime.datetime:
    try:
        return cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        return cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _reusable(files: CertificateFiles) -> bool:
    """Whether the files on disk form a valid, matching, long-enough-lived set."""
    if not _files_exist(files):
        return False
    try:
        ca_cert = x509.load_pem_x509_certificate(files.ca_file.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
        key = serialization.load_pem_private_key(files.key_file.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        if cert.public_key() != key.public_key():
            return False
        if _not_valid_after(cert) - _now() < _RENEW_BEFORE:
            return False
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = set(sans.get_values_for_type(x509.DNSName))
        ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    except Exception:  # any unreadable or inconsistent file: start over
        logger.info("Regenerating sandbox certificates in %s", files.directory, exc_info=True)
        return False
    return set(_DNS_NAMES) <= dns and set(_IP_ADDRESSES) <= ips


def _generate(files: CertificateFiles) -> None:
    now = _now() - datetime.timedelta(minutes=5)  # tolerate small clock differences
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "django-gmail-smtp sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, "django-gmail-smtp sandbox CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in _DNS_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in _IP_ADDRESSES]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "django-gmail-smtp sandbox"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files.directory.mkdir(parents=True, exist_ok=True)
    _write(files.key_file, key_pem, mode=0o600)
    _write(files.cert_file, cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    _write(files.ca_file, ca_pem)
    logger.info("Wrote sandbox CA and server certificate to %s", files.directory)


def _write(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Write atomically, so a concurrent reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if hasattr(os, "fchmod"):  # not on Windows
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
