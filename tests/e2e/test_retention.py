"""``serve``'s automatic prune: the Application prunes shortly after start, then daily."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.app import Application
from smtp_tracker.store import SqliteDatabase
from smtp_tracker.store.records import OpenEvent
from tests.store.store_helpers import make_record, token
from tests.support.waiting import wait_until

NOW = datetime.now(UTC)
Factory = Callable[..., Awaitable[Application]]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store with a record 400 days old (with an open) and one of today; capture days of both."""
    data_dir = tmp_path / "data"
    with SqliteDatabase.open(data_dir) as database:
        for i, age in ((0, timedelta(days=400)), (1, timedelta(0))):
            at = NOW - age
            database.record_message(make_record(i, relayed_at=at, received_at=at))
            database.record_opens(
                [OpenEvent(tracking_id=token(i), at=at, ip=None, user_agent="UA")]
            )
    for age in (400, 0):
        day = data_dir / "capture" / (NOW - timedelta(days=age)).strftime("%Y-%m-%d")
        day.mkdir(parents=True)
        (day / "0123456789AB.session.log").write_text("C> RCPT TO:<bob@example.net>\n")
    return data_dir


@pytest.fixture
def start_app(relay_factory: Factory, data_dir: Path) -> Factory:
    """:func:`relay_factory` on ``data_dir``, tracking on, pruning at once and then hourly."""

    async def make(*, smtp: bool = True, **overrides: Any) -> Application:
        values: dict[str, Any] = {
            "data_dir": str(data_dir),
            "tracking": True,
            "pixel_base_url": "https://track.example.test",
            "retention_days": 365,
            "pixel_listen": "127.0.0.1:0",
            "pixel_plain_http": True,
            **overrides,
        }
        options = {"smtp": smtp, "prune_first_delay_s": 0.0, "prune_interval_s": 3600.0}
        return await relay_factory(app_options=options, **values)

    return make


async def test_serve_prunes_old_records_shortly_after_start(
    start_app: Factory, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtp_tracker.pruner")
    app = await start_app()
    store = app.store
    assert store is not None and app.pruner is not None

    async def old_record_gone() -> bool:
        return await store.find_message(token(0)) is None

    await wait_until(old_record_gone, timeout_s=20, message="the old record was not pruned")
    await wait_until(lambda: app.pruner is not None and app.pruner.runs == 1, timeout_s=20,
                     message="the prune did not finish")  # fmt: skip
    kept = await store.find_message(token(1))
    assert kept is not None and len(kept.opens) == 1
    days = sorted(p.name for p in (data_dir / "capture").iterdir())
    assert days == [NOW.strftime("%Y-%m-%d")]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "smtp_tracker.pruner"]
    assert line.startswith("pruned records relayed before ")
    assert line.endswith(
        "(retention_days=365): 1 messages, 1 opens, 0 clicks, 0 links, 2 recipients, "
        "1 capture files"
    )


async def test_no_automatic_prune_with_retention_days_0(start_app: Factory) -> None:
    app = await start_app(retention_days=0)
    assert app.pruner is None
    assert app.store is not None
    assert await app.store.find_message(token(0)) is not None


async def test_the_standalone_pixel_endpoint_leaves_pruning_to_serve(start_app: Factory) -> None:
    app = await start_app(smtp=False, pixel=True)
    assert app.pruner is None
