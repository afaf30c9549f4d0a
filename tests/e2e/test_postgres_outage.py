"""PostgreSQL stopped while mail flows and pixels are fetched (issue 14, faults).

A ``serve`` and a ``pixel`` process on a PostgreSQL cluster of the test's
own.  100 messages and their opens are recorded; the server is stopped; 300
messages are relayed and 100 pixels fetched while it is down; it is started
again and 100 more messages and 100 more opens follow.  (While it is down
the relay sends mail untracked: the consent registry, in the same database,
cannot be read.)  Every message reaches
the upstream (none lost), every pixel is served, the opens of the outage are
counted as failed by the pixel endpoint, each process says once that the
store is away and once that it is back, ``/healthz`` says ``degraded: store``
meanwhile, and records resume without a restart.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from smtp_tracker.config import PASSWORD_ENV
from tests.support import postgres
from tests.support.process import launch
from tests.support.serve import launch_serve

psycopg = pytest.importorskip("psycopg")

HTML = (
    "From: a@example.org\r\nTo: {rcpt}\r\nSubject: n{n}\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>message {n}</p></body></html>\r\n"
)
PIXEL = re.compile(rb"http://localhost:\d+/o/([A-Za-z0-9_-]{23})\.gif")


def _count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0])


async def _until(predicate: Any, *, timeout_s: float = 60.0) -> None:
    """Wait until *predicate()* (a blocking call) is true, checking it again and again."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)  # polling a condition, not a synchronisation


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_postgresql_stopped_while_mail_flows(
    upstream: Any,
    ca_pem_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    tmp_path: Path,
    own_pg_cluster: postgres.Cluster,
) -> None:
    dsn = own_pg_cluster.new_database()
    env = dict(os.environ, **{PASSWORD_ENV: upstream.password})
    pixel = await launch(
        "pixel",
        "--pixel-listen",
        "127.0.0.1:0",
        "--pixel-plain-http",
        "--max-events-per-token-client-per-min",
        "0",
        "--max-events-per-token-per-min",
        "0",
        "--data-dir",
        str(tmp_path / "pixel"),
        "--store",
        dsn,
        "--store-timeout-s",
        "1",
        env=env,
        ready="listening for HTTP (pixel)",
    )
    relay = await launch_serve(
        upstream,
        ca_pem_path,
        tmp_path / "relay",
        "--tracking",
        "--pixel-base-url",
        f"http://localhost:{pixel.port}",
        "--store",
        dsn,
        "--store-timeout-s",
        "1",
        "--tls-cert",
        str(cert_pem_path),
        "--tls-key",
        str(key_pem_path),
        "--hostname",
        "localhost",
    )
    sent = 0

    async def send(count: int) -> None:
        nonlocal sent
        numbers = range(sent, sent + count)
        sent += count
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=60
        ) as smtp:
            for n in numbers:
                rcpt = f"r{n}@example.net"
                response = await smtp.sendmail("a@example.org", [rcpt], HTML.format(rcpt=rcpt, n=n))
                assert all(code == 250 for code, _ in response[0].values()) or not response[0]
        await upstream.wait_for_transactions(sent, timeout_s=60)

    async def open_pixels(session: aiohttp.ClientSession, first: int, last: int) -> None:
        for transaction in list(upstream.transactions)[first:last]:
            found = PIXEL.findall(transaction.data)
            assert found, transaction.data[-600:]
            tracking_id = found[0].decode()
            url = f"http://127.0.0.1:{pixel.port}/o/{tracking_id}.gif"
            async with session.get(url) as response:
                assert response.status == 200 and len(await response.read()) == 43

    async def healthz(session: aiohttp.ClientSession) -> str:
        async with session.get(f"http://127.0.0.1:{pixel.port}/healthz") as response:
            return await response.text()

    try:
        async with aiohttp.ClientSession() as session:
            await send(100)
            await _until(lambda: _count(dsn, "SELECT count(*) FROM messages") == 100)
            await open_pixels(session, 0, 100)
            await _until(lambda: _count(dsn, "SELECT count(*) FROM opens") == 100)
            assert await healthz(session) == "ok"

            await asyncio.to_thread(own_pg_cluster.stop, "fast")
            await send(300)  # every one relayed: the upstream has them all
            await open_pixels(session, 0, 100)  # every GIF served
            deadline = time.monotonic() + 30  # the writer meets the outage in its own time
            while not (await healthz(session)).startswith("degraded"):
                assert time.monotonic() < deadline, "healthz never said degraded"
                await asyncio.sleep(0.1)  # polling a condition

            await asyncio.to_thread(own_pg_cluster.start)
            # the first calls after the restart may still fail (one try a second while
            # away): send, and open an old message's pixel, one at a time until recorded
            while await asyncio.to_thread(_count, dsn, "SELECT count(*) FROM messages") == 100:
                await send(1)
            while await asyncio.to_thread(_count, dsn, "SELECT count(*) FROM opens") == 100:
                await open_pixels(session, 0, 1)
            messages_before = _count(dsn, "SELECT count(*) FROM messages")
            opens_before = _count(dsn, "SELECT count(*) FROM opens")
            await send(100)  # now every one recorded, without a restart
            await _until(
                lambda: _count(dsn, "SELECT count(*) FROM messages") == messages_before + 100
            )
            await open_pixels(session, 0, 100)
            await _until(lambda: _count(dsn, "SELECT count(*) FROM opens") == opens_before + 100)
            assert await healthz(session) == "ok"
    finally:
        for running in (relay, pixel):
            running.process.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(r.process.wait(), timeout=60) for r in (relay, pixel)]
        for running in (relay, pixel):
            await running.finish()
    assert codes == [0, 0]
    assert len(upstream.transactions) == sent  # no message lost
    opens = _count(dsn, "SELECT count(*) FROM opens")
    for running in (relay, pixel):
        log = "".join(running.log)
        assert log.count("TRACKING STORE UNAVAILABLE") == 1, log
        assert log.count("tracking store back after an outage") == 1, log
    assert "not recorded in the store" not in "".join(relay.log)  # no line per message
    stopped = re.search(r"pixel endpoint stopped: EventWriter\((.*)\)", "".join(pixel.log))
    assert stopped is not None
    counters = dict(part.split("=") for part in stopped.group(1).split(", "))
    assert int(counters["recorded"]) == opens
    assert int(counters["offered"]) - opens == int(counters["failed"]) + int(counters["dropped"])
    assert int(counters["failed"]) >= 100  # the outage's opens, counted
