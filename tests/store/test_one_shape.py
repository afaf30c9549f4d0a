"""One JSON shape per message: ``smtp-tracker show --json`` and ``GET /api/messages/{id}``
agree field for field, on both backends (issue 14), and both find a message the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smtp_tracker.cli import main as cli_main
from smtp_tracker.store import ClickEvent, OpenEvent
from smtp_tracker.tokens import LinkRecord
from smtp_tracker.web.reports.app import build_reports_app
from smtp_tracker.web.reports.users import UserDirectory
from smtp_tracker.web.site import start_site

from .store_helpers import T0, make_record, token

TOKEN = "t" * 40


def _store_flags(store: Any, data_dir: Path) -> list[str]:
    dsn = getattr(store, "dsn", None)
    return ["--store", dsn] if dsn else ["--data-dir", str(data_dir)]


async def _show_json(flags: list[str], ident: str) -> dict[str, Any]:
    import asyncio

    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return cli_main(["show", ident, "--json", *flags])

    assert await asyncio.to_thread(run) == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


async def test_show_json_is_the_api_message(store: Any, data_dir: Path, tmp_path: Path) -> None:
    link = LinkRecord(token="L" * 22, url="https://example.com/a?x=1", position=0)
    await store.record_message(make_record(1, links=(link,), message_id="<m1@example.com>"))
    await store.record_message(make_record(2))
    opens = [
        OpenEvent(
            tracking_id=token(1),
            at=T0 + timedelta(minutes=5),
            ip="192.0.2.7",
            user_agent="Mozilla/5.0",
        ),
        OpenEvent(
            tracking_id=token(1),
            at=T0 + timedelta(minutes=6),
            ip="198.51.100.1",
            user_agent=None,
        ),
    ]
    assert await store.record_opens(opens) == 2
    click = ClickEvent(
        link_token=link.token,
        at=T0 + timedelta(minutes=7),
        ip="192.0.2.8",
        user_agent="Mozilla/5.0",
    )
    assert await store.record_clicks([click]) == 1

    users = await UserDirectory.open(tmp_path / "users.json")
    app = build_reports_app(store=store, token=TOKEN, users=users, session_s=600)
    runner, port = await start_site(app, host="127.0.0.1", port=0, ssl_context=None)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            for ident in (token(1), "Q00001", "<m1@example.com>", "m1@example.com"):
                async with session.get(f"http://127.0.0.1:{port}/api/messages/{ident}") as got:
                    assert got.status == 200
                    api = await got.json()
                shown = await _show_json(_store_flags(store, data_dir), ident)
                assert shown == api, ident
                assert api["tracking_id"] == token(1)
                assert [o["ip"] for o in api["opens"]] == ["192.0.2.0/24", "198.51.100.0/24"]
                assert [c["url"] for c in api["clicks"]] == [link.url]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("ident", ["m1@example.com", " <m1@example.com> ", "<m1@example.com>"])
async def test_find_message_and_query_message_agree_on_brackets(store: Any, ident: str) -> None:
    await store.record_message(make_record(1, message_id="<m1@example.com>"))
    found = await store.find_message(ident)
    detail = await store.query_message(ident)
    assert found is not None and detail is not None
    assert found.record.tracking_id == detail.summary.tracking_id == token(1)
