"""Schema versions: a v1 database with data is migrated at open and keeps its data."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import CURRENT_VERSION, DB_FILENAME, SqliteStore
from smtp_tracker.store.migrations import MIGRATIONS, migrate, schema_version
from smtp_tracker.store.sqlite import to_us

from .store_helpers import T0, token


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


async def test_v1_database_is_migrated_and_keeps_its_data(data_dir: Path) -> None:
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
    build_v1(data_dir)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        assert migrate(conn) == 1
        assert migrate(conn) == CURRENT_VERSION
        assert schema_version(conn) == CURRENT_VERSION
    finally:
        conn.close()


def test_failed_migration_leaves_the_old_version(data_dir: Path) -> None:
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


async def test_newer_database_is_refused(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    conn.execute(f"PRAGMA user_version = {CURRENT_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this smtp-tracker"):
        await SqliteStore.open(data_dir)
