"""What a serving process writes stays visible to other processes after a CLI read.

SQLite only: the defect is SQLite's WAL files and POSIX locks on ``tracker.sqlite3``;
a PostgreSQL store has no file in the data directory to lose.

The defect: ``serve``'s store health check read the database header with a
plain ``open()``/``close()`` of ``tracker.sqlite3``.  Closing any descriptor
of a file drops every POSIX lock the process holds on it (fcntl semantics),
so ``serve`` no longer held its WAL-mode shared lock.  The next process to
open and close the store read-write (``smtp-tracker messages``) then took the
exclusive lock, believed itself the last connection, checkpointed and
*deleted* the ``-wal`` and ``-shm`` files; ``serve`` went on writing into the
unlinked log, which no other process could see until ``serve`` stopped.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib

from smtp_tracker.store import SqliteStore
from tests.store.store_helpers import make_record, token
from tests.support.process import run_cli
from tests.support.serve import launch_serve, tracking_args
from tests.support.waiting import wait_until

PIXEL = re.compile(rb"https://localhost:\d+/o/([A-Za-z0-9_-]{23})\.gif")
PIXEL_PORT = re.compile(r"listening for HTTPS \(pixel\) on 127\.0\.0\.1:(\d+)")
HTML = (
    "From: a@example.org\r\nTo: r@example.net\r\nSubject: n{n}\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>message {n}</p></body></html>\r\n"
)


def messages_json(data_dir: Path) -> list[dict[str, Any]]:
    """``smtp-tracker messages --json`` in a process of its own."""
    done = run_cli("messages", "--json", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    items: list[dict[str, Any]] = json.loads(done.stdout)
    return items


async def test_a_cli_read_does_not_hide_later_writes_of_a_running_serve(
    upstream: Any,
    ca_pem_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    flags = tracking_args(cert_pem_path, key_pem_path, pixel_base_url="https://localhost:1")
    serve = await launch_serve(upstream, ca_pem_path, data_dir, *flags)
    try:
        pixel_port = next(int(m.group(1)) for line in serve.log if (m := PIXEL_PORT.search(line)))
        wal_on_disk = (data_dir / "tracker.sqlite3-wal").exists

        async def relay(n: int) -> str:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=serve.port, start_tls=False, timeout=30
            ) as smtp:
                await smtp.sendmail("a@example.org", ["r@example.net"], HTML.format(n=n))
            await upstream.wait_for_transactions(n + 1, timeout_s=30)
            found = PIXEL.search(upstream.transactions[n].data)
            assert found is not None
            return found.group(1).decode()

        first = await relay(0)
        assert wal_on_disk()
        # the read that used to take the log away from the running process
        assert [m["tracking_id"] for m in messages_json(data_dir)] == [first]

        second = await relay(1)
        url = f"https://localhost:{pixel_port}/o/{second}.gif"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, ssl=client_ssl_context) as response,
        ):
            assert response.status == 200

        def second_seen_opened() -> bool:
            found = {m["tracking_id"]: m for m in messages_json(data_dir)}
            return second in found and len(found[second]["opens"]) == 1

        await wait_until(
            second_seen_opened,
            timeout_s=20,
            message="the message relayed after a CLI read, and its open, stay invisible",
        )
        # the write-ahead log the server writes is still the one on disk
        assert (data_dir / "tracker.sqlite3-wal").exists()
    finally:
        serve.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(serve.process.wait(), timeout=30)
        await serve.finish()


async def test_the_health_check_keeps_the_stores_locks(tmp_path: Path) -> None:
    """The same, without sockets: a health check, a CLI read, a write, another read."""
    data_dir = tmp_path / "data"
    async with await SqliteStore.open(data_dir) as store:
        await store.record_message(make_record(1))
        assert await store.check_health() is None
        assert [m["tracking_id"] for m in messages_json(data_dir)] == [token(1)]
        await store.record_message(make_record(2))
        assert [m["tracking_id"] for m in messages_json(data_dir)] == [token(2), token(1)]
        assert (data_dir / "tracker.sqlite3-wal").exists()
