"""``smtp-tracker forget`` and ``prune`` reach the webhook outbox: its events carry
recipients, senders, client addresses and link destinations (issues 18 and 20); on
both backends (``store_keys``: SQLite in the data directory, or PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.store import OpenEvent, SqliteDatabase
from smtp_tracker.webhooks import outbox
from smtp_tracker.webhooks.events import Event
from tests.store.store_helpers import make_record, token
from tests.support.process import run_cli
from tests.webhooks.conftest import outbox_connection

NOW = datetime.now(UTC)
HOOK = "https://hooks.example/in"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def conn(data_dir: Path, store_keys: dict[str, Any]) -> Iterator[outbox.Conn]:
    with outbox_connection(store_keys, data_dir) as connection:
        yield connection


@pytest.fixture
def where(data_dir: Path, store_keys: dict[str, Any]) -> list[str]:
    """The command line's flags naming the test's store."""
    if store_keys:
        return ["--store", store_keys["store"]]
    return ["--data-dir", str(data_dir)]


def the_outbox() -> outbox.Outbox:
    return outbox.Outbox([(HOOK, lambda _type, _counted: True)], max_events=1000)


def record(
    where: list[str], i: int, recipients: list[str], *, days: int = 1, opens: int = 0
) -> None:
    """Message *i* relayed *days* ago to *recipients*, its events in the outbox."""
    at = NOW - timedelta(days=days)
    message = make_record(i, relayed_at=at, recipients=recipients)
    hits = [
        OpenEvent(tracking_id=token(i), at=at, ip="192.0.2.9", user_agent="UA")
        for _ in range(opens)
    ]
    if where[0] == "--store":
        asyncio.run(record_postgresql(where[1], message, hits))
        return
    with SqliteDatabase.open(Path(where[1])) as database:
        database.outbox = the_outbox()
        database.record_message(message)
        database.record_opens(hits)


async def record_postgresql(dsn: str, message: Any, hits: list[OpenEvent]) -> None:
    from smtp_tracker.store.postgresql import PostgresStore

    async with await PostgresStore.open(dsn) as store:
        store.set_outbox(the_outbox())
        await store.record_message(message)
        await store.record_opens(hits)


def add(conn: outbox.Conn, event: Event) -> None:
    with outbox.transaction(conn):
        assert the_outbox().add(conn, [event]) == 1


def event(kind: Any, recipients: list[str], *, days: int = 1, **fields: Any) -> Event:
    return Event.make(
        kind,
        occurred_at=NOW - timedelta(days=days),
        tracking_id=None,
        queue_id="QX",
        message_id=None,
        sender="news@example.org",
        recipients=recipients,
        **fields,
    )


def bury(conn: outbox.Conn, recipient: str) -> int:
    """Make the deliveries of the events naming *recipient* dead letters."""
    rows = conn.execute("SELECT seq, body FROM webhook_events").fetchall()
    seqs = [seq for seq, body in rows if recipient in json.loads(body)["recipients"]]
    outbox.settle(
        conn,
        [outbox.Settled(HOOK, seq, "dead", attempts=9, due_us=0, error="HTTP 500") for seq in seqs],
    )
    return len(seqs)


def events(conn: outbox.Conn) -> dict[str, dict[str, Any]]:
    return {
        str(event_id): json.loads(body)
        for event_id, body in conn.execute("SELECT id, body FROM webhook_events")
    }


def assert_consistent(conn: outbox.Conn) -> None:
    """Every event has its delivery, every delivery its event, and depth counts them."""
    (events_count,) = conn.execute("SELECT count(*) FROM webhook_events").fetchone()
    orphans = conn.execute(
        "SELECT count(*) FROM webhook_deliveries WHERE seq NOT IN (SELECT seq FROM webhook_events)"
        " UNION ALL SELECT count(*) FROM webhook_events"
        " WHERE seq NOT IN (SELECT seq FROM webhook_deliveries)"
    ).fetchall()
    assert orphans == [(0,), (0,)]
    assert outbox.status(conn).depth == events_count


def test_forget_removes_pending_and_dead_events_naming_the_address(
    where: list[str], conn: outbox.Conn
) -> None:
    record(where, 0, ["bob@example.net"])  # pending
    record(where, 1, ["carol@example.net", "Bob@Example.NET"], opens=2)  # dead below
    record(where, 2, ["jimbob@example.net"], opens=1)  # another person: kept
    record(where, 3, ["carol@example.net"])  # kept
    record(where, 4, ["bob@bücher.example"])  # kept by the first forget, not the second
    add(
        conn,
        event(
            "message.bounced",
            ["dave@example.net"],
            upstream_reply="550 5.1.1 <BOB@example.net>: no such user",
        ),
    )
    add(
        conn,
        event(
            "link.clicked",
            ["erin@example.net"],
            link={"position": 0, "url": "https://example.org/u?who=bob%40example.net"},
        ),
    )
    add(
        conn,
        event(
            "message.deferred",
            ["frank@example.net"],
            upstream_reply="451 4.3.0 <notbob@example.net.au>",
        ),
    )
    assert bury(conn, "Bob@Example.NET") == 3  # its message.relayed and two message.opened
    before = events(conn)
    assert len(before) == 11
    kept = {
        event_id
        for event_id, body in before.items()
        if body["recipients"]
        in (
            ["jimbob@example.net"],
            ["carol@example.net"],
            ["bob@bücher.example"],
            ["frank@example.net"],
        )
    }
    assert len(kept) == 5

    dry = run_cli("forget", "--recipient", "BOB@Example.NET", "--dry-run", *where)
    assert dry.returncode == 0, dry.stderr
    assert "6 outbox_events" in dry.stdout
    assert len(events(conn)) == 11

    done = run_cli("forget", "--recipient", "BOB@Example.NET", *where)
    assert done.returncode == 0, done.stderr
    assert "6 outbox_events" in done.stdout
    assert set(events(conn)) == kept  # the others untouched, pending as before
    (dead,) = conn.execute(
        "SELECT count(*) FROM webhook_deliveries WHERE state = 'dead'"
    ).fetchone()
    assert dead == 0
    assert_consistent(conn)

    # the domain in its other IDNA form
    done = run_cli("forget", "--recipient", "bob@xn--bcher-kva.example", *where)
    assert done.returncode == 0, done.stderr
    left = events(conn)
    assert len(left) == 4
    assert all(body["recipients"] != ["bob@bücher.example"] for body in left.values())
    assert_consistent(conn)


def test_prune_removes_outbox_events_older_than_the_cutoff(
    where: list[str], conn: outbox.Conn
) -> None:
    record(where, 0, ["old-pending@example.net"], days=40, opens=1)
    record(where, 1, ["old-dead@example.net"], days=35)
    record(where, 2, ["recent@example.net"], days=10, opens=1)
    add(conn, event("message.deferred", ["old-deferred@example.net"], days=31))
    assert bury(conn, "old-dead@example.net") == 1
    assert bury(conn, "recent@example.net") == 2  # a recent dead letter stays
    assert len(events(conn)) == 6

    dry = run_cli("prune", "--retention-days", "30", "--dry-run", *where)
    assert dry.returncode == 0, dry.stderr
    assert "4 outbox_events" in dry.stdout
    assert len(events(conn)) == 6

    done = run_cli("prune", "--retention-days", "30", *where)
    assert done.returncode == 0, done.stderr
    assert "2 messages" in done.stdout and "4 outbox_events" in done.stdout
    left = events(conn)
    assert sorted(body["recipients"][0] for body in left.values()) == ["recent@example.net"] * 2
    assert_consistent(conn)
    assert outbox.status(conn).depth == 2


def test_prune_removes_old_outbox_events_in_batches(
    where: list[str], conn: outbox.Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    for days in (40, 39, 38, 37, 36):
        add(conn, event("message.deferred", [f"d{days}@example.net"], days=days))
    add(conn, event("message.deferred", ["recent@example.net"], days=2))
    if where[0] == "--store":  # one transaction per batch: each drops what it read
        from smtp_tracker.store import pg_outbox
        from smtp_tracker.store.postgresql import PgDatabase

        rounds: list[int] = []
        drop = pg_outbox.drop_events

        def counted(connection: Any, seqs: Any) -> int:
            rounds.append(len(seqs))
            return drop(connection, seqs)

        monkeypatch.setattr(pg_outbox, "drop_events", counted)
        with PgDatabase.open(where[1]) as pg_database:
            removed = pg_database.prune(NOW - timedelta(days=30), batch_rows=2)
        assert rounds == [2, 2, 1]
    else:
        statements: list[str] = []
        with SqliteDatabase.open(Path(where[1])) as database:
            database._conn.set_trace_callback(statements.append)
            removed = database.prune(NOW - timedelta(days=30), batch_rows=2)
        assert len([s for s in statements if s.startswith("DELETE FROM webhook_events")]) == 3
    assert (removed.messages, removed.outbox_events) == (0, 5)
    assert [body["recipients"] for body in events(conn).values()] == [["recent@example.net"]]
    assert_consistent(conn)
