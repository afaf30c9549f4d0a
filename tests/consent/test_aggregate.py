"""``tracking_mode = "aggregate"``: the same traffic gives the same counts, and nothing personal.

The same messages go through two relays, one per mode, each with its own data
directory; the same pixels and links are fetched from each with the same
User-Agents.  The aggregate store's raw tables, and its database and WAL files
byte for byte, hold no recipient, sender, client address or User-Agent.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp

from smtp_tracker.store import DB_FILENAME, SqliteDatabase
from smtp_tracker.web.reports.api import stats_row_to_dict
from tests.consent.helpers import CLICK, PIXEL, rows, send
from tests.support.relay import tracking_over_tls
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

RECIPIENTS = [["kim@example.com"], ["lee@example.net", "max@example.org"], ["ned@example.com"]]
USER_AGENTS = [
    "Mozilla/5.0 Thunderbird/128.0 UniqueAgentMarker",
    "Outlook-iOS/2.0 UniqueAgentMarker",
]


def figures(data_dir: Path) -> dict[str, Any]:
    with SqliteDatabase.open(data_dir, create=False, migrate_schema=False) as database:
        rows_ = database.query_stats(group="sender_domain")
    assert len(rows_) == 1
    figure = stats_row_to_dict(rows_[0])
    del figure["relayed_aggregate"], figure["tracking_mode"]
    return figure


async def run_traffic(
    app: Any, upstream: UpstreamServer, data_dir: Path, tag: str, context: ssl.SSLContext
) -> None:
    pixels: list[str] = []
    clicks: list[str] = []
    for number, recipients in enumerate(RECIPIENTS):
        delivered = await send(app, upstream, f"{tag} {number}", recipients)
        pixel = PIXEL.search(delivered.data)
        click = CLICK.search(delivered.data)
        assert pixel is not None and click is not None
        pixels.append(pixel.group(0).decode())
        clicks.append(click.group(0).decode())
    await wait_until(
        lambda: rows(data_dir, "SELECT count(*) FROM messages")[0][0] == len(RECIPIENTS),
        timeout_s=10,
        message="messages not recorded",
    )
    async with aiohttp.ClientSession() as session:
        for url, agent in [
            (pixels[0], USER_AGENTS[0]),
            (pixels[0], USER_AGENTS[1]),
            (pixels[1], USER_AGENTS[0]),
        ]:
            async with session.get(url, ssl=context, headers={"User-Agent": agent}) as response:
                assert response.status == 200
        async with session.get(
            clicks[2], ssl=context, headers={"User-Agent": USER_AGENTS[1]}, allow_redirects=False
        ) as response:
            assert response.status == 302
    await wait_until(
        lambda: rows(data_dir, "SELECT sum(opens), sum(clicks) FROM daily_stats")[0] == (3, 1),
        timeout_s=10,
        message="events not counted",
    )


async def test_aggregate_mode_counts_the_same_and_stores_nothing_personal(
    relay_factory: Any,
    upstream: UpstreamServer,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
) -> None:
    per_person_dir, aggregate_dir = tmp_path / "per-person", tmp_path / "aggregate"
    options = {**tracking_over_tls(cert_pem_path, key_pem_path), "track_clicks": True}
    per_person = await relay_factory(data_dir=str(per_person_dir), **options)
    await run_traffic(per_person, upstream, per_person_dir, "per-person", client_ssl_context)
    await per_person.stop(grace_s=1.0)
    aggregate = await relay_factory(
        data_dir=str(aggregate_dir),
        tracking_mode="aggregate",
        reports=True,
        reports_listen="127.0.0.1:0",
        **options,
    )
    await run_traffic(aggregate, upstream, aggregate_dir, "aggregate", client_ssl_context)

    # the reports API works in this mode and says so
    token = (aggregate_dir / "reports-token").read_text().strip()
    base = f"https://localhost:{aggregate.reports_port}"
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {token}"},
        connector=aiohttp.TCPConnector(ssl=client_ssl_context),
    ) as session:
        async with session.get(base + "/api/stats") as response:
            assert response.status == 200
            stats = await response.json()
        assert stats["total"]["tracking_mode"] == "aggregate"
        assert (stats["total"]["relayed"], stats["total"]["opens"]) == (3, 3)
        async with session.get(base + "/api/messages") as response:
            assert response.status == 200
            listed = await response.json()
        assert len(listed["items"]) == 3
        assert {(m["sender"], tuple(m["recipients"])) for m in listed["items"]} == {("", ())}

    # the figures are the same, and say which mode made them
    assert figures(aggregate_dir) == figures(per_person_dir)
    with SqliteDatabase.open(aggregate_dir, create=False, migrate_schema=False) as database:
        (row,) = database.query_stats()
    assert (row.tracking_mode, row.relayed_aggregate, row.relayed) == ("aggregate", 3, 3)
    with SqliteDatabase.open(per_person_dir, create=False, migrate_schema=False) as database:
        (row,) = database.query_stats()
    assert row.tracking_mode == "per-person"

    # the raw tables: no recipient, sender, client address or User-Agent; no event rows
    assert rows(aggregate_dir, "SELECT count(*) FROM message_recipients") == [(0,)]
    assert rows(aggregate_dir, "SELECT count(*) FROM opens") == [(0,)]
    assert rows(aggregate_dir, "SELECT count(*) FROM clicks") == [(0,)]
    assert set(
        rows(aggregate_dir, "SELECT sender, recipients, queue_id, message_id FROM messages")
    ) == {("", "[]", "", None)}
    assert rows(aggregate_dir, "SELECT sum(open_count), sum(click_count) FROM messages") == [(3, 1)]
    # the per-person store does hold them (so the byte search below can find them)
    assert rows(per_person_dir, "SELECT count(*) FROM opens") == [(3,)]
    await aggregate.stop(grace_s=1.0)  # checkpoints the WAL into the database
    for data_dir, expect_found in ((per_person_dir, True), (aggregate_dir, False)):
        octets = b"".join(
            path.read_bytes() for path in data_dir.glob(DB_FILENAME + "*") if path.is_file()
        )
        for needle in (
            b"kim@example.com",
            b"lee@example.net",
            b"alice@example.org",
            b"UniqueAgentMarker",
            b"127.0.0.",
        ):
            assert (needle in octets) == expect_found, (data_dir.name, needle)
