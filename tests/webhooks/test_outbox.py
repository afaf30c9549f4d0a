"""The outbox's bound, its failing open, its repair and ``events_log``, on both backends
(``store_keys``: SQLite in the data directory, or PostgreSQL)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.store import OpenEvent
from smtp_tracker.store.instant import Instant
from smtp_tracker.webhooks import outbox
from tests.support.waiting import wait_until
from tests.webhooks.conftest import (
    GMAIL_PROXY,
    Receiver,
    Tracked,
    hook,
    outbox_connection,
    send,
)


async def test_beyond_the_bound_events_are_dropped_and_counted_and_mail_relays(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    store_keys: dict[str, Any],
) -> None:
    await receiver.down()
    app = await tracked_relay(
        webhooks=[hook(receiver, secret_file, ca_pem_path)],
        webhook_outbox_max_events=1000,
        **store_keys,
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
    with outbox_connection(store_keys, tmp_path / "data") as conn:
        state = outbox.status(conn)
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
    store_keys: dict[str, Any],
) -> None:
    app = await tracked_relay(webhooks=[hook(receiver, secret_file, ca_pem_path)], **store_keys)
    sender, store = app.webhooks, app.store
    assert sender is not None and store is not None
    with outbox_connection(store_keys, tmp_path / "data") as conn:
        # every outbox write fails from now on (PostgreSQL: with the view that reads it)
        conn.execute("DROP TABLE webhook_deliveries" + (" CASCADE" if store_keys else ""))
    with caplog.at_level(logging.ERROR, logger="smtp_tracker.webhooks"):
        await send(app, 2, sessions=1)
    await upstream.wait_for_transactions(2, timeout_s=20)
    await wait_until(lambda: sender.outbox.failed == 2, timeout_s=20, message="not counted")
    assert len(await store.list_messages()) == 2  # the records are kept
    lost = [r for r in caplog.records if "not written" in r.getMessage()]
    assert len(lost) == 1  # logged once
    assert receiver.attempts == 0


async def test_events_log_writes_json_lines_and_is_reopened_on_sighup(
    tracked_relay: Tracked, upstream: Any, tmp_path: Path, store_keys: dict[str, Any]
) -> None:
    path = tmp_path / "events.ndjson"
    app = await tracked_relay(events_log=str(path), **store_keys)
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
    store_keys: dict[str, Any],
) -> None:
    """``store recover`` rebuilds SQLite's tables and indexes, not triggers: the sender
    makes them again; on either backend an event left without a delivery is deleted
    and the depth counter set right when the sender starts."""
    data_dir = tmp_path / "data"
    with outbox_connection(store_keys, data_dir) as conn:
        if not store_keys:
            for name in ("webhook_events_added", "webhook_events_removed"):
                conn.execute(f"DROP TRIGGER {name}")
            conn.execute("DROP TRIGGER webhook_deliveries_done")
        conn.execute(
            "INSERT INTO webhook_events (id, type, created_us, body)"
            " VALUES ('orphan', 'message.relayed', ?, '{}')",
            (Instant(1),),
        )
        conn.execute("UPDATE webhook_outbox_state SET depth = 999")
    app = await tracked_relay(
        webhooks=[hook(receiver, secret_file, ca_pem_path)],
        webhook_outbox_max_events=1000,
        **store_keys,
    )
    sender = app.webhooks
    assert sender is not None and sender.depth == 0
    await send(app, 2, sessions=1)
    await wait_until(lambda: len(receiver.events()) == 2, timeout_s=20, message="not sent")
    await wait_until(lambda: sender.depth == 0, timeout_s=20, message="depth not kept")
    with outbox_connection(store_keys, data_dir) as conn:
        assert tuple(conn.execute("SELECT count(*) FROM webhook_events").fetchone()) == (0,)
        assert outbox.outbox_depth(conn) == 0
    assert sender.outbox.dropped == 0
