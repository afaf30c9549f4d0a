"""Retention in the store: prune by relay time, forget a recipient, in batches.

On both backends, but for what only SQLite has: its statements traced to count the
transactions (``BEGIN IMMEDIATE``), and the async store's single writer thread, where
a prune's batches must leave room for the relay's writes (PostgreSQL's pool runs
them beside a prune: its own test below).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import SqliteDatabase, SqliteStore
from smtp_tracker.store.records import ClickEvent, LinkRecord, OpenEvent
from smtp_tracker.store.retention import Removed, recipient_forms
from tests.store.store_helpers import T0, make_record, token
from tests.support.waiting import wait_until

TABLES = ("messages", "opens", "clicks", "links", "message_recipients", "daily_stats")


def link_token(i: int, n: int) -> str:
    return token(10_000 + i * 10 + n)


def full_record(i: int, **overrides: Any) -> Any:
    """Message *i* (relayed T0 + i minutes) with two links."""
    links = tuple(
        LinkRecord(token=link_token(i, n), url=f"https://example.org/{i}/{n}", position=n)
        for n in range(2)
    )
    return make_record(i, links=links, **overrides)


def add_events(database: SqliteDatabase, i: int, *, opens: int, clicks: int) -> None:
    at = T0 + timedelta(minutes=i, seconds=30)
    database.record_opens(
        [
            OpenEvent(tracking_id=token(i), at=at, ip="192.0.2.1", user_agent="UA")
            for _ in range(opens)
        ]
    )
    database.record_clicks(
        [
            ClickEvent(link_token=link_token(i, 0), at=at, ip=None, user_agent=None)
            for _ in range(clicks)
        ]
    )


def _ten(opened: Any) -> Any:
    for i in range(10):
        opened.record_message(full_record(i))
        add_events(opened, i, opens=i + 1, clicks=i % 3)
    return opened


@pytest.fixture
def database(data_dir: Path, open_sync_database: Any) -> Iterator[SqliteDatabase]:
    """Ten messages, T0 + 0..9 minutes, each with links, i+1 opens and i % 3 clicks
    (on each backend)."""
    with open_sync_database(data_dir) as opened:
        yield _ten(opened)


@pytest.fixture
def sqlite_database(data_dir: Path) -> Iterator[SqliteDatabase]:
    """:func:`database` on SQLite alone (its statements traced)."""
    with SqliteDatabase.open(data_dir) as opened:
        yield _ten(opened)


def conn_of(database: SqliteDatabase) -> sqlite3.Connection:
    conn: sqlite3.Connection = database._conn  # the test looks at the tables themselves
    return conn


def counts(database: SqliteDatabase) -> dict[str, int]:
    conn = conn_of(database)
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}  # noqa: S608


def rollup(database: SqliteDatabase) -> list[tuple[Any, ...]]:
    return conn_of(database).execute("SELECT * FROM daily_stats ORDER BY 1, 2").fetchall()


def tracking_ids(database: SqliteDatabase, table: str) -> set[str]:
    conn = conn_of(database)
    return {row[0] for row in conn.execute(f"SELECT tracking_id FROM {table}")}  # noqa: S608


def test_prune_deletes_exactly_what_was_relayed_before_the_cutoff(
    database: SqliteDatabase,
) -> None:
    before = counts(database)
    assert before == {
        "messages": 10,
        "opens": 55,
        "clicks": 9,
        "links": 20,
        "message_recipients": 20,
        "daily_stats": 1,
    }
    stats = rollup(database)
    cutoff = T0 + timedelta(minutes=5)  # messages 0..4 relayed before; 5 exactly at: kept

    planned = database.count_prunable(cutoff)
    assert counts(database) == before  # counting deletes nothing
    removed = database.prune(cutoff)
    assert removed == planned
    # messages 0..4: opens 1+2+3+4+5, clicks 0+1+2+0+1, two recipients each; their
    # links stay, to keep redirecting for link_retention_days (issue 20)
    assert removed.counts() == {
        "messages": 5,
        "opens": 15,
        "clicks": 4,
        "links": 0,
        "recipients": 10,
    }
    kept = {token(i) for i in range(5, 10)}
    for table in ("messages", "opens", "clicks"):
        assert tracking_ids(database, table) <= kept, table
    assert tracking_ids(database, "links") == {token(i) for i in range(10)}
    assert tracking_ids(database, "messages") == kept
    assert counts(database)["opens"] == 55 - 15
    rowids = {
        r[0] for r in conn_of(database).execute("SELECT message_rowid FROM message_recipients")
    }
    assert rowids == {r[0] for r in conn_of(database).execute("SELECT id FROM messages")}
    assert rollup(database) == stats  # the aggregates stay
    assert database.find_message(token(4)) is None
    kept_message = database.find_message(token(5))
    assert kept_message is not None and len(kept_message.opens) == 6
    assert database.integrity_check() == "ok"
    # again: nothing left to do
    assert database.prune(cutoff) == Removed()


def rows_of(i: int) -> int:
    """Rows of fixture message *i*: itself, i + 1 opens, i % 3 clicks, 2 recipients, 2 links."""
    return 1 + (i + 1) + i % 3 + 2 + 2


def test_each_batch_is_about_batch_rows_rows_of_whole_messages(
    database: SqliteDatabase,
) -> None:
    assert [rows_of(i) for i in range(7)] == [6, 8, 10, 9, 11, 13, 12]
    cutoff = T0 + timedelta(minutes=7)
    batches = []
    while (removed := database.prune_batch(cutoff, batch_rows=20)).messages:
        batches.append((removed.messages, sum(removed.counts().values())))
    # whole messages, oldest first, as many as fit in 20 rows (their 2 links each
    # counted in the estimate, but kept: issue 20)
    assert batches == [(2, 6 + 8 - 4), (2, 10 + 9 - 4), (1, 11 - 2), (1, 13 - 2), (1, 12 - 2)]
    assert tracking_ids(database, "messages") == {token(i) for i in range(7, 10)}


def test_a_message_larger_than_a_batch_goes_alone(database: SqliteDatabase) -> None:
    removed = database.prune_batch(T0 + timedelta(hours=1), batch_rows=1)
    assert (removed.messages, sum(removed.counts().values())) == (1, 6 - 2)  # links kept
    assert token(0) not in tracking_ids(database, "messages")


def test_prune_runs_one_transaction_per_batch(sqlite_database: SqliteDatabase) -> None:
    """SQLite only: counts the BEGIN IMMEDIATE statements its trace callback sees."""
    statements: list[str] = []
    conn_of(sqlite_database).set_trace_callback(statements.append)
    removed = sqlite_database.prune(T0 + timedelta(minutes=7), batch_rows=20)
    conn_of(sqlite_database).set_trace_callback(None)
    assert removed.messages == 7
    # five batches, then one finds none, then one finds no link past link_retention_days
    assert statements.count("BEGIN IMMEDIATE") == 5 + 1 + 1
    assert len([s for s in statements if s.startswith("DELETE FROM messages")]) == 5
    assert tracking_ids(sqlite_database, "messages") == {token(i) for i in range(7, 10)}


def refuse_deleting_messages(database: SqliteDatabase) -> None:
    """A trigger that makes every ``DELETE FROM messages`` fail with ``refused``."""
    if isinstance(database, SqliteDatabase):
        conn_of(database).execute(
            "CREATE TEMP TRIGGER refuse BEFORE DELETE ON messages"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        return
    conn_of(database).execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$"
    )
    conn_of(database).execute(
        "CREATE TRIGGER refuse BEFORE DELETE ON messages FOR EACH ROW EXECUTE FUNCTION refuse()"
    )


def test_a_failing_batch_is_rolled_back_whole(database: SqliteDatabase) -> None:
    refuse_deleting_messages(database)
    before = counts(database)
    with pytest.raises(StoreError, match="refused") as raised:
        database.prune(T0 + timedelta(hours=1))
    # opens, clicks, links deleted earlier in the batch came back
    assert counts(database) == before
    assert str(raised.value) == "cannot prune the store: refused"


@pytest.mark.parametrize("batch_rows", [0, -1, 1.5, True])
def test_batch_rows_must_be_a_positive_integer(database: SqliteDatabase, batch_rows: Any) -> None:
    with pytest.raises(ValueError, match="batch_rows"):
        database.prune(T0, batch_rows=batch_rows)


def test_a_naive_cutoff_is_refused(database: SqliteDatabase) -> None:
    with pytest.raises(ValueError, match="naive"):
        database.prune(T0.replace(tzinfo=None))


# -- forget ----------------------------------------------------------------------------


@pytest.fixture
def people(data_dir: Path, open_sync_database: Any) -> Iterator[SqliteDatabase]:
    """Messages to dave alone, dave with others, others alone; one to an IDN domain."""
    recipients = {
        0: ["Dave@Example.net"],
        1: ["erin@example.org", "dave@example.net"],
        2: ["erin@example.org"],
        3: ["dave@example.network"],  # not dave@example.net
        4: ["xdave@example.net"],
        5: ["dave@bücher.example"],
        6: ["frank@example.org"],
    }
    with open_sync_database(data_dir) as opened:
        for i, rcpts in recipients.items():
            opened.record_message(full_record(i, recipients=rcpts))
            add_events(opened, i, opens=2, clicks=1)
        yield opened


def test_forget_removes_every_message_sent_to_the_address_and_nothing_else(
    people: SqliteDatabase,
) -> None:
    stats = rollup(people)
    planned = people.count_recipient("DAVE@example.NET")
    removed = people.forget_recipient("DAVE@example.NET")
    assert removed.counts() == planned.counts()
    assert removed.counts() == {
        "messages": 2,
        "opens": 4,
        "clicks": 2,
        "links": 0,  # kept: their destinations do not name dave (issue 20)
        "recipients": 3,  # erin's row of the shared message 1 goes with it
    }
    assert sorted(removed.queue_ids) == ["Q00000", "Q00001"]
    assert tracking_ids(people, "messages") == {token(i) for i in (2, 3, 4, 5, 6)}
    for table in ("opens", "clicks"):
        assert not tracking_ids(people, table) & {token(0), token(1)}, table
    addresses = {r[0] for r in conn_of(people).execute("SELECT address FROM message_recipients")}
    assert "dave@example.net" not in addresses
    assert rollup(people) == stats
    assert people.forget_recipient("dave@example.net") == Removed()


def test_a_failing_forget_is_rolled_back_whole(people: SqliteDatabase) -> None:
    refuse_deleting_messages(people)
    before = counts(people)
    with pytest.raises(StoreError, match="refused") as raised:
        people.forget_recipient("dave@example.net")
    assert counts(people) == before
    assert people.count_recipient("dave@example.net").messages == 2
    assert str(raised.value) == "cannot forget dave@example.net: refused"


@pytest.mark.parametrize("written", ["dave@xn--bcher-kva.example", "<DAVE@BÜCHER.example>"])
def test_forget_matches_the_domain_in_either_idna_form(
    people: SqliteDatabase, written: str
) -> None:
    removed = people.forget_recipient(written)
    assert removed.messages == 1
    assert token(5) not in tracking_ids(people, "messages")


def test_recipient_forms() -> None:
    assert recipient_forms(" <Bob@Bücher.Example> ") == [
        "bob@bücher.example",
        "bob@xn--bcher-kva.example",
    ]
    assert recipient_forms("postmaster") == ["postmaster"]
    assert recipient_forms("x@under_score.example") == ["x@under_score.example"]


def test_forget_in_batches(data_dir: Path) -> None:
    """SQLite only: counts the BEGIN IMMEDIATE statements its trace callback sees."""
    people = SqliteDatabase.open(data_dir)
    try:
        forget_in_batches(people)
    finally:
        people.close()


def forget_in_batches(people: SqliteDatabase) -> None:
    for i in range(10, 17):
        people.record_message(full_record(i, recipients=["gina@example.com"]))
    statements: list[str] = []
    conn_of(people).set_trace_callback(statements.append)
    removed = people.forget_recipient("gina@example.com", batch_rows=10)  # 4 rows a message
    conn_of(people).set_trace_callback(None)
    assert removed.messages == 7
    # 2 + 2 + 2 + 1, then none, then the objection links naming gina (issue 20)
    assert statements.count("BEGIN IMMEDIATE") == 4 + 1 + 1
    assert people.count_recipient("gina@example.com") == Removed()


# -- the async store: batches leave room for the relay's writes --------------------------


async def test_store_prune_lets_other_writes_run_between_batches(data_dir: Path) -> None:
    """SQLite only: its one writer thread runs a prune's batches and the relay's writes."""
    async with await SqliteStore.open(data_dir) as store:
        for i in range(6):
            await store.record_message(full_record(i))
        assert await store.is_known_token(token(0))
        order: list[str] = []
        first_batch_started = threading.Event()
        release = threading.Event()
        writer = store._writer
        real_batch = writer.prune_batch

        def observed_batch(*args: Any, **kwargs: Any) -> Removed:
            order.append("prune")
            if not first_batch_started.is_set():
                first_batch_started.set()
                assert release.wait(10)
            return real_batch(*args, **kwargs)

        real_record = writer.record_message

        def observed_record(record: Any) -> None:
            order.append("record")
            real_record(record)

        writer.prune_batch = observed_batch  # type: ignore[method-assign]
        writer.record_message = observed_record  # type: ignore[method-assign]
        pruning = asyncio.ensure_future(store.prune(T0 + timedelta(hours=1), batch_rows=2))
        await wait_until(first_batch_started.is_set, timeout_s=10, message="no batch started")
        # what the relay would do meanwhile: a write queued on the writer thread
        other = store.record_message(full_record(99, relayed_at=T0 + timedelta(days=1)))
        recording = asyncio.ensure_future(other)
        await wait_until(
            lambda: store._writer_executor._work_queue.qsize() == 1,
            timeout_s=10,
            message="the other write was not queued",
        )
        release.set()
        removed = await pruning
        await recording
        assert removed.messages == 6
        # the relay's write ran right after the first batch, not after the whole prune
        # (a message is 5 rows, over 2: one message a batch, then one batch finds none)
        assert order == ["prune", "record"] + ["prune"] * 6
        assert [m.record.tracking_id for m in await store.list_messages()] == [token(99)]
        assert not await store.is_known_token(token(0))  # the positive cache was cleared


async def test_postgresql_records_beside_a_prune_batch(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL only: the relay's write is not queued behind a prune batch in flight."""
    from smtp_tracker.store.postgresql import PgDatabase, PostgresStore

    async with await PostgresStore.open(pg_dsn) as store:
        for i in range(6):
            await store.record_message(full_record(i))
        first_batch_started = threading.Event()
        release = threading.Event()
        real_batch = PgDatabase.prune_batch

        def held_batch(self: PgDatabase, *args: Any, **kwargs: Any) -> Removed:
            if not first_batch_started.is_set():
                first_batch_started.set()
                assert release.wait(10)
            return real_batch(self, *args, **kwargs)

        monkeypatch.setattr(PgDatabase, "prune_batch", held_batch)
        pruning = asyncio.ensure_future(store.prune(T0 + timedelta(hours=1), batch_rows=2))
        try:
            await wait_until(first_batch_started.is_set, timeout_s=10, message="no batch started")
            await asyncio.wait_for(
                store.record_message(full_record(99, relayed_at=T0 + timedelta(days=1))), 10
            )
            assert not pruning.done()  # written while the first batch was still held
        finally:
            release.set()
        removed = await pruning
        assert removed.messages == 6
        assert [m.record.tracking_id for m in await store.list_messages()] == [token(99)]
        assert not await store.is_known_token(token(0))  # the positive cache was cleared
