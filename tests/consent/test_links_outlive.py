"""Links outlive records: pruned and forgotten messages' links keep redirecting, recording nothing.

A click on a link in an old message still in someone's mailbox must reach its
destination after ``retention_days`` or ``forget`` removed the message record;
nothing naming the person is recorded, and ``forget`` still removes every
row naming the address (a link whose destination holds it, too).
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from smtp_tracker.store import DB_FILENAME, LinkRecord, SqliteDatabase
from tests.consent.helpers import CLICK, PIXEL, rows, send
from tests.store.store_helpers import T0, make_record, token
from tests.support.relay import tracking_over_tls
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

NAMING = "https://news.example.com/profile?email=olga%40example.com"


async def click(url: str, context: ssl.SSLContext) -> tuple[int, str | None]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url, ssl=context, allow_redirects=False, headers={"User-Agent": "Clicker/1.0"}
        ) as response,
    ):
        return response.status, response.headers.get("Location")


async def test_prune_and_forget_keep_old_links_redirecting_without_recording(
    relay_factory: Any,
    upstream: UpstreamServer,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
) -> None:
    data_dir = tmp_path / "data"
    app = await relay_factory(**tracking_over_tls(cert_pem_path, key_pem_path), track_clicks=True)
    olga = await send(app, upstream, "to olga", ["olga@example.com"])
    olga_naming = await send(app, upstream, "olga profile", ["olga@example.com"], link=NAMING)
    pia = await send(app, upstream, "to pia", ["pia@example.com"])
    links = {}
    for name, delivered in (("olga", olga), ("naming", olga_naming), ("pia", pia)):
        found = CLICK.search(delivered.data)
        assert found is not None and PIXEL.search(delivered.data) is not None
        links[name] = found.group(0).decode()
    await wait_until(
        lambda: rows(data_dir, "SELECT count(*) FROM messages") == [(3,)],
        timeout_s=10,
        message="messages not recorded",
    )
    before = rows(data_dir, "SELECT sum(clicks) FROM daily_stats")

    with SqliteDatabase.open(data_dir) as database:
        forgotten = database.forget_recipient("OLGA@example.com")
        assert (forgotten.messages, forgotten.links) == (2, 1)  # the link naming her goes
        pruned = database.prune(datetime.now(UTC) + timedelta(seconds=1))  # pia's record
        assert (pruned.messages, pruned.links) == (1, 0)
    assert rows(data_dir, "SELECT count(*) FROM messages") == [(0,)]

    # old links still redirect to their destinations
    assert await click(links["olga"], client_ssl_context) == (
        302,
        "https://shop.example.com/offer?id=42",
    )
    assert await click(links["pia"], client_ssl_context) == (
        302,
        "https://shop.example.com/offer?id=42",
    )
    # the link whose destination named the forgotten address is gone with her
    assert (await click(links["naming"], client_ssl_context))[0] == 404
    await app.stop(grace_s=1.0)  # the event writer writes what is queued first
    # nothing recorded about whoever clicked
    assert rows(data_dir, "SELECT count(*) FROM clicks") == [(0,)]
    assert rows(data_dir, "SELECT sum(clicks) FROM daily_stats") == before
    octets = b"".join(p.read_bytes() for p in data_dir.glob(DB_FILENAME + "*") if p.is_file())
    assert b"olga@example.com" not in octets and b"olga%40example.com" not in octets
    assert b"Clicker/1.0" not in octets


def test_links_go_after_link_retention_days_once_their_message_is_gone(tmp_path: Path) -> None:
    link_a = LinkRecord(token="A" * 22 + "A", url="https://a.example/", position=0)
    link_b = LinkRecord(token="B" * 22 + "A", url="https://b.example/", position=0)
    with SqliteDatabase.open(tmp_path / "data") as database:
        database.record_message(make_record(1, links=(link_a,)))
        database.record_message(make_record(5, links=(link_b,)))
        removed = database.prune(T0 + timedelta(minutes=2))  # message 1's record
        assert (removed.messages, removed.links) == (1, 0)  # 2024: within 1,825 days
        assert database.find_link(link_a.token) == (link_a, token(1))
        database.link_retention_days = 30
        assert database.prune_links_batch() == 1
        assert database.find_link(link_a.token) is None  # old, and its message gone
        assert database.find_link(link_b.token) == (link_b, token(5))  # its message is kept
        database.link_retention_days = 0  # forever
        database.prune(T0 + timedelta(minutes=6))
        assert database.find_link(link_b.token) == (link_b, token(5))
