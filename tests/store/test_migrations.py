"""Schema versions on both backends: a store is created at the current version, opening
an up-to-date store again changes nothing, a newer one is refused, and an old one is
migrated at open and keeps its data.

The SQLite half builds an old store as SQLite files (``PRAGMA user_version``, the v1
migration); the PostgreSQL half builds its baseline (v6) with :data:`.pg_baseline.BASELINE`
and migrates it through :data:`pg_schema.MIGRATIONS`.  That both end at the same tables
and columns is :mod:`tests.store.test_pg_schema`'s.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import CURRENT_VERSION, DB_FILENAME, SqliteStore, pg_schema
from smtp_tracker.store.migrations import MIGRATIONS, migrate, schema_version
from smtp_tracker.store.rows import to_us

from .pg_baseline import BASELINE
from .store_helpers import T0, make_record, token


@pytest.fixture
def stored_version(
    backend: str, data_dir: Path, request: pytest.FixtureRequest
) -> Callable[[int], int]:
    """``stored_version(add)``: the schema version the test's store holds, read from its
    own database (the one ``open_store`` opens), after adding *add* to it."""
    if backend == "sqlite":

        def sqlite_version(add: int) -> int:
            conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
            try:
                if add:
                    conn.execute(f"PRAGMA user_version = {schema_version(conn) + add}")
                return schema_version(conn)
            finally:
                conn.close()

        return sqlite_version
    dsn: str = request.getfixturevalue("pg_dsn")

    def pg_version(add: int) -> int:
        import psycopg

        from smtp_tracker.store import postgresql

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE smtp_tracker_schema SET version = version + %s", (add,))
            return postgresql.schema_version(conn)

    return pg_version


async def test_a_new_store_is_created_at_the_current_version(
    open_store: Any, stored_version: Callable[[int], int]
) -> None:
    async with await open_store() as store:
        await store.record_message(make_record(1))
    assert stored_version(0) == CURRENT_VERSION


async def test_opening_an_up_to_date_store_again_keeps_it_and_its_data(
    open_store: Any, stored_version: Callable[[int], int]
) -> None:
    async with await open_store() as store:
        await store.record_message(make_record(1))
    for i in (2, 3):
        async with await open_store() as store:
            found = await store.find_message(token(1))
            assert found is not None and found.record == make_record(1, subject=None)
            await store.record_message(make_record(i))
    assert stored_version(0) == CURRENT_VERSION
    async with await open_store() as store:
        listed = [m.record.tracking_id for m in await store.list_messages()]
    assert listed == [token(3), token(2), token(1)]


async def test_a_newer_store_is_refused(
    open_store: Any, stored_version: Callable[[int], int]
) -> None:
    async with await open_store() as store:
        await store.record_message(make_record(1))
    assert stored_version(1) == CURRENT_VERSION + 1
    with pytest.raises(StoreError, match=f"v{CURRENT_VERSION + 1}, newer than this smtp-tracker"):
        await open_store()
    assert stored_version(0) == CURRENT_VERSION + 1  # left as it was


def build_v1(data_dir: Path) -> None:
    """A version-1 database, written with the v1 migration only, holding one message and open."""
    data_dir.mkdir(mode=0o700)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        assert migrate(conn, target=1) == 0
        assert schema_version(conn) == 1
        conn.execute(
            "INSERT INTO messages (tracking_id, queue_id, message_id, sender, recipients,"
            " size_bytes, received_at_us, relayed_at_us, upstream_reply, tracked,"
            " not_tracked_reason) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                token(7),
                "QV1",
                "<old@example.com>",
                "",
                '["bob@example.net"]',
                1234,
                to_us(T0),
                to_us(T0),
                "250 2.0.0 Ok: queued as ABC",
                1,
                None,
            ),
        )
        conn.execute(
            "INSERT INTO opens (tracking_id, at_us, ip, user_agent) VALUES (?,?,?,?)",
            (token(7), to_us(T0), "192.0.2.0/24", "OldMail/1.0"),
        )
    finally:
        conn.close()


def test_there_are_at_least_two_versions() -> None:
    assert CURRENT_VERSION >= 2
    assert len(MIGRATIONS) == CURRENT_VERSION
    assert pg_schema.CURRENT_VERSION == CURRENT_VERSION
    assert sorted(pg_schema.MIGRATIONS) == list(
        range(pg_schema.BASELINE_VERSION + 1, CURRENT_VERSION + 1)
    )


async def test_v1_database_is_migrated_and_keeps_its_data(data_dir: Path) -> None:
    """SQLite only: v1 is a SQLite file; PostgreSQL stores start at v6 (below)."""
    build_v1(data_dir)
    async with await SqliteStore.open(data_dir, store_subject=True) as store:
        found = await store.find_message("QV1")
        assert found is not None
        assert found.record.tracking_id == token(7)
        assert found.record.sender == ""
        assert found.record.recipients == ["bob@example.net"]
        assert found.record.relayed_at == T0
        assert found.record.subject is None
        assert [(o.ip, o.user_agent) for o in found.opens] == [("192.0.2.0/24", "OldMail/1.0")]
        assert await store.integrity_check() == "ok"
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    try:
        assert schema_version(conn) == CURRENT_VERSION
        indexes = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")
        }
        assert {"messages_queue_id", "messages_message_id", "opens_tracking_id"} <= indexes
    finally:
        conn.close()


def test_migrating_twice_is_a_no_op(data_dir: Path) -> None:
    """SQLite only: calls SQLite's migrate() on a v1 file."""
    build_v1(data_dir)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        assert migrate(conn) == 1
        assert migrate(conn) == CURRENT_VERSION
        assert schema_version(conn) == CURRENT_VERSION
    finally:
        conn.close()


