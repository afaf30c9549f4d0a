"""A private OpenDKIM for the tests: a signing milter on loopback, and a verifier.

:func:`make_keys` writes a session's keys in the forms signers write them
(RSA 2048 PEM PKCS#1 as ``opendkim-genkey``; Ed25519 as the base64 seed of
dkimpy's ``dknewkey``), the KeyTable and a ``refile:`` SigningTable with a
wildcard, and the DNS data (``TestDNSData``) that lets OpenDKIM verify without DNS.

:class:`OpenDkim` runs ``opendkim -f`` (foreground) with its own configuration
file, as the ``opendkim`` user, listening on ``inet:PORT@127.0.0.1``, so that a
private Postfix can use it as ``smtpd_milters``/``non_smtpd_milters``: a signer,
or (``verify=True``) the receiving side's verifier, which adds an
``Authentication-Results: verifier.test; dkim=...`` field to each message.
:func:`opendkim_verify` runs ``opendkim -t`` (its test mode, on a message file)
instead, where no receiving Postfix is at hand.  Its file reader disagrees with
the milter (and with dkimpy and RFC 6376 §3.4.1) on ``simple`` header
canonicalization of a field whose first line is empty (``Subject:`` CRLF, then
the value on a continuation line): such a signature fails there; so the tests
use ``-t`` with ``relaxed`` header canonicalization only.

Debian's OpenDKIM 2.11.0~beta2 verifies ``ed25519-sha256`` but does not sign
with an Ed25519 key (``EVP_PKEY_get1_RSA() failed`` for a PEM key,
``d2i_PrivateKey_bio() failed`` for base64): the tests sign their Ed25519
messages with dkimpy as the sender's signer, before Postfix.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pwd
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.support.postfix import free_port
from tests.support.waiting import wait_until

__all__ = [
    "DOMAIN",
    "DkimKeys",
    "OpenDkim",
    "make_keys",
    "missing_reason",
    "opendkim_verify",
]

DOMAIN = "example.test"
USER = "opendkim"


def missing_reason() -> str | None:
    """Why OpenDKIM cannot run here, or ``None`` when it can."""
    if shutil.which("opendkim") is None and not Path("/usr/sbin/opendkim").exists():
        return "opendkim is not installed (apt-get install opendkim opendkim-tools)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"there is no {USER!r} user (is the opendkim package installed?)"
    if os.geteuid() != 0:
        return "the private OpenDKIM runs as the opendkim user: the tests need root"
    return None


def _binary() -> str:
    return shutil.which("opendkim") or "/usr/sbin/opendkim"


@dataclass(frozen=True)
class DkimKeys:
    """A session's keys, tables and DNS data, all under :attr:`root`.

    :ivar key_table: ``rsa`` → ``example.test:rsa``, ``ed`` → ``example.test:ed``.
    :ivar signing_table: ``refile:`` with ``*@example.test rsa``: OpenDKIM signs
        mail from any address of the domain, and nothing else.
    :ivar dns_data: OpenDKIM's ``TestDNSData`` (``name TXT`` a line).
    :ivar records: the same records for dkimpy's ``dnsfunc``.
    """

    root: Path
    key_table: Path
    signing_table: Path
    dns_data: Path
    rsa_pem: bytes
    ed25519_seed: bytes
    records: dict[str, bytes]

    @property
    def signing_table_spec(self) -> str:
        return f"refile:{self.signing_table}"

    def dnsfunc(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the session's records, never DNS."""
        text = name.decode() if isinstance(name, bytes) else name
        return self.records.get(text.rstrip(".").lower())


def make_keys(root: Path) -> DkimKeys:
    """Write RSA 2048 and Ed25519 keys, KeyTable, SigningTable and DNS data under ``root``.

    The key files belong to the opendkim user, mode 0600 (OpenDKIM's
    ``RequireSafeKeys``); root, running the tests and smtp-tracker, reads them too.
    """
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    owner = pwd.getpwnam(USER)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    seed = base64.b64encode(
        ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    keys = {"rsa.private": rsa_pem, "ed.private": seed + b"\n"}
    for name, data in keys.items():
        path = root / name
        path.write_bytes(data)
        path.chmod(0o600)
        os.chown(path, owner.pw_uid, owner.pw_gid)
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_public = ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    records = {
        f"rsa._domainkey.{DOMAIN}": b"v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_public),
        f"ed._domainkey.{DOMAIN}": b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_public),
    }
    key_table = root / "KeyTable"
    key_table.write_text(
        f"rsa {DOMAIN}:rsa:{root / 'rsa.private'}\ned {DOMAIN}:ed:{root / 'ed.private'}\n"
    )
    signing_table = root / "SigningTable"
    signing_table.write_text(f"*@{DOMAIN} rsa\n")
    dns_data = root / "dns"
    dns_data.write_text("".join(f"{n} {v.decode()}\n" for n, v in records.items()))
    return DkimKeys(root, key_table, signing_table, dns_data, rsa_pem, seed, records)


