"""Several hosts on one PostgreSQL store: two ``serve`` and two ``pixel`` processes at once.

Messages are relayed through both relays while every message's pixel is
fetched once from each pixel process as soon as its record is there, all
concurrently; afterwards every
message record is there once, every open twice (once per endpoint), each
message's counters equal its rows, and the daily rollup equals counting the
rows.  5,000 messages and 10,000 opens (about 35 s on two shared cores);
``SMTP_TRACKER_PG_MESSAGES`` sets another count.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from smtp_tracker.config import PASSWORD_ENV
from tests.support.postgres import pg_cluster, pg_dsn
from tests.support.process import Running, launch
from tests.support.serve import launch_serve

__all__ = ["pg_cluster", "pg_dsn"]

psycopg = pytest.importorskip("psycopg")

MESSAGES = int(os.environ.get("SMTP_TRACKER_PG_MESSAGES", "5000"))
PIXEL = re.compile(rb"https?://localhost:\d+/o/([A-Za-z0-9_-]{23})\.gif")
HTML = (
    "From: a@example.org\r\nTo: {rcpt}\r\nSubject: n{n}\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>message {n}</p></body></html>\r\n"
)
SESSIONS_PER_RELAY = 8


async def launch_pixel(dsn: str, data_dir: Path, env: dict[str, str]) -> Running:
    return await launch(
        "pixel",
        "--pixel-listen",
        "127.0.0.1:0",
        "--pixel-plain-http",
        "--max-events-per-token-client-per-min",
        "0",
        "--max-events-per-token-per-min",
        "0",
        "--data-dir",
        str(data_dir),
        "--store",
        dsn,
        env=env,
        ready="listening for HTTP (pixel)",
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_two_relays_and_two_pixel_endpoints_on_one_store(
    upstream: Any,
    ca_pem_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    tmp_path: Path,
    pg_dsn: str,
) -> None:
    env = dict(os.environ, **{PASSWORD_ENV: upstream.password})
    tls = ["--tls-cert", str(cert_pem_path), "--tls-key", str(key_pem_path)]
    pixels = [await launch_pixel(pg_dsn, tmp_path / f"pixel{k}", env) for k in range(2)]
    relays = [
        await launch_serve(
            upstream,
            ca_pem_path,
            tmp_path / f"relay{k}",
            "--tracking",
            "--pixel-base-url",
            f"http://localhost:{pixels[0].port}",
            "--store",
            pg_dsn,
            *tls,
            "--hostname",
            "localhost",
        )
        for k in range(2)
    ]
    fetched: list[int] = []
    try:

        async def relay_part(relay: Running, numbers: range) -> None:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=60
            ) as smtp:
                for n in numbers:
                    rcpt = f"r{n}@example.net"
                    await smtp.sendmail("a@example.org", [rcpt], HTML.format(rcpt=rcpt, n=n))

        async def open_all(session: aiohttp.ClientSession, pixel: Running) -> None:
            """Fetch each pixel once, as soon as its message is recorded (an open of a
            message not yet recorded is an unknown token, ignored by design)."""
            seen: set[str] = set()
            async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
                while len(seen) < MESSAGES:
                    cursor = await conn.execute("SELECT tracking_id FROM messages")
                    new = {str(row[0]) for row in await cursor.fetchall()} - seen
                    if not new:
                        await asyncio.sleep(0.05)  # polling the database, not a synchronisation
                        continue
                    for tracking_id in sorted(new):
                        url = f"http://127.0.0.1:{pixel.port}/o/{tracking_id}.gif"
                        async with session.get(url) as response:
                            assert response.status == 200 and len(await response.read()) == 43
                        fetched.append(pixel.port)
                    seen |= new

        step = SESSIONS_PER_RELAY * 2
        sends = [relay_part(relays[k % 2], range(k, MESSAGES, step)) for k in range(step)]
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*sends, *(open_all(session, pixel) for pixel in pixels))
    finally:
        for running in (*relays, *pixels):
            running.process.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(r.process.wait(), timeout=60) for r in (*relays, *pixels)]
        for running in (*relays, *pixels):
            await running.finish()
    assert codes == [0, 0, 0, 0]  # drained: the pixel queues flushed into the store
    assert len(fetched) == 2 * MESSAGES
    await upstream.wait_for_transactions(MESSAGES, timeout_s=60)
    assert all(PIXEL.search(t.data) for t in upstream.transactions)

    with psycopg.connect(pg_dsn) as conn:

        def one(sql: str) -> Any:
            return conn.execute(sql).fetchone()

        assert one("SELECT count(*), count(DISTINCT tracking_id) FROM messages") == (
            MESSAGES,
            MESSAGES,
        )
        assert one("SELECT count(*) FROM opens") == (2 * MESSAGES,)
        # every message opened exactly twice, and its counters are its rows
        assert one(
            "SELECT count(*) FROM messages m WHERE open_count <> 2"
            " OR open_count <> (SELECT count(*) FROM opens o WHERE o.tracking_id = m.tracking_id)"
        ) == (0,)
        # the rollup equals counting the rows
        rollup = one(
            "SELECT sum(relayed), sum(tracked), sum(opens), sum(opened_any),"
            " sum(opens_human + opens_privacy_proxy + opens_mail_proxy + opens_scanner"
            " + opens_unknown) FROM daily_stats"
        )
        counted = one(
            "SELECT count(*), sum(tracked), (SELECT count(*) FROM opens),"
            " count(*) FILTER (WHERE open_count > 0), (SELECT count(*) FROM opens)"
            " FROM messages"
        )
        assert [int(v) for v in rollup] == [int(v) for v in counted]
        opened = one(
            "SELECT (SELECT sum(opened) FROM daily_stats),"
            " (SELECT count(*) FROM messages WHERE counted_open_count > 0)"
        )
        assert int(opened[0]) == int(opened[1])