def test_failed_migration_leaves_the_old_version(data_dir: Path) -> None:
    """SQLite only: a v1 file and PRAGMA table_info; PostgreSQL's twin is below."""
    build_v1(data_dir)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        conn.execute("CREATE INDEX messages_queue_id ON messages (queue_id)")  # v2 will collide
        with pytest.raises(StoreError, match="cannot migrate"):
            migrate(conn)
        assert schema_version(conn) == 1
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        assert "subject" not in columns  # the v2 ALTER TABLE was rolled back too
    finally:
        conn.close()


def build_pg_baseline(dsn: str) -> None:
    """A PostgreSQL store at :data:`pg_schema.BASELINE_VERSION` (v6, before the ``dkim``
    column), holding message 7 refused for its DKIM signature and message 8 tracked."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for statement in BASELINE:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO smtp_tracker_schema (one, version) VALUES (1, %s)",
            (pg_schema.BASELINE_VERSION,),
        )
        conn.execute("INSERT INTO webhook_outbox_state (one, depth, dropped) VALUES (1, 0, 0)")
        for i, tracked, reason in ((7, 0, "dkim-signed"), (8, 1, None)):
            conn.execute(
                "INSERT INTO messages (tracking_id, queue_id, message_id, sender, recipients,"
                " size_bytes, received_at_us, relayed_at_us, upstream_reply, tracked,"
                " not_tracked_reason, sender_domain) VALUES"
                " (%s, %s, %s, 'a@one.example', '[\"bob@example.net\"]', 1234, %s, %s,"
                " '250 2.0.0 Ok', %s, %s, 'one.example')",
                (
                    token(i),
                    f"QV{i}",
                    f"<old{i}@example.com>",
                    to_us(T0),
                    to_us(T0),
                    tracked,
                    reason,
                ),
            )
        conn.execute(
            "INSERT INTO opens (tracking_id, at_us, ip, user_agent) VALUES (%s, %s, %s, %s)",
            (token(8), to_us(T0), "192.0.2.0/24", "OldMail/1.0"),
        )


async def test_postgresql_baseline_is_migrated_and_keeps_its_data(pg_dsn: str) -> None:
    """PostgreSQL only: its own v6 baseline, migrated to the current version at open."""
    import psycopg

    from smtp_tracker.store import postgresql

    build_pg_baseline(pg_dsn)
    async with await postgresql.PostgresStore.open(pg_dsn) as store:
        signed = await store.find_message("QV7")
        tracked = await store.find_message("QV8")
    assert signed is not None and signed.record.dkim == "dkim-signed"
    assert tracked is not None and tracked.record.dkim is None
    assert tracked.record.recipients == ["bob@example.net"]
    assert [(o.ip, o.user_agent) for o in tracked.opens] == [("192.0.2.0/24", "OldMail/1.0")]
    with psycopg.connect(pg_dsn) as conn:
        assert postgresql.schema_version(conn) == CURRENT_VERSION
        rollup = conn.execute(
            "SELECT day, sender_domain, dkim_signed, dkim_resigned FROM dkim_stats"
        ).fetchall()
    assert rollup == [(T0.date(), "one.example", 1, 0)]  # v7's rollup, backfilled


async def test_postgresql_v8_makes_times_timestamptz_and_addresses_inet_exactly(
    pg_dsn: str,
) -> None:
    """PostgreSQL only: v8 turns the integer microseconds into ``timestamptz`` to the
    microsecond, and an event's ``ip`` into an ``inet`` (address or network) or the 32
    bytes of its hash; the store reads back what it held before."""
    import datetime as dt

    import psycopg

    from smtp_tracker.store import postgresql

    build_pg_baseline(pg_dsn)
    odd = to_us(T0) + 123_457  # microseconds a double's seconds would round
    digest = "0f" * 32
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO opens (tracking_id, at_us, ip, user_agent) VALUES"
            " (%s, %s, %s, 'A'), (%s, %s, %s, 'B'), (%s, %s, NULL, 'C')",
            (token(8), odd, "2001:db8::1", token(8), odd + 1, digest, token(8), odd + 2),
        )
        conn.execute(
            "INSERT INTO clicks (link_token, tracking_id, at_us, ip) VALUES ('l', %s, %s, %s)",
            (token(8), odd, digest),
        )
    async with await postgresql.PostgresStore.open(pg_dsn) as store:
        found = await store.find_message("QV8")
    assert found is not None
    assert [(o.user_agent, o.ip, o.at) for o in found.opens] == [
        ("OldMail/1.0", "192.0.2.0/24", T0),
        ("A", "2001:db8::1", T0 + dt.timedelta(microseconds=123_457)),
        ("B", digest, T0 + dt.timedelta(microseconds=123_458)),
        ("C", None, T0 + dt.timedelta(microseconds=123_459)),
    ]
    assert found.record.relayed_at == T0
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT user_agent, at, host(ip_address), masklen(ip_address), ip_hash FROM opens"
            " ORDER BY at"
        ).fetchall()
        click = conn.execute("SELECT ip_address, ip_hash FROM clicks").fetchone()
    assert rows == [
        ("OldMail/1.0", T0, "192.0.2.0", 24, None),
        ("A", T0 + dt.timedelta(microseconds=123_457), "2001:db8::1", 128, None),
        ("B", T0 + dt.timedelta(microseconds=123_458), None, None, bytes.fromhex(digest)),
        ("C", T0 + dt.timedelta(microseconds=123_459), None, None, None),
    ]
    assert click == (None, bytes.fromhex(digest))


def test_postgresql_failed_migration_leaves_the_old_version(pg_dsn: str) -> None:
    """PostgreSQL only: v7's CREATE TABLE collides; the whole step is rolled back."""
    import psycopg

    from smtp_tracker.store import postgresql

    build_pg_baseline(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE dkim_stats (day date)")  # v7 will collide
    with pytest.raises(StoreError, match=r"cannot open .*dkim_stats"):
        postgresql.PgDatabase.open(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        assert postgresql.schema_version(conn) == pg_schema.BASELINE_VERSION
        columns = {
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'messages'"
            )
        }
    assert "dkim" not in columns  # v7's ALTER TABLE was rolled back too
