"""A counted click means the message was read (issue 19, item 3): stats, API, dashboard, CSV.

Known data, all relayed on one day: #1 clicked by a person, no open (images
blocked: opened via the click); #2 opened and clicked (via the pixel); #3
clicked by a scanner only (not opened); #4 nothing; #5 clicked first and its
pixel fetched later (via the pixel, and no longer counted as via a click).
"""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from smtp_tracker.store import ClickEvent, LinkRecord, SqliteStore
from smtp_tracker.web.reports.api import CSV_COLUMNS

from .dashboard_support import (
    API_TOKEN,
    T_DAY,
    VERDICT_UA,
    ReportsServer,
    browser,
    login,
    open_hit,
    page,
    record,
    reports,
    runners,
    store,
)
from .web_helpers import token

__all__ = ["browser", "reports", "runners", "store"]  # fixtures

PERIOD = {"since": "2026-11-09", "until": "2026-11-12"}


def link(i: int) -> LinkRecord:
    return LinkRecord(token=f"L{i:02d}" + "k" * 20, url=f"https://example.org/{i}", position=0)


def click(i: int, verdict: str, minutes: int) -> ClickEvent:
    return ClickEvent(
        link_token=link(i).token,
        at=T_DAY + timedelta(minutes=minutes),
        ip="192.0.2.8",
        user_agent=VERDICT_UA[verdict],
    )


@pytest.fixture
async def seeded(store: SqliteStore) -> SqliteStore:
    for i in range(1, 6):
        await store.record_message(
            record(i, relayed_at=T_DAY + timedelta(seconds=i), links=(link(i),))
        )
    await store.record_clicks(
        [click(1, "human", 30), click(2, "human", 31), click(3, "scanner", 1), click(5, "human", 5)]
    )
    await store.record_opens(
        [
            open_hit(2, "human", T_DAY + timedelta(minutes=20)),
            open_hit(5, "mail_proxy", T_DAY + timedelta(hours=3)),
        ]
    )
    return store


async def api(
    client: aiohttp.ClientSession, server: ReportsServer, path: str, **params: str
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with client.get(server.base_url + path, params=params, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body if body is not None else await response.text()


async def test_stats_count_a_clicked_message_as_opened(seeded: SqliteStore) -> None:
    (row,) = await seeded.query_stats()
    assert (row.tracked, row.opened, row.opened_via_click, row.clicked) == (5, 3, 1, 3)
    assert row.open_rate == pytest.approx(3 / 5)
    assert row.opened_any == 2  # the pixel was fetched for #2 and #5 only


async def test_api_messages_stats_filter_and_csv(
    seeded: SqliteStore, reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    status, body = await api(browser, reports, "/api/messages", limit="10")
    assert status == 200
    via = {item["tracking_id"]: (item["opened"], item["opened_via"]) for item in body["items"]}
    assert via == {
        token(1): (True, "click"),
        token(2): (True, "pixel"),
        token(3): (False, None),
        token(4): (False, None),
        token(5): (True, "pixel"),
    }
    _, body = await api(browser, reports, "/api/messages", opened="true")
    assert sorted(item["tracking_id"] for item in body["items"]) == sorted(
        [token(1), token(2), token(5)]
    )
    _, body = await api(browser, reports, "/api/messages", opened="false")
    assert sorted(item["tracking_id"] for item in body["items"]) == sorted([token(3), token(4)])
    _, body = await api(browser, reports, f"/api/messages/{token(1)}")
    assert (body["opened"], body["opened_via"], body["open_count"]) == (True, "click", 0)
    _, body = await api(browser, reports, "/api/stats", **PERIOD)
    assert (body["total"]["opened"], body["total"]["opened_via_click"]) == (3, 1)
    status, text = await api(browser, reports, "/api/export.csv")
    assert status == 200
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert "opened_via" in rows[0] and tuple(rows[0]) == CSV_COLUMNS
    header = rows[0]
    records = {row[1]: dict(zip(header, row, strict=True)) for row in rows[1:]}
    assert (records[token(1)]["opened"], records[token(1)]["opened_via"]) == ("true", "click")
    assert (records[token(3)]["opened"], records[token(3)]["opened_via"]) == ("false", "")
    assert records[token(5)]["opened_via"] == "pixel"


async def test_dashboard_shows_opened_via_a_click(
    seeded: SqliteStore, reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    assert (await login(browser, reports)).status == 303

    async def get(path: str, **params: str) -> Any:
        async with browser.get(reports.base_url + path, params=params) as response:
            assert response.status == 200
            return page(await response.text())

    doc = await get("/", **PERIOD)
    tiles = {
        tile.xpath("string(dt)"): [" ".join(dd.text_content().split()) for dd in tile.xpath("dd")]
        for tile in doc.xpath("//dl[@class='tiles']/div")
    }
    assert tiles["Opened"] == ["3", "1 via a click"]
    assert tiles["Open rate"] == ["60.0 %"]  # split() made the no-break space a space
    doc = await get(f"/messages/{token(1)}")
    status = " ".join(doc.xpath("string(//p[@class='status-line'])").split())
    assert status.startswith("opened via a click")
    doc = await get(f"/messages/{token(3)}")
    assert doc.xpath("string(//p[@class='status-line']/span)") == "not opened"
    doc = await get("/messages", opened="true")
    rows = doc.xpath("//table//tbody/tr")
    assert len(rows) == 3
    assert sum("via a click" in row.text_content() for row in rows) == 1
