"""The outbox's bound, its failing open, and ``events_log``."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.store import OpenEvent
from smtp_tracker.webhooks import outbox
from tests.support.waiting import wait_until
from tests.webhooks.conftest import GMAIL_PROXY, Receiver, Tracked, hook, send


async def test_beyond_the_bound_events_are_dropped_and_counted_and_mail_relays(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await receiver.down()
    app = await tracked_relay(
        webhooks=[hook(receiver, secret_file, ca_pem_path)], webhook_outbox_max_events=1000
    )
    sender, store = app.webhooks, app.store
    assert sender is not None and store is not None
    await send(app, 1, sessions=1)
    await upstream.wait_for_transactions(1, timeout_s=20)
    (stored,) = await store.list_messages()
    now = datetime.now(UTC)
    hits = [
        OpenEvent(
            tracking_id=stored.record.tracking_id,
            at=now,
            ip="192.0.2.7",
            user_agent=GMAIL_PROXY,
        )
        for _ in range(999)
    ]
    assert await store.record_opens(hits) == 999
    assert (sender.outbox.written, sender.outbox.dropped) == (1000, 0)

    with caplog.at_level(logging.ERROR, logger="smtp_tracker.webhooks"):
        await send(app, 2, start=1, sessions=1)  # the 1,001st and 1,002nd events
    await upstream.wait_for_transactions(3, timeout_s=20)  # mail still relays
    assert (sender.outbox.written, sender.outbox.dropped) == (1000, 2)
    full = [r for r in caplog.records if "outbox full" in r.getMessage()]
    assert len(full) == 1  # logged once
    assert len(await store.list_messages()) == 3  # and records are kept
    conn = outbox.connect(tmp_path / "data")
    try:
        state = outbox.status(conn)
    finally:
        conn.close()
    assert (state.depth, state.dropped) == (1000, 2)

    await receiver.up()
    await wait_until(
        lambda: len(receiver.events()) == 1000, timeout_s=120, message="not all delivered"
    )
    await wait_until(lambda: sender.depth == 0, timeout_s=30, message="outbox not emptied")
    # one message's 1,000 events, in the order they were written
    assert [e["type"] for e in receiver.events()] == ["message.relayed"] + ["message.opened"] * 999
    assert len(receiver.deliveries) == 1000
    await send(app, 1, start=3, sessions=1)  # room again: kept and sent
    await wait_until(lambda: len(receiver.events()) == 1001, timeout_s=20, message="not kept")


async def test_an_outbox_that_cannot_be_written_costs_the_event_not_the_record(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = await tracked_relay(webhooks=[hook(receiver, secret_file, ca_pem_path)])
    sender, store = app.webhooks, app.store
    assert sender is not None and store is not None
    conn = outbox.connect(tmp_path / "data")
    conn.execute("DROP TABLE webhook_deliveries")  # every outbox write fails from now on
    conn.close()
    with caplog.at_level(logging.ERROR, logger="smtp_tracker.webhooks"):
        await send(app, 2, sessions=1)
    await upstream.wait_for_transactions(2, timeout_s=20)
    await wait_until(lambda: sender.outbox.failed == 2, timeout_s=20, message="not counted")
    assert len(await store.list_messages()) == 2  # the records are kept
    lost = [r for r in caplog.records if "not written" in r.getMessage()]
    assert len(lost) == 1  # logged once
    assert receiver.attempts == 0


async def test_events_log_writes_json_lines_and_is_reopened_on_sighup(
    tracked_relay: Tracked, upstream: Any, tmp_path: Path
) -> None:
    path = tmp_path / "events.ndjson"
    app = await tracked_relay(events_log=str(path))
    sender = app.webhooks
    assert sender is not None and sender.event_log is not None
    await send(app, 2, sessions=1)
    await wait_until(lambda: sender.event_log.lines == 2, timeout_s=20, message="no lines")
    first = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["type"] for e in first] == ["message.relayed"] * 2
    assert {e["message_id"] for e in first} == {"<news-0@example.org>", "<news-1@example.org>"}

    rotated = path.with_suffix(".1")
    path.rename(rotated)  # logrotate moves it away, then signals
    assert await app.reload(app.config)
    await send(app, 1, start=2, sessions=1)
    await wait_until(lambda: path.exists(), timeout_s=20, message="not reopened")
    await wait_until(lambda: sender.event_log.lines == 3, timeout_s=20, message="no line")
    (third,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert third["message_id"] == "<news-2@example.org>"
    assert len(rotated.read_text().splitlines()) == 2
    assert path.stat().st_mode & 0o777 == 0o640


async def test_the_sender_repairs_the_outbox_bookkeeping_at_start(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    tmp_path: Path,
) -> None:
    """``store recover`` rebuilds tables and indexes, not triggers: the sender makes
    them again, and the depth counter right, when it starts."""
    from smtp_tracker.store import SqliteDatabase

    data_dir = tmp_path / "data"
    SqliteDatabase.open(data_dir).close()
    conn = outbox.connect(data_dir)
    for name in ("webhook_events_added", "webhook_events_removed", "webhook_deliveries_done"):
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("UPDATE webhook_outbox_state SET depth = 999")
    conn.close()
    app = await tracked_relay(
        webhooks=[hook(receiver, secret_file, ca_pem_path)], webhook_outbox_max_events=1000
    )
    sender = app.webhooks
    assert sender is not None and sender.depth == 0
    await send(app, 2, sessions=1)
    await wait_until(lambda: len(receiver.events()) == 2, timeout_s=20, message="not sent")
    await wait_until(lambda: sender.depth == 0, timeout_s=20, message="depth not kept")
    conn = outbox.connect(data_dir)
    try:
        assert conn.execute("SELECT count(*) FROM webhook_events").fetchone() == (0,)
    finally:
        conn.close()
    assert sender.outbox.dropped == 0


async def test_webhooks_with_a_postgresql_store_are_one_line_at_start(
    relay_factory: Any, receiver: Receiver, secret_file: Path, ca_pem_path: Path
) -> None:
    """The outbox lives in the SQLite store; with store = postgresql:// serve says so."""
    from smtp_tracker.errors import StartupError

    with pytest.raises(StartupError, match="need the SQLite store"):
        await relay_factory(
            tracking=True,
            pixel=False,
            store="postgresql://smtp_tracker@127.0.0.1:1/smtp_tracker",
            store_timeout_s=0.5,
            webhooks=[hook(receiver, secret_file, ca_pem_path)],
        )
    assert receiver.attempts == 0
