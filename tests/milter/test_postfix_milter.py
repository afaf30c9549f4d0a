"""``smtp-tracker milter`` called by a real Postfix (``smtpd_milters``), delivering upstream."""

from __future__ import annotations

import contextlib
import grp
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smtp_tracker.cli import main as cli_main
from tests.milter.support import (
    launch_milter,
    milter_main_cf,
    pixel_tokens,
    postfix_queue_id,
    send_to_postfix,
)
from tests.support.postfix import free_port, without_bounces
from tests.support.process import launch, run_cli
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.postfix, pytest.mark.upstream(auth_required=False)]

SENDER = "sender@example.org"
HTML = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: reader@example.net\r\n"
    b"Subject: milter test\r\n"
    b"Message-ID: <milter-test@example.org>\r\n"
    b"X-Track: yes\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<html><body><p>Hello</p></body></html>\r\n"
)
BROKEN_BASE64 = (
    b"From: sender@example.org\r\nTo: reader@example.net\r\nSubject: broken\r\n"
    b"X-Track: yes\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"PGh0bWw+PGJvZHk+eDwvYm9keT48L2h0bWw\r\n"  # truncated: undecodable (RFC 2045 §6.8)
)


def show(data_dir: Path, tracking_id: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli_main(["show", tracking_id, "--json", "--data-dir", str(data_dir)])
    assert status == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def header_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


async def test_tracked_message_gets_one_pixel_and_its_open_is_recorded_under_postfix_queue_id(
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
) -> None:
    milter = await launch_milter(
        tmp_path / "data",
        cert_pem_path,
        key_pem_path,
        "--disclosure-header",
        "this message is tracked",
    )
    try:
        postfix = await postfix_factory(upstream.port, **milter_main_cf(milter.milter_port))
        await send_to_postfix(postfix.smtpd_port, SENDER, ["reader@example.net"], HTML)
        [delivered] = without_bounces(await upstream.wait_for_transactions(1, timeout_s=60))
        data = delivered.data
        [tracking_id] = pixel_tokens(data)
        head = header_of(data)
        assert b"\r\nX-Track:" not in head
        assert head.count(b"X-Tracking-Notice: this message is tracked\r\n") == 1
        # the other fields are as sent, in order
        sent_fields = [line for line in header_of(HTML).splitlines() if b"X-Track" not in line]
        assert [line for line in head.splitlines() if line in sent_fields] == sent_fields
        pixel = re.compile(rb"<img[^>]*/o/" + tracking_id.encode() + rb"\.gif[^>]*>")
        assert pixel.sub(b"", body_of(data)) == body_of(HTML)  # nothing else changed
        queue_id = postfix_queue_id(data)

        url = f"https://localhost:{milter.pixel_port}/o/{tracking_id}.gif"
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                url, ssl=client_ssl_context, headers={"User-Agent": "milter-reader/1.0"}
            ) as response,
        ):
            assert response.status == 200
            assert len(await response.read()) == 43

        def opened() -> dict[str, Any] | None:
            shown = show(milter.data_dir, tracking_id)
            return shown if shown["opens"] else None

        shown = await wait_until(opened, timeout_s=30, message="the open was not recorded")
        assert shown["queue_id"] == queue_id
        assert shown["recipients"] == ["reader@example.net"]
        assert shown["sender"] == SENDER
        assert [o["user_agent"] for o in shown["opens"]] == ["milter-reader/1.0"]
    finally:
        status = await milter.terminate()
    assert status == 0
    assert "milter counters: messages=1, changed=1, unchanged=0" in milter.log


async def test_oversized_and_unrewritable_messages_pass_unchanged_and_are_counted(
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
) -> None:
    big = HTML.replace(b"<p>Hello</p>", (b"<p>" + b"x" * 70 + b"</p>\r\n") * 70)
    milter = await launch_milter(
        tmp_path / "data", cert_pem_path, key_pem_path, "--max-message-bytes", "4000"
    )
    try:
        postfix = await postfix_factory(upstream.port, **milter_main_cf(milter.milter_port))
        await send_to_postfix(postfix.smtpd_port, SENDER, ["big@example.net"], big)
        await send_to_postfix(postfix.smtpd_port, SENDER, ["broken@example.net"], BROKEN_BASE64)
        delivered = without_bounces(await upstream.wait_for_transactions(2, timeout_s=60))
        by_recipient = {t.rcpt_tos[0]: t.data for t in delivered}
        for recipient, sent in (("big@example.net", big), ("broken@example.net", BROKEN_BASE64)):
            data = by_recipient[recipient]
            assert body_of(data) == body_of(sent)
            assert b"\r\nX-Track: yes\r\n" in header_of(data)  # not even the control header
            assert pixel_tokens(data) == []
    finally:
        status = await milter.terminate()
    assert status == 0
    assert "milter counters: messages=2, changed=0, unchanged=2, oversized=1" in milter.log
    assert "rewrite_failed=1" in milter.log, milter.log


