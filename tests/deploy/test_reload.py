"""SIGHUP reloads what can change without a restart, and cuts nothing in flight.

* Under load, in a real ``serve`` process: 500 messages relayed over ten
  STARTTLS connections while the certificate is replaced and the process
  reloads three times; every message is accepted on the connection it began
  on, the upstream has all 500, each reload serves the new certificate to the
  next connection; a bad certificate on a fourth reload is refused with one
  log line and the last good one is still served.
* In the test's loop: a reload applies new domain lists to the next message,
  and a reload with an unreadable footer changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib
import trustme

from smtp_tracker.app import Application
from smtp_tracker.config import build_config
from tests.support.relay import RelayFactory, tracking_over_tls
from tests.support.serve import launch_serve
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

CLIENTS = 10
MESSAGES_PER_CLIENT = 50
TOTAL = CLIENTS * MESSAGES_PER_CLIENT
#: after how many delivered messages each good certificate goes in
RELOAD_AT = (50, 150, 250)


def install(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    """Replace the certificate and key files the way an admin's tool would (rename)."""
    for blob, path in ((leaf.cert_chain_pems[0], cert), (leaf.private_key_pem, key)):
        fresh = path.with_suffix(".new")
        blob.write_to_path(str(fresh))
        os.chmod(fresh, 0o600)
        os.replace(fresh, path)


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


async def starttls_client(port: int, context: ssl.SSLContext) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, tls_context=context, timeout=30
    )
    await smtp.connect()
    await smtp.ehlo(hostname="postfix.test")
    await smtp.starttls(server_hostname="localhost")
    await smtp.ehlo(hostname="postfix.test")
    return smtp


