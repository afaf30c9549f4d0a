"""DKIM private keys, read from the files signers write.

RSA keys (1024 to 4096 bits, RFC 8301 §3.2) are PEM, PKCS#1
(``BEGIN RSA PRIVATE KEY``, as ``opendkim-genkey`` writes) or PKCS#8
(``BEGIN PRIVATE KEY``).  Ed25519 keys (RFC 8463) are PEM PKCS#8 or the base64
of the 32-byte seed (as dkimpy's ``dknewkey`` writes; 64 octets, seed and
public key, are read too).  OpenDKIM's KeyTable may also hold the key itself
instead of a path: PEM text or base64 DER (see :mod:`smtp_tracker.dkim.tables`).

The private-key operation is OpenSSL's, through :mod:`cryptography`; private
key material is never logged nor put into an error message.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA256

__all__ = ["MAX_RSA_BITS", "MIN_RSA_BITS", "DkimKey", "DkimKeyError", "load_key", "parse_key"]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

#: RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits; verifiers
#: need not handle more than 4096.
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096


class DkimKeyError(ValueError):
    """A key that cannot be used; the message names no key material."""


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key of the KeyTable.

    :ivar domain: the ``d=`` it signs for (lower case).
    :ivar selector: the ``s=`` (lower case).
    :ivar algorithm: ``"rsa-sha256"`` or ``"ed25519-sha256"``.
    :ivar bits: the RSA modulus size, or 256 for Ed25519.
    :ivar source: where it was read (``FILE`` or ``TABLE:LINE`` for an inline key).
    """

    domain: str
    selector: str
    algorithm: Algorithm
    bits: int
    source: str
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)

    @property
    def key_type(self) -> str:
        """The ``k=`` of the DNS record (RFC 6376 §3.6.1, RFC 8463 §4): ``rsa`` or ``ed25519``."""
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    def dns_record(self) -> bytes:
        """The TXT record that publishes the public half (RFC 6376 §3.6.1).

        :returns: ``v=DKIM1; k=...; p=...`` as ASCII octets.
        """
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            der = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:  # RFC 8463 §4: the raw 32-octet public key
            der = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return b"v=DKIM1; k=" + self.key_type.encode() + b"; p=" + base64.b64encode(der)

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign the SHA-256 ``digest`` of the header hash (RFC 6376 §3.7, RFC 8463 §3).

        RSASSA-PKCS1-v1_5 over the prehashed digest for RSA; Ed25519 signs the
        32-octet digest itself (RFC 8463 §3).

        :returns: the signature octets (``b=`` before base64).
        """
        key = self.private_key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(digest, padding.PKCS1v15(), Prehashed(SHA256()))
        return key.sign(digest)


def _from_pem_or_der(data: bytes) -> object:
    if b"-----BEGIN" in data:
        return serialization.load_pem_private_key(data, password=None)
    raw = base64.b64decode(b"".join(data.split()), validate=True)
    if len(raw) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    if len(raw) == 64:  # seed and public key, as NaCl keeps them
        key = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if public != raw[32:]:
            raise ValueError("the 64-octet Ed25519 key's public half does not match its seed")
        return key
    return serialization.load_der_private_key(raw, password=None)


def parse_key(data: bytes, *, domain: str, selector: str, source: str) -> DkimKey:
    """Read one private key from the octets of a key file (or an inline KeyTable key).

    :param source: where it came from, for :attr:`DkimKey.source` and errors.
    :raises DkimKeyError: when it is none of the forms above, encrypted, of another
        algorithm, or an RSA key outside 1024-4096 bits.
    """
    try:
        key = _from_pem_or_der(data.strip())
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise DkimKeyError("the private key is encrypted (a signer's key file is not)") from None
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise DkimKeyError(
            "not a private key (expected PEM PKCS#1/PKCS#8, or the base64 of an Ed25519 seed)"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise DkimKeyError(
                f"an RSA key of {key.key_size} bits (DKIM uses {MIN_RSA_BITS} to "
                f"{MAX_RSA_BITS}, RFC 8301 §3.2)"
            )
        return DkimKey(domain, selector, "rsa-sha256", key.key_size, source, key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return DkimKey(domain, selector, "ed25519-sha256", 256, source, key)
    raise DkimKeyError(
        f"a {type(key).__name__.removeprefix('_')} key (DKIM signs with RSA or Ed25519)"
    )


def load_key(
    path: Path, *, domain: str, selector: str, warnings: list[str] | None = None
) -> DkimKey:
    """Read the key file at ``path``.

    :param warnings: receives a line when the file is readable by others (group read
        is how the signer's group shares it with smtp-tracker).
    :raises DkimKeyError: when the file cannot be read or holds no usable key
        (the message names the file, never its content).
    """
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"{path}: cannot read the key file ({exc.strerror})") from None
    if warnings is not None and info.st_mode & stat.S_IRWXO:
        warnings.append(f"{path}: the private key is readable by others; run: chmod o-rwx {path}")
    try:
        return parse_key(data, domain=domain, selector=selector, source=os.fspath(path))
    except DkimKeyError as exc:
        raise DkimKeyError(f"{path}: {exc}") from None
