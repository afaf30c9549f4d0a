"""``serve --no-pixel`` and ``smtp-tracker pixel`` as two processes sharing one data directory.

Messages are relayed by one process while 500 opens are fired at the other over
verified HTTPS; afterwards ``smtp-tracker messages --json`` shows every message
and every open, and SQLite's integrity check passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib

from smtp_tracker.config import PASSWORD_ENV
from tests.support.process import launch
from tests.support.serve import launch_serve

PIXEL = re.compile(rb"https://localhost:\d+/o/([A-Za-z0-9_-]{23})\.gif")
HTML = (
    "From: a@example.org\r\nTo: {rcpt}\r\nSubject: n{n}\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>message {n}</p></body></html>\r\n"
)


async def test_relay_and_pixel_processes_share_the_data_directory(
    upstream: Any,
    ca_pem_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    tls = [
        "--tls-cert",
        str(cert_pem_path),
        "--tls-key",
        str(key_pem_path),
        "--hostname",
        "localhost",
    ]
    pixel = await launch(
        "pixel",
        "--pixel-listen",
        "127.0.0.1:0",
        # 25 opens per token from one client, all counted: no rate limit here
        # (the limits have their own tests, tests/web/test_limits.py)
        "--max-events-per-token-client-per-min",
        "0",
        "--data-dir",
        str(data_dir),
        *tls,
        env=dict(os.environ, **{PASSWORD_ENV: upstream.password}),
        ready="listening for HTTPS (pixel)",
    )
    pixel_port = pixel.port
    relay = await launch_serve(
        upstream,
        ca_pem_path,
        data_dir,
        "--tracking",
        "--pixel-base-url",
        f"https://localhost:{pixel_port}",
        *tls,
    )
    smtp_port = relay.port
    try:

        async def send(n: int) -> None:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=smtp_port, start_tls=False, timeout=30
            ) as smtp:
                rcpt = f"r{n}@example.net"
                await smtp.sendmail("a@example.org", [rcpt], HTML.format(rcpt=rcpt, n=n))

        await asyncio.gather(*(send(n) for n in range(20)))
        await upstream.wait_for_transactions(20, timeout_s=30)
        tokens = [PIXEL.findall(t.data)[0].decode() for t in upstream.transactions]

        async def open_pixel(session: aiohttp.ClientSession, i: int) -> None:
            url = f"https://localhost:{pixel_port}/o/{tokens[i % len(tokens)]}.gif"
            async with session.get(url, ssl=client_ssl_context) as response:
                assert response.status == 200 and len(await response.read()) == 43

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
            # 500 opens at once, while 30 more messages are relayed by the other process
            await asyncio.gather(
                *(open_pixel(session, i) for i in range(500)), *(send(n) for n in range(20, 50))
            )
        await upstream.wait_for_transactions(50, timeout_s=30)
    finally:
        for running in (relay, pixel):
            running.process.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(r.process.wait(), timeout=30) for r in (relay, pixel)]
        for running in (relay, pixel):
            await running.finish()
    assert codes == [0, 0]  # both drained and flushed their queues on SIGTERM

    listing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtp_tracker",
        "messages",
        "--json",
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await listing.communicate()
    messages = json.loads(out)
    assert len(messages) == 50
    assert all(m["tracked"] for m in messages)
    opens = {m["tracking_id"]: len(m["opens"]) for m in messages}
    assert sum(opens.values()) == 500
    assert all(opens[t] == 25 for t in tokens)
    with contextlib.closing(sqlite3.connect(data_dir / "tracker.sqlite3")) as database:
        assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