def test_milter_listen_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "milter",
            "--milter-listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
            "--no-pixel",
            "--no-reports",
        )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"smtp-tracker: error: milter_listen: cannot listen on 127.0.0.1:{port} "
        "(Address already in use); is another process using it?"
    ]


def test_milter_listen_not_bindable_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli(
        "milter",
        "--milter-listen",
        "192.0.2.1:8892",  # TEST-NET-1: not an address of this host
        "--data-dir",
        str(tmp_path / "data"),
        "--no-pixel",
        "--no-reports",
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "smtp-tracker: error: milter_listen: cannot listen on 192.0.2.1:8892 "
        "(Cannot assign requested address)"
    ]


async def test_unix_socket_mode_0660_serves_postfix_and_is_removed_at_exit(
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="milter-sock-", dir="/tmp"))
    directory.chmod(0o755)  # Postfix's smtpd runs as postfix and must reach the socket
    path = directory / "milter.sock"
    pixel_port = free_port()
    running = await launch(
        "milter",
        "--milter-listen",
        f"unix:{path}",
        "--data-dir",
        str(tmp_path / "data"),
        "--hostname",
        "localhost",
        "--tls-cert",
        str(cert_pem_path),
        "--tls-key",
        str(key_pem_path),
        "--pixel-listen",
        f"127.0.0.1:{pixel_port}",
        "--pixel-base-url",
        f"https://localhost:{pixel_port}",
        "--no-reports",
        env=dict(os.environ),
        ready="listening for HTTPS (pixel)",  # after the socket is bound
    )
    try:
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        os.chown(path, -1, grp.getgrnam("postfix").gr_gid)  # the admin gives Postfix the group
        postfix = await postfix_factory(
            upstream.port, smtpd_milters=f"unix:{path}", milter_default_action="tempfail"
        )
        await send_to_postfix(postfix.smtpd_port, SENDER, ["reader@example.net"], HTML)
        [delivered] = without_bounces(await upstream.wait_for_transactions(1, timeout_s=60))
        assert len(pixel_tokens(delivered.data)) == 1
    finally:
        running.process.send_signal(signal.SIGTERM)
        status = await running.process.wait()
        await running.finish()
    assert status == 0
    assert not path.exists()
    shutil.rmtree(directory, ignore_errors=True)


async def test_sighup_reloads_the_disclosure_without_a_restart(
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
) -> None:
    config = tmp_path / "smtp-tracker.toml"
    config.write_text('disclosure_header = "first notice"\n')
    milter = await launch_milter(
        tmp_path / "data", cert_pem_path, key_pem_path, "--config", str(config)
    )
    try:
        postfix = await postfix_factory(upstream.port, **milter_main_cf(milter.milter_port))
        await send_to_postfix(postfix.smtpd_port, SENDER, ["one@example.net"], HTML)
        await upstream.wait_for_transactions(1, timeout_s=60)
        config.write_text('disclosure_header = "second notice"\n')
        milter.running.process.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: "reloaded:" in milter.log, timeout_s=30, message="no reload logged"
        )
        await send_to_postfix(postfix.smtpd_port, SENDER, ["two@example.net"], HTML)
        delivered = without_bounces(await upstream.wait_for_transactions(2, timeout_s=60))
        notices = {t.rcpt_tos[0]: header_of(t.data) for t in delivered}
        assert b"X-Tracking-Notice: first notice\r\n" in notices["one@example.net"]
        assert b"X-Tracking-Notice: second notice\r\n" in notices["two@example.net"]
    finally:
        status = await milter.terminate()
    assert status == 0