class OpenDkim:
    """``opendkim -f`` signing on ``127.0.0.1:port``; :meth:`start` it, :meth:`stop` it.

    :ivar milter: the Postfix milter address, ``inet:127.0.0.1:PORT``.
    """

    def __init__(self, process: asyncio.subprocess.Process, port: int, directory: Path) -> None:
        self.process = process
        self.port = port
        self.directory = directory
        self.milter = f"inet:127.0.0.1:{port}"

    @classmethod
    async def start(
        cls, keys: DkimKeys, *, canonicalization: str = "relaxed/simple", verify: bool = False
    ) -> OpenDkim:
        """Start a signer with ``keys``' tables, ``OversignHeaders From``; or, with
        ``verify``, a verifier that adds ``Authentication-Results: verifier.test; ...``
        to every message (keys from the session's DNS data).

        :raises AssertionError: it did not listen within 15 s.
        """
        directory = Path(tempfile.mkdtemp(prefix="opendkim-", dir="/tmp"))
        directory.chmod(0o755)
        port = free_port()
        conf = directory / "opendkim.conf"
        common = f"Syslog no\nBackground no\nSocket inet:{port}@127.0.0.1\nUserID {USER}\n"
        if verify:
            conf.write_text(
                common + "Mode v\n"
                "AlwaysAddARHeader yes\n"
                "AuthservID verifier.test\n"
                f"TestDNSData file:{keys.dns_data}\n"
                # not 127.0.0.1 (the default): mail from internal hosts is not verified
                "InternalHosts 192.0.2.1\n"
            )
        else:
            conf.write_text(
                common + "Mode s\n"
                f"Canonicalization {canonicalization}\n"
                f"KeyTable file:{keys.key_table}\n"
                f"SigningTable {keys.signing_table_spec}\n"
                "OversignHeaders From\n"
                "InternalHosts 127.0.0.1, localhost\n"
                # the keys live under /tmp, whose sticky, world-writable mode OpenDKIM's
                # path check refuses; the key files themselves are 0600, the opendkim user's
                "RequireSafeKeys no\n"
            )
        output = (directory / "output").open("wb")
        with output:
            process = await asyncio.create_subprocess_exec(
                _binary(),
                "-f",
                "-x",
                str(conf),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
            )
        instance = cls(process, port, directory)

        def listening() -> bool:
            if process.returncode is not None:
                said = (directory / "output").read_text(errors="replace")[-2000:]
                raise AssertionError(f"opendkim exited with {process.returncode}: {said}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        try:
            await wait_until(listening, timeout_s=15, message="opendkim is not listening")
        except BaseException:
            await instance.stop()
            raise
        return instance

    async def stop(self) -> None:
        """Terminate it and remove its directory."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


async def opendkim_verify(message: bytes, keys: DkimKeys, directory: Path) -> str:
    """OpenDKIM's verdict on ``message``: the ``Authentication-Results`` value it writes.

    Runs ``opendkim -t FILE`` (test mode) with ``Mode v`` and the session's DNS data.

    :returns: e.g. ``"verifier.test; dkim=pass (2048-bit key) header.d=..."``, unfolded.
    :raises AssertionError: it wrote no Authentication-Results.
    """
    conf = directory / "verify.conf"
    if not conf.exists():
        conf.write_text(
            "Syslog no\nBackground no\nMode v\nAlwaysAddARHeader yes\n"
            f"AuthservID verifier.test\nTestDNSData file:{keys.dns_data}\n"
        )
    fd, name = tempfile.mkstemp(suffix=".eml", dir=directory)
    with os.fdopen(fd, "wb") as handle:
        handle.write(message)
    try:
        process = await asyncio.create_subprocess_exec(
            _binary(),
            "-x",
            str(conf),
            "-vv",
            "-t",
            name,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        os.unlink(name)
    text = output.decode(errors="replace")
    marker = "hname='Authentication-Results' hvalue='"
    start = text.find(marker)
    if start < 0:
        raise AssertionError(f"opendkim -t wrote no Authentication-Results:\n{text[-2000:]}")
    value = text[start + len(marker) : text.index("'", start + len(marker))]
    return " ".join(value.split())
