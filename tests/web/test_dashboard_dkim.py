"""The dashboard's message page says what became of the message's DKIM signatures
(issue 13): re-signed, or why it was relayed as received; nothing for unsigned mail."""

from __future__ import annotations

import aiohttp

from smtp_tracker.store import SqliteStore

from .dashboard_support import ReportsServer, browser, login, page, record, reports, runners, store
from .web_helpers import token

__all__ = ["browser", "reports", "runners", "store"]  # fixtures


async def test_message_page_shows_the_dkim_outcome(
    store: SqliteStore, reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    await store.record_message(record(1, dkim="resigned"))
    await store.record_message(
        record(2, tracked=False, not_tracked_reason="dkim-foreign", dkim="dkim-foreign")
    )
    await store.record_message(record(3))
    assert (await login(browser, reports)).status == 303
    facts = {}
    for i in (1, 2, 3):
        async with browser.get(f"{reports.base_url}/messages/{token(i)}") as response:
            assert response.status == 200
            doc = page(await response.text())
        terms = [" ".join(t.text_content().split()) for t in doc.xpath("//dl[@class='facts']/dt")]
        values = [" ".join(d.text_content().split()) for d in doc.xpath("//dl[@class='facts']/dd")]
        facts[i] = dict(zip(terms, values, strict=True)).get("DKIM")
    assert facts == {
        1: "resigned: re-signed with the sender's key after the rewrite",
        2: "dkim-foreign: relayed with its signatures as received",
        3: None,
    }
