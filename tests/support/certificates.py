"""Test certificates made with trustme in the test session.

Two certificate authorities: the *trusted* one (clients in the tests load its
PEM) and an *untrusted* one, whose server certificate fails verification.
Both server certificates are issued for ``localhost``, ``127.0.0.1`` and ``::1``.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

__all__ = ["SERVER_NAMES", "CertificateFiles", "client_context", "server_context", "write_files"]

#: The names every test server certificate is valid for.
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertificateFiles:
    """PEM files of one CA and the server certificate it issued.

    :ivar ca: the CA certificate (what a client trusts).
    :ivar cert: the server certificate chain, leaf first.
    :ivar key: the server's private key, mode 0600.
    """

    ca: Path
    cert: Path
    key: Path


def write_files(ca: trustme.CA, cert: trustme.LeafCert, directory: Path) -> CertificateFiles:
    """Write ``ca``'s certificate, ``cert``'s chain and its key as PEM into ``directory``.

    The directory and the certificates are world-readable (Postfix daemons run
    unprivileged); the key is created 0600 and never exists with wider access.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    files = CertificateFiles(
        ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem"
    )
    ca.cert_pem.write_to_path(str(files.ca))
    files.ca.chmod(0o644)
    files.cert.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    files.cert.chmod(0o644)
    descriptor = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as key_file:
        key_file.write(cert.private_key_pem.bytes())
    files.key.chmod(0o600)
    return files


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    """A server-side context presenting ``cert``; no client certificates asked for."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client-side context trusting only ``ca``, hostname checking on."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    return context
