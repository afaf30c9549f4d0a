"""Self-signed TLS certificates for the pixel endpoint, and loading a server context.

A self-signed certificate is for trying smtp-tracker out: mail clients load
the pixel from the URL in the message, and will not do so over a certificate
they do not trust, so production needs a certificate from a public CA (or a
TLS-terminating proxy in front).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smtp_tracker.errors import StartupError

__all__ = ["load_server_context", "write_self_signed"]

_BACKDATE = dt.timedelta(minutes=5)  # tolerate clocks a little behind ours


def write_self_signed(
    cert_path: Path, key_path: Path, *, hostnames: Sequence[str], days: int = 365
) -> None:
    """Write a self-signed EC P-256 server certificate and its key, PEM encoded.

    The subject CN is the first name; every name goes into the
    subjectAltName (RFC 5280 §4.2.1.6) as an ``iPAddress`` when it parses as
    an IPv4/IPv6 address, else as a ``dNSName``.  The key file is created
    mode 0600 (PKCS#8, unencrypted), the certificate 0644; both are replaced
    if present.  Blocking: run it from a worker thread in async code.

    :param hostnames: at least one DNS name or IP address.
    :param days: validity from now, in days (>= 1).
    :raises ValueError: when *hostnames* is empty or *days* < 1.
    :raises StartupError: when a file cannot be written.
    """
    names = [name.strip() for name in hostnames if name.strip()]
    if not names:
        raise ValueError("a certificate needs at least one host name")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
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
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(Path(key_path), key_pem, 0o600)
    _write(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write *data* to *path* through a temporary file (created with *mode*) and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:  # write() of a file object writes it all
            os.fchmod(fd, mode)
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StartupError(f"cannot write {path}: {exc.strerror}") from exc


def load_server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or later) with *cert_file* and *key_file*.

    :param cert_file: PEM certificate chain, leaf first.
    :param key_file: PEM private key of the leaf, unencrypted.
    :raises StartupError: (one line) when a file cannot be read, is not PEM of
        the right kind, the key is encrypted, or the key does not match the
        certificate.
    """
    # Each file on its own first, so that the message names the one at fault.
    for what, path, marker in (
        ("certificate", cert_file, "BEGIN CERTIFICATE"),
        ("key", key_file, "PRIVATE KEY"),
    ):
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise StartupError(f"cannot read TLS {what} {path}: {exc.strerror}") from exc
        if f"{marker}-----".encode() not in pem:
            raise StartupError(f"TLS {what} {path} is not valid PEM (no {marker} block)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # A password callback, so that OpenSSL never prompts on the terminal
        # (which would hang an interactive start) for an encrypted key.
        context.load_cert_chain(cert_file, key_file, password=_refuse_password)
    except _EncryptedKey as exc:
        raise StartupError(
            f"TLS key {key_file} is encrypted; give an unencrypted PEM key (mode 0600)"
        ) from exc
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise StartupError(
                    f"TLS key {key_file} does not match the certificate {cert_file}"
                ) from exc
            raise StartupError(
                f"TLS certificate {cert_file} or key {key_file} is not valid PEM"
                f" ({exc.reason or 'unreadable'})"
            ) from exc
        which = exc.filename or f"{cert_file} or {key_file}"
        raise StartupError(f"cannot read TLS file {which}: {exc.strerror}") from exc
    return context


class _EncryptedKey(Exception):
    """Raised by :func:`_refuse_password`: the key file needs a pass phrase."""


def _refuse_password() -> bytes:
    raise _EncryptedKey
