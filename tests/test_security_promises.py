"""The security review checklist (docs/security.md): the promises no other test proves.

* a real ``serve --log-level debug`` writes no password, no AUTH blob, no
  message body or Subject and no pixel User-Agent into its log;
* only the pixel endpoint listens beyond loopback by default;
* ``check-config`` warns, on standard error, about a secret file others can read;
* ``serve`` warns when it listens beyond loopback;
* the upstream's certificate must name the upstream (host name checked, not
  only the chain);
* an unexpected error is ``451 4.3.0`` without its text, and nothing is relayed.

The other lines of the checklist point at the tests that prove them.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import trustme

from smtp_tracker.config import HostPort, build_config
from smtp_tracker.smtp.handler import Prepared, RelayHandler
from smtp_tracker.smtp.server import RelaySMTP
from smtp_tracker.smtp.session import Transaction
from smtp_tracker.smtp.upstream import UpstreamSettings
from tests.support import certificates
from tests.support.relay import relay_factory
from tests.support.serve import launch_serve, tracking_args
from tests.support.upstream import UpstreamOptions, UpstreamServer

__all__ = ["relay_factory"]  # the fixture, used by the tests below

BODY_MARKER = "BODY-MARKER-b7c41e"
SUBJECT_MARKER = "SUBJECT-MARKER-3d90a2"
UA_MARKER = "UA-MARKER-55e0f1"


async def test_serve_at_debug_level_logs_no_secret_body_subject_or_user_agent(
    upstream: Any,
    ca_pem_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    relay = await launch_serve(
        upstream,
        ca_pem_path,
        tmp_path / "data",
        *tracking_args(cert_pem_path, key_pem_path, pixel_base_url="https://localhost:1"),
        "--log-level",
        "debug",
        "--log-format",
        "json",
    )
    try:
        [pixel_port] = [
            int(m.group(1))
            for line in relay.log
            if (m := re.search(r"listening for HTTPS \(pixel\) on 127\.0\.0\.1:(\d+)", line))
        ]
        html = (
            f"From: a@example.org\r\nTo: b@example.net\r\nSubject: {SUBJECT_MARKER}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            f"<html><body><p>{BODY_MARKER}</p></body></html>\r\n"
        )
        plain = f"Subject: {SUBJECT_MARKER}\r\n\r\n{BODY_MARKER}\r\n"
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=30
        ) as smtp:
            await smtp.sendmail("a@example.org", ["b@example.net"], html)
            await smtp.sendmail("a@example.org", ["b@example.net"], plain)
        await upstream.wait_for_transactions(2, timeout_s=30)
        [token] = re.findall(rb"/o/([A-Za-z0-9_-]{23})\.gif", upstream.transactions[0].data)
        connector = aiohttp.TCPConnector(ssl=client_ssl_context)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(
                f"https://localhost:{pixel_port}/o/{token.decode()}.gif",
                headers={"User-Agent": UA_MARKER},
            ) as response,
        ):
            assert response.status == 200
    finally:
        relay.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(relay.process.wait(), 30)
        await relay.finish()
    assert code == 0
    log = "".join(relay.log)
    assert "relayed=2" in log  # the debug log was written, counters included
    assert any('"level": "debug"' in line for line in relay.log)
    auth_plain = base64.b64encode(f"\0{upstream.user}\0{upstream.password}".encode()).decode()
    secrets = [upstream.password, auth_plain, base64.b64encode(upstream.password.encode()).decode()]
    for needle in [*secrets, BODY_MARKER, SUBJECT_MARKER, UA_MARKER]:
        assert needle not in log, needle


def test_only_the_pixel_endpoint_listens_beyond_loopback_by_default() -> None:
    config = build_config({}, {}, environ={})
    assert config.listen == HostPort("127.0.0.1", 10025)
    assert config.reports_listen == HostPort("127.0.0.1", 8444)
    assert config.pixel_listen == HostPort("0.0.0.0", 8443)  # noqa: S104 - mail clients reach it
    assert config.trusted_proxies == ()  # X-Forwarded-For believed from nobody


def test_a_secret_file_others_can_read_is_warned_about(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    args = [
        sys.executable,
        "-m",
        "smtp_tracker",
        "check-config",
        "--upstream",
        "smtp.example.net:587",
    ]
    config = tmp_path / "smtp-tracker.toml"
    config.write_text(f'upstream_user = "u"\nupstream_password_file = "{secret}"\n')
    result = subprocess.run(
        [*args, "--config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: upstream_password_file: {secret} is readable by group or others" in (
        result.stderr
    )
    assert "hunter2" not in result.stdout + result.stderr
    secret.chmod(0o600)
    result = subprocess.run(
        [*args, "--config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and "warning" not in result.stderr


async def test_listening_beyond_loopback_is_warned_about(
    relay_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="smtp_tracker.main")
    await relay_factory(listen="0.0.0.0:0")  # clients still limited to loopback by default
    [warning] = [r for r in caplog.records if "beyond loopback" in r.getMessage()]
    assert "127.0.0.0/8" in warning.getMessage()


async def test_an_upstream_certificate_for_another_name_is_refused(
    relay_factory: Any, ca: trustme.CA, ca_pem_path: Path, server_ssl_context: ssl.SSLContext
) -> None:
    other = certificates.server_context(ca.issue_cert("mx.other.example"))
    impostor = UpstreamServer(
        options=UpstreamOptions(),
        tls_context=other,  # chains to the trusted CA, but names another host
        untrusted_tls_context=server_ssl_context,
        ca_file=ca_pem_path,
    )
    await impostor.start()
    try:
        relay = await relay_factory(upstream=impostor.address)
        host, port = relay.smtp_address
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
            await smtp.ehlo()
            code, message = await smtp.execute_command(b"MAIL", b"FROM:<a@example.org>")
        assert code == 451 and message.startswith("4.7.5 "), message
        assert not any(line.upper().startswith(("MAIL", "AUTH")) for line in impostor.transcript)
        assert impostor.transactions == []
    finally:
        await impostor.close()


class ExplodingPreparer:
    """A rewrite stage that breaks its contract (it must never raise)."""

    async def prepare(self, content: bytes, transaction: Transaction) -> Prepared:
        raise RuntimeError("SECRET-DETAIL /etc/smtp-tracker/upstream-password")


async def test_an_unexpected_error_is_451_4_3_0_without_its_text(
    upstream: Any, ca_pem_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    context = ssl.create_default_context(cafile=str(ca_pem_path))
    handler = RelayHandler(
        upstream=UpstreamSettings(
            host=upstream.host,
            port=upstream.port,
            tls="starttls",
            tls_context=context,
            helo_name="relay.test",
            user=upstream.user,
            password=upstream.password,
            connect_timeout_s=10,
            command_timeout_s=10,
            data_timeout_s=10,
        ),
        hostname="relay.test",
        preparer=ExplodingPreparer(),
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: RelaySMTP(
            handler,
            allowed_clients=[ipaddress.ip_network("127.0.0.0/8")],
            max_message_bytes=1_000_000,
            client_timeout_s=30,
            hostname="relay.test",
            tls_context=None,
            keep_transcript=False,
        ),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, timeout=20
        ) as smtp:
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await smtp.sendmail("a@example.org", ["b@example.net"], "Subject: x\r\n\r\nx\r\n")
        assert caught.value.code == 451
        assert caught.value.message == "4.3.0 internal error, try again later"
        assert upstream.transactions == []
        [logged] = [r for r in caplog.records if r.getMessage().endswith("unexpected error")]
        assert logged.levelno == logging.ERROR and logged.exc_info is not None  # for the admin
    finally:
        server.close()
        await server.wait_closed()
        await handler.drain()