async def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a new STARTTLS connection is given, DER."""
    smtp = await starttls_client(port, context)
    try:
        ssl_object: Any = smtp.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        peer = ssl_object.getpeercert(binary_form=True)
        assert isinstance(peer, bytes)
        return peer
    finally:
        await smtp.quit()


def message(client: int, number: int) -> bytes:
    return (
        f"From: alice@example.org\r\nTo: bob@example.net\r\n"
        f"Subject: reload {client}-{number}\r\n"
        f"Message-ID: <reload-{client}-{number}@example.org>\r\n\r\nbody\r\n"
    ).encode()


async def client_load(client: int, port: int, context: ssl.SSLContext) -> list[str]:
    """One connection, STARTTLS once, MESSAGES_PER_CLIENT transactions on it."""
    smtp = await starttls_client(port, context)
    replies = []
    for number in range(MESSAGES_PER_CLIENT):
        errors, reply = await smtp.sendmail(
            "alice@example.org", ["bob@example.net"], message(client, number)
        )
        assert errors == {}
        replies.append(reply)
    await smtp.quit()
    return replies


def count(log: list[str], text: str) -> int:
    return sum(text in line for line in log)


async def test_certificate_reloads_under_load_cut_nothing(
    upstream: UpstreamServer,
    ca: trustme.CA,
    ca_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    leaves = [ca.issue_cert("localhost", "127.0.0.1") for _ in range(4)]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    install(leaves[0], cert, key)
    running = await launch_serve(
        upstream,
        ca_pem_path,
        tmp_path / "data",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--max-connections",
        str(CLIENTS + 5),
    )
    try:
        port = running.port
        assert await served_certificate(port, client_ssl_context) == der(leaves[0])
        load = asyncio.gather(*(client_load(c, port, client_ssl_context) for c in range(CLIENTS)))
        signalled_at = []
        for reloads, (at, leaf) in enumerate(zip(RELOAD_AT, leaves[1:], strict=True), 1):
            await wait_until(
                lambda at=at: len(upstream.transactions) >= at,  # type: ignore[misc]
                timeout_s=60,
                message=f"fewer than {at} messages relayed",
            )
            install(leaf, cert, key)
            signalled_at.append(len(upstream.transactions))
            running.process.send_signal(signal.SIGHUP)
            await wait_until(
                lambda n=reloads: count(running.log, "reloaded:") == n,  # type: ignore[misc]
                timeout_s=30,
                message=f"reload {reloads} not logged: {running.log[-3:]}",
            )
            assert await served_certificate(port, client_ssl_context) == der(leaf)

        cert.write_text(
            "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n"
        )
        running.process.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: count(running.log, "reload failed") == 1,
            timeout_s=30,
            message=f"the bad reload was not logged: {running.log[-3:]}",
        )
        assert await served_certificate(port, client_ssl_context) == der(leaves[3])

        replies = await asyncio.wait_for(load, timeout=90)
        assert [len(r) for r in replies] == [MESSAGES_PER_CLIENT] * CLIENTS
        assert all(reply.startswith("2.0.0 Ok: queued as ") for r in replies for reply in r)
        # every reload came while mail was still flowing
        assert all(n < TOTAL for n in signalled_at), signalled_at
        delivered = await upstream.wait_for_transactions(TOTAL)
        ids = {t.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for t in delivered}
        assert len(delivered) == len(ids) == TOTAL
        (failed,) = [line for line in running.log if "reload failed" in line]
        assert str(cert) in failed and "\n" not in failed.rstrip("\n")
        assert count(running.log, "aborted") == 0
        assert running.process.returncode is None
    finally:
        await running.finish()


async def test_reload_applies_domain_lists_and_a_bad_footer_changes_nothing(
    relay_factory: RelayFactory,
    upstream: UpstreamServer,
    cert_pem_path: Path,
    key_pem_path: Path,
    tmp_path: Path,
) -> None:
    footer = tmp_path / "footer.html"
    footer.write_text("<p>we count opens</p>")
    app = await relay_factory(
        **tracking_over_tls(cert_pem_path, key_pem_path), disclosure_footer_file=str(footer)
    )
    html = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: s\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n<html><body>hi</body></html>\r\n"
    )

    async def relay_one() -> bytes:
        host, port = app.smtp_address
        before = len(upstream.transactions)
        await aiosmtplib.send(
            html,
            sender="alice@example.org",
            recipients=["bob@example.net"],
            hostname=host,
            port=port,
            start_tls=False,
        )
        delivered = await upstream.wait_for_transactions(before + 1)
        return delivered[-1].data

    assert b"we count opens" in await relay_one()
    tracker = app.tracker
    assert tracker is not None

    def reloaded(**changes: Any) -> Any:
        values = {**_values_of(app), **changes}
        return build_config(
            values, {}, environ={"SMTP_TRACKER_UPSTREAM_PASSWORD": upstream.password}
        )

    assert await app.reload(reloaded(exclude_sender_domains="example.org"))
    assert app.config.exclude_sender_domains == ("example.org",)
    assert b"we count opens" not in await relay_one()
    assert tracker.not_tracked_reasons["sender-domain-excluded"] == 1

    footer.unlink()
    assert not await app.reload(reloaded(exclude_sender_domains=""))
    assert app.config.exclude_sender_domains == ("example.org",)  # nothing changed
    await relay_one()
    assert tracker.not_tracked_reasons["sender-domain-excluded"] == 2


def _values_of(app: Application) -> dict[str, Any]:
    """``app``'s configuration as keys for build_config (the ones the relay fixture set)."""
    config = app.config
    return {
        "upstream": str(config.upstream),
        "upstream_ca_file": str(config.upstream_ca_file),
        "upstream_user": config.upstream_user,
        "listen": str(config.listen),
        "hostname": config.hostname,
        "data_dir": str(config.data_dir),
        "tracking": True,
        "pixel": True,
        "pixel_listen": str(config.pixel_listen),
        "reports": False,
        "tls_cert": str(config.tls_cert),
        "tls_key": str(config.tls_key),
        "disclosure_footer_file": str(config.disclosure_footer_file),
    }
