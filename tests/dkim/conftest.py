"""DKIM test keys, made once per session with ``cryptography``; the relay fixtures;
the OpenDKIM signer's keys and tables (``dkim_keys``)."""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.support.opendkim import DkimKeys, make_keys
from tests.support.opendkim import missing_reason as opendkim_missing
from tests.support.relay import relay_factory

__all__ = ["relay_factory"]

KeyFiles = Callable[..., Path]


def rsa_pem(key: rsa.RSAPrivateKey, *, pkcs8: bool = False) -> bytes:
    """The key in PEM, PKCS#1 (as ``opendkim-genkey`` writes) or PKCS#8."""
    form = (
        serialization.PrivateFormat.PKCS8
        if pkcs8
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def ed25519_seed(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The base64 of the 32-octet seed, as dkimpy's ``dknewkey`` writes it."""
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw) + b"\n"


def ed25519_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def key_table(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> Path:
    """A KeyTable with ``rsa`` (example.com:sel, PKCS#1) and ``ed`` (example.com:ed, seed)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "sel.private").write_bytes(rsa_pem(rsa_key))
    (keys / "ed.private").write_bytes(ed25519_seed(ed_key))
    for path in keys.iterdir():
        path.chmod(0o600)
    table = tmp_path / "KeyTable"
    table.write_text(
        "# keyname domain:selector:keyfile\n"
        f"rsa example.com:sel:{keys / 'sel.private'}\n"
        f"ed  example.com:ed:{keys / 'ed.private'}   # the Ed25519 one\n"
    )
    return table


@pytest.fixture(scope="session")
def dkim_keys() -> Iterator[DkimKeys]:
    """The session's signer keys and tables, under a /tmp directory OpenDKIM can read."""
    reason = opendkim_missing()
    if reason is not None:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="dkim-keys-", dir="/tmp"))
    try:
        yield make_keys(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
