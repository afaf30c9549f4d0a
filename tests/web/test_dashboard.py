"""The dashboard's pages over a real store, signed in, over HTTPS: what they show.

Known data: three messages from example.org relayed on 2026-11-10 whose opens
carry every verdict, one from shop.example on 2026-11-11, one untracked. The
overview's chart, totals and domain table, the list's search, filters and
pages, and the message page's timeline are checked against it.
"""

from __future__ import annotations

import itertools
from datetime import date, timedelta
from typing import Any

import aiohttp
import pytest

from smtp_tracker.store import SqliteStore
from smtp_tracker.store.queries import StatsRow
from smtp_tracker.web.reports.dashboard import CHART_HEIGHT, MESSAGES_PAGE_SIZE, opens_chart

from .dashboard_support import (
    T_DAY,
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


@pytest.fixture
async def seeded(store: SqliteStore) -> SqliteStore:
    await store.record_message(record(1))
    await store.record_message(record(2, relayed_at=T_DAY + timedelta(minutes=1)))
    await store.record_message(record(3, relayed_at=T_DAY + timedelta(minutes=2)))
    await store.record_message(
        record(4, relayed_at=T_DAY + timedelta(days=1), sender="news@shop.example")
    )
    await store.record_message(
        record(
            5, relayed_at=T_DAY + timedelta(minutes=3), tracked=False, not_tracked_reason="no-html"
        )
    )
    later = T_DAY + timedelta(hours=2)
    hits = [
        open_hit(1, "scanner", T_DAY + timedelta(seconds=5), "198.51.100.9"),
        open_hit(1, "human", later),
        open_hit(2, "privacy_proxy", later),
        open_hit(3, "mail_proxy", later),
        open_hit(3, "mail_proxy", later + timedelta(hours=1)),
        open_hit(4, "unknown", later + timedelta(days=1)),
    ]
    assert await store.record_opens(hits) == 6
    return store


@pytest.fixture
async def signed_in(
    seeded: SqliteStore, reports: ReportsServer, browser: aiohttp.ClientSession
) -> aiohttp.ClientSession:
    assert (await login(browser, reports)).status == 303
    return browser


async def fetch(
    client: aiohttp.ClientSession, server: ReportsServer, path: str, **params: str
) -> tuple[int, Any, str]:
    async with client.get(server.base_url + path, params=params, allow_redirects=False) as r:
        text = await r.text()
        return r.status, page(text), text


def cells(row: Any) -> list[str]:
    return [" ".join(cell.text_content().split()) for cell in row.xpath("./th|./td")]


# -- overview -------------------------------------------------------------------------------


async def test_overview_totals_count_only_human_and_mail_proxy_as_opened(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    status, doc, _ = await fetch(signed_in, reports, "/", **PERIOD)
    assert status == 200
    tiles = {
        tile.xpath("string(dt)"): tile.xpath("string(dd)")
        for tile in doc.xpath("//dl[@class='tiles']/div")
    }
    assert tiles["Relayed"] == "5"
    assert tiles["Tracked"] == "4"
    assert tiles["Opened"] == "2"  # messages 1 (human) and 3 (mail proxy)
    assert tiles["Open rate"] == "50.0\u00a0%"
    assert tiles["Opened by anything"] == "4"
    assert tiles["Open events"] == "6"


async def test_overview_chart_is_an_svg_with_bars_stacked_by_verdict(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    _, doc, _ = await fetch(signed_in, reports, "/", **PERIOD)
    [svg] = doc.xpath("//svg[contains(@class, 'chart__bars')]")
    assert svg.get("role") == "img"
    days = svg.xpath("./g[@class='chart__day']")
    assert len(days) == 4  # 9, 10, 11 and 12 November, empty days included
    tenth = days[1]
    assert tenth.xpath("string(title)").startswith("2026-11-10: 5 opens")
    bars = {rect.get("class"): rect for rect in tenth.xpath("./rect")}
    assert set(bars) == {
        "bar bar--human",
        "bar bar--mail_proxy",
        "bar bar--privacy_proxy",
        "bar bar--scanner",
    }
    heights = {name: float(rect.get("height")) for name, rect in bars.items()}
    assert heights["bar bar--mail_proxy"] == pytest.approx(2 * heights["bar bar--human"])
    # stacked: the counted verdicts at the bottom, each segment on the one below
    ordered = [tenth.xpath("./rect")[i] for i in range(4)]
    assert ordered[0].get("class") == "bar bar--human"
    for lower, upper in itertools.pairwise(ordered):
        assert float(upper.get("y")) + float(upper.get("height")) == pytest.approx(
            float(lower.get("y"))
        )
    assert days[0].xpath("./rect") == [] and days[3].xpath("./rect") == []
    legend = [" ".join(li.text_content().split()) for li in doc.xpath("//ul[@class='legend']/li")]
    assert legend == [
        "Human (counted)",
        "Mail proxy (counted)",
        "Privacy proxy",
        "Scanner",
        "Unknown",
    ]


async def test_overview_domain_table_splits_opens_by_verdict(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    _, doc, _ = await fetch(signed_in, reports, "/", **PERIOD)
    [table] = doc.xpath("//table[contains(@class, 'domains')]")
    assert table.xpath("string(caption)").startswith("Sender domains")
    header = [
        " ".join(th.text_content().split()) for th in table.xpath("./thead//th[@scope='col']")
    ]
    assert table.xpath("string(./thead//th[@scope='colgroup'])") == "Opens by verdict"
    assert header == [
        "Sender domain",
        "Relayed",
        "Tracked",
        "Opened",
        "Open rate",
        "Opened by anything",
        "Human",
        "Mail proxy",
        "Privacy proxy",
        "Scanner",
        "Unknown",
    ]
    rows = {
        cells(tr)[0]: dict(zip(header, cells(tr), strict=True)) for tr in table.xpath("./tbody/tr")
    }
    org = rows["example.org"]
    assert (org["Relayed"], org["Tracked"], org["Opened"]) == ("4", "3", "2")
    assert org["Open rate"] == "66.7 %"
    assert org["Opened by anything"] == "3"
    assert (
        org["Human"],
        org["Mail proxy"],
        org["Privacy proxy"],
        org["Scanner"],
        org["Unknown"],
    ) == ("1", "2", "1", "1", "0")
    shop = rows["shop.example"]
    assert (shop["Opened"], shop["Open rate"], shop["Unknown"]) == ("0", "0.0 %", "1")
    link = table.xpath(".//a[text()='shop.example']/@href")[0]
    assert link.startswith("/messages?sender_domain=shop.example")


async def test_overview_defaults_to_the_last_30_days_and_reports_bad_dates(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    status, doc, _ = await fetch(signed_in, reports, "/")
    assert status == 200
    assert len(doc.xpath("//svg[contains(@class,'chart__bars')]/g")) == 30
    status, doc, _ = await fetch(signed_in, reports, "/", since="2026-13-01")
    assert status == 400
    assert "since" in doc.xpath("string(//*[@role='alert'])")
    status, doc, _ = await fetch(signed_in, reports, "/", since="2020-01-01", until="2026-01-01")
    assert status == 400
    assert "at most 366 days" in doc.xpath("string(//*[@role='alert'])")


def test_opens_chart_scales_to_a_round_top_and_fills_missing_days() -> None:
    rows = [
        StatsRow(
            key="2026-01-02",
            relayed=10,
            tracked=10,
            opened=3,
            opened_any=4,
            opens=37,
            opens_by_verdict={"human": 30, "scanner": 7},
        ),
    ]
    chart = opens_chart(rows, since=date(2026, 1, 1), until=date(2026, 1, 3))
    assert [c.opens for c in chart.columns] == [0, 37, 0]
    assert [value for value, _ in chart.ticks] == [0, 10, 20, 30, 40]
    human, scanner = chart.columns[1].segments
    assert human.height == pytest.approx(CHART_HEIGHT * 30 / 40)
    assert scanner.height == pytest.approx(CHART_HEIGHT * 7 / 40)
    assert human.y + human.height == pytest.approx(chart.baseline)
    empty = opens_chart([], since=date(2026, 1, 1), until=date(2026, 1, 1))
    assert empty.max_opens == 0 and empty.columns[0].segments == ()


# -- the message list -----------------------------------------------------------------------


async def test_search_by_message_id_finds_exactly_that_message(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    for q in ("<m3@example.org>", "m3@example.org", token(3), "Q0000000003"):
        status, doc, _ = await fetch(signed_in, reports, "/messages", q=q)
        assert status == 200
        rows = doc.xpath("//table[contains(@class, 'messages')]/tbody/tr")
        assert len(rows) == 1, q
        assert rows[0].xpath(".//a/@href") == [f"/messages/{token(3)}"]
        assert doc.xpath("//input[@id='q']/@value") == [q]


async def test_filters_sender_recipient_dates_and_opened(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    async def ids(**params: str) -> list[str]:
        status, doc, _ = await fetch(signed_in, reports, "/messages", **params)
        assert status == 200
        return [
            h.rsplit("/", 1)[1] for h in doc.xpath("//table[contains(@class, 'messages')]//a/@href")
        ]

    assert await ids() == [token(4), token(5), token(3), token(2), token(1)]
    assert await ids(sender="news@shop.example") == [token(4)]
    assert await ids(sender_domain="example.org", opened="true") == [token(3), token(1)]
    assert await ids(recipient="R2@example.net") == [token(2)]
    assert await ids(since="2026-11-11") == [token(4)]
    assert await ids(until="2026-11-10", opened="false") == [token(5), token(2)]


async def test_every_filter_input_has_a_label(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    for path in ("/messages", "/"):
        _, doc, _ = await fetch(signed_in, reports, path)
        assert doc.xpath("/html/@lang") == ["en"]
        assert doc.xpath("//meta[@name='viewport']/@content")
        fields = doc.xpath("//main//input[not(@type='hidden')] | //main//select")
        assert fields
        for field in fields:
            assert doc.xpath(f"//label[@for='{field.get('id')}']"), (path, field.get("name"))


async def test_older_pages_cover_every_message_once(
    store: SqliteStore, reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    count = MESSAGES_PAGE_SIZE + 7
    for i in range(1, count + 1):  # pairs share a relay time: the keyset must still hold
        await store.record_message(record(i, relayed_at=T_DAY + timedelta(seconds=i // 2)))
    await login(browser, reports)
    seen: list[str] = []
    path, params = "/messages", {"sender": "alice@example.org"}
    pages = 0
    while True:
        status, doc, _ = await fetch(browser, reports, path, **params)
        assert status == 200
        seen += [
            h.rsplit("/", 1)[1] for h in doc.xpath("//table[contains(@class, 'messages')]//a/@href")
        ]
        pages += 1
        older = doc.xpath("//nav[@class='pager']/a[@rel='next']/@href")
        if not older:
            break
        assert doc.xpath("string(//nav[@class='pager']/a[@rel='next'])") == "Older \u2192"
        path, params = older[0], {}
    assert pages == 2
    assert len(seen) == count and set(seen) == {token(i) for i in range(1, count + 1)}


async def test_a_bad_cursor_or_date_is_a_message_not_a_crash(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    status, doc, _ = await fetch(signed_in, reports, "/messages", cursor="garbage")
    assert status == 400
    assert "cursor" in doc.xpath("string(//*[@role='alert'])")
    status, doc, _ = await fetch(signed_in, reports, "/messages", since="yesterday")
    assert status == 400
    assert "since" in doc.xpath("string(//*[@role='alert'])")


# -- the message page -----------------------------------------------------------------------


async def test_message_page_shows_the_open_timeline_with_verdicts_and_reasons(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    status, doc, _ = await fetch(signed_in, reports, f"/messages/{token(1)}")
    assert status == 200
    assert doc.xpath("string(//h1)") == "<m1@example.org>"
    assert doc.xpath("string(//p[@class='status-line']/span)") == "opened"
    [table] = doc.xpath("//section[@aria-labelledby='opens-heading']//table")
    rows = [cells(tr) for tr in table.xpath("./tbody/tr")]
    assert [row[1:5] for row in rows] == [
        ["Scanner", "test:scanner", "no", "198.51.100.9"],
        ["Human", "test:human", "yes", "192.0.2.7"],
    ]
    assert rows[0][0] == "2026-11-10 09:00:05 UTC"
    assert "No clicks recorded." in doc.xpath(
        "string(//section[@aria-labelledby='clicks-heading'])"
    )


async def test_message_with_machine_opens_only_is_not_opened(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    _, doc, _ = await fetch(signed_in, reports, f"/messages/{token(2)}")
    assert doc.xpath("string(//p[@class='status-line']/span)") == "machine opens only"
    _, doc, _ = await fetch(signed_in, reports, "/messages/Q0000000005")  # found by queue id
    assert doc.xpath("string(//p[@class='status-line']/span)") == "not tracked"


async def test_an_unknown_message_is_a_404_page(
    signed_in: aiohttp.ClientSession, reports: ReportsServer
) -> None:
    status, doc, text = await fetch(signed_in, reports, "/messages/no-such-id")
    assert status == 404
    assert doc.xpath("string(//h1)") == "Not found"
    assert "Log out" in text  # in the site's layout


async def test_text_from_mail_is_escaped(
    store: SqliteStore, reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    hostile = '<x"><script>alert(1)</script>@example.org>'
    await store.record_message(record(9, message_id=hostile, sender="a&b@example.org"))
    await store.record_opens([open_hit(9, "human", T_DAY + timedelta(hours=1))])
    await login(browser, reports)
    for path in ("/messages", f"/messages/{token(9)}"):
        status, doc, text = await fetch(browser, reports, path)
        assert status == 200
        assert "<script>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert doc.xpath("//script") == []
