"""Relay and pixel endpoint as two processes sharing one data directory.

A child process writes message records while this process takes 500
simultaneous pixel fetches over real HTTPS; afterwards every message and
every open is in the database and it passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path

import aiohttp

from smtp_tracker.store import SqliteDatabase, SqliteStore
from smtp_tracker.web import TRANSPARENT_GIF, WRITER_KEY, make_pixel_app, start_site

from .web_helpers import token, wait_until

OPENS = 500
KNOWN = 50  # messages written before the opens start
MIN_MORE = 300  # messages the child writes while (or after) the opens run


def counts(data_dir: Path) -> tuple[int, int]:
    with SqliteDatabase.open(data_dir, create=False) as db:
        conn = db._conn
        messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        opens = conn.execute("SELECT count(*) FROM opens").fetchone()[0]
        return int(messages), int(opens)


async def test_two_processes_share_the_data_directory(
    tmp_path: Path, server_ssl_context: ssl.SSLContext, client: aiohttp.ClientSession
) -> None:
    data_dir = tmp_path / "shared"
    stop_file = tmp_path / "stop"
    script = Path(__file__).with_name("share_writer_process.py")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(data_dir),
        str(stop_file),
        str(KNOWN),
        str(MIN_MORE),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        # open our store while the child opens and migrates the same directory
        async with await SqliteStore.open(data_dir) as store:
            assert child.stdout is not None
            ready = await asyncio.wait_for(child.stdout.readline(), 60)
            assert ready == b"ready\n"
            app = make_pixel_app(store=store)
            runner, port = await start_site(
                app, host="127.0.0.1", port=0, ssl_context=server_ssl_context
            )
            writer = app[WRITER_KEY]

            async def fetch(n: int) -> None:
                url = f"https://localhost:{port}/o/{token(n % KNOWN)}.gif"
                async with client.get(url, headers={"User-Agent": f"ua-{n}"}) as r:
                    assert r.status == 200
                    assert await r.read() == TRANSPARENT_GIF

            try:
                async with asyncio.timeout(60):
                    await asyncio.gather(*(fetch(n) for n in range(OPENS)))
            finally:
                await runner.cleanup()  # stops serving, flushes the event writer
            stop_file.touch()
            out, _ = await asyncio.wait_for(child.communicate(), 60)
            assert child.returncode == 0
            total = int(out.decode().split()[-1])
            assert total >= KNOWN + MIN_MORE
            print(f"the other process wrote {total} messages")

            async def complete() -> bool:
                return await asyncio.to_thread(counts, data_dir) == (total, OPENS)

            await wait_until(complete, timeout_s=30, what=f"{total} messages and {OPENS} opens")
            assert (writer.recorded, writer.dropped, writer.failed) == (OPENS, 0, 0)

            assert await store.integrity_check() == "ok"
            listed = await store.list_messages()
            assert len(listed) == total
            by_token = {m.record.tracking_id: m for m in listed}
            assert set(by_token) == {token(i) for i in range(total)}
            agents = sorted(o.user_agent or "" for m in listed for o in m.opens)
            assert agents == sorted(f"ua-{n}" for n in range(OPENS))
            for i in range(KNOWN):
                assert len(by_token[token(i)].opens) == OPENS // KNOWN
            assert {o.ip for m in listed for o in m.opens} == {"127.0.0.0/24"}
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
