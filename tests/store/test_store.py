"""The store on both backends: round trip, look-ups, listing, options and errors; then
SQLite's own files, modes and open errors (each of those tests says why it is SQLite's)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import (
    DB_FILENAME,
    OpenEvent,
    SqliteDatabase,
    SqliteStore,
    StoredMessage,
)

from .store_helpers import T0, make_record, token


def hit(
    i: int, *, at: datetime = T0, ua: str | None = "UA", ip: str | None = "192.0.2.7"
) -> OpenEvent:
    return OpenEvent(tracking_id=token(i), at=at, ip=ip, user_agent=ua)


async def test_round_trip(store: Any) -> None:
    record = make_record(1, subject=None)
    await store.record_message(record)
    found = await store.find_message(record.tracking_id)
    assert found == StoredMessage(record=record, opens=())
    assert found.record.relayed_at.tzinfo is UTC


async def test_null_sender_and_untracked(store: Any) -> None:
    record = make_record(
        2, sender="", message_id=None, tracked=False, not_tracked_reason="dkim-signed", subject=None
    )
    await store.record_message(record)
    found = await store.find_message(record.tracking_id)
    assert found is not None
    assert found.record == record


async def test_times_are_converted_to_utc(store: Any) -> None:
    plus2 = timezone(timedelta(hours=2))
    record = make_record(3, relayed_at=datetime(2024, 5, 1, 14, 0, tzinfo=plus2))
    await store.record_message(record)
    found = await store.find_message(record.tracking_id)
    assert found is not None
    assert found.record.relayed_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert found.record.relayed_at.utcoffset() == timedelta(0)


async def test_naive_datetime_is_refused(store: Any) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.record_message(make_record(4, relayed_at=datetime(2024, 5, 1)))
    with pytest.raises(ValueError, match="naive"):
        await store.list_messages(since=datetime(2024, 5, 1))


async def test_duplicate_tracking_id_is_a_store_error(store: Any) -> None:
    await store.record_message(make_record(5))
    with pytest.raises(StoreError, match="already recorded"):
        await store.record_message(make_record(5, queue_id="OTHER"))


async def test_find_by_tracking_id_queue_id_or_message_id(store: Any) -> None:
    for i in range(3):
        await store.record_message(make_record(i))
    await store.record_opens([hit(1, ua="first"), hit(1, at=T0 + timedelta(seconds=1), ua="2nd")])
    for ident in (token(1), "Q00001", "<msg1@example.com>", "msg1@example.com"):
        found = await store.find_message(ident)
        assert found is not None, ident
        assert found.record.tracking_id == token(1)
        assert [o.user_agent for o in found.opens] == ["first", "2nd"]
    assert await store.find_message("nothing-like-it") is None


async def test_find_returns_the_newest_of_a_shared_message_id(store: Any) -> None:
    await store.record_message(make_record(1, message_id="<same@x>"))
    await store.record_message(make_record(2, message_id="<same@x>"))
    found = await store.find_message("<same@x>")
    assert found is not None
    assert found.record.tracking_id == token(2)


async def test_list_newest_first_with_since_and_limit(store: Any) -> None:
    for i in (3, 0, 4, 1, 2):
        await store.record_message(make_record(i))
    await store.record_opens([hit(2), hit(2), hit(4)])

    listed = await store.list_messages()
    assert [m.record.tracking_id for m in listed] == [token(i) for i in (4, 3, 2, 1, 0)]
    assert [len(m.opens) for m in listed] == [1, 0, 2, 0, 0]

    since = T0 + timedelta(minutes=2)  # inclusive
    listed = await store.list_messages(since=since)
    assert [m.record.tracking_id for m in listed] == [token(i) for i in (4, 3, 2)]

    listed = await store.list_messages(since=since, limit=2)
    assert [m.record.tracking_id for m in listed] == [token(4), token(3)]
    assert [len(m.opens) for m in listed] == [1, 0]

    assert await store.list_messages(limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        await store.list_messages(limit=-1)


async def test_subject_is_kept_only_when_asked(open_store: Any) -> None:
    async with await open_store() as store:
        await store.record_message(make_record(1, subject="Secret plans"))
        found = await store.find_message(token(1))
        assert found is not None
        assert found.record.subject is None
    async with await open_store(store_subject=True) as store:
        await store.record_message(make_record(2, subject="Quarterly report"))
        found = await store.find_message(token(2))
        assert found is not None
        assert found.record.subject == "Quarterly report"


async def test_opens_of_unknown_tokens_are_ignored(store: Any) -> None:
    await store.record_message(make_record(1))
    assert await store.record_opens([hit(1), hit(99), hit(1)]) == 2
    assert await store.record_opens([]) == 0
    found = await store.find_message(token(1))
    assert found is not None
    assert len(found.opens) == 2


async def test_user_agent_is_capped(store: Any) -> None:
    await store.record_message(make_record(1))
    await store.record_opens([hit(1, ua="x" * 2000), hit(1, at=T0 + timedelta(1), ua=None)])
    found = await store.find_message(token(1))
    assert found is not None
    assert [o.user_agent for o in found.opens] == ["x" * 512, None]


async def test_is_known_token(store: Any) -> None:
    assert not await store.is_known_token(token(1))
    await store.record_message(make_record(1))
    assert await store.is_known_token(token(1))
    assert await store.is_known_token(token(1))  # from the cache


async def test_known_token_cache_is_bounded(open_store: Any) -> None:
    async with await open_store(known_cache_size=2) as store:
        for i in range(5):
            await store.record_message(make_record(i))
            assert await store.is_known_token(token(i))
        assert len(store._known) == 2


async def test_private_directory_and_files(data_dir: Path) -> None:
    """SQLite only: the store's files in the data directory and their modes."""
    async with await SqliteStore.open(data_dir, ip_policy="hash") as store:
        await store.record_message(make_record(1))
        await store.record_opens([hit(1)])
        names = sorted(p.name for p in data_dir.iterdir())
        assert {DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm", "ip-hash.key"} <= set(
            names
        )
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        for path in data_dir.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


async def test_private_even_with_a_permissive_umask(data_dir: Path) -> None:
    """SQLite only: the modes of the files it creates."""
    old = os.umask(0)
    try:
        SqliteDatabase.open(data_dir).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / DB_FILENAME).stat().st_mode) == 0o600


async def test_wal_mode_and_integrity(sqlite_store: SqliteStore) -> None:
    """SQLite only: its journal mode and busy timeout PRAGMAs."""
    with SqliteDatabase.open(sqlite_store.data_dir, create=False) as db:
        assert db._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert await sqlite_store.integrity_check() == "ok"


def test_missing_store_without_create(
    backend: str, data_dir: Path, open_same_database: Any
) -> None:
    """What a read-only command does with no store: an error, and nothing created."""
    create = {"create": False} if backend == "sqlite" else {"migrate_schema": False}
    with pytest.raises(StoreError, match="no tracking store"):
        open_same_database(**create)
    assert not data_dir.exists()
    open_same_database().close()  # the store made, the same options open it
    open_same_database(**create).close()


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    """SQLite only: a data directory that is a file."""
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        SqliteDatabase.open(path)


def test_uncreatable_data_dir(tmp_path: Path) -> None:
    """SQLite only: a data directory it cannot create."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create"):
        SqliteDatabase.open(tmp_path / "file" / "data")


def test_not_a_database(data_dir: Path) -> None:
    """SQLite only: a file that is not an SQLite database."""
    data_dir.mkdir(mode=0o700)
    (data_dir / DB_FILENAME).write_bytes(b"this is not an SQLite database, just text" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        SqliteDatabase.open(data_dir)


async def test_closed_store_raises(open_store: Any) -> None:
    store = await open_store()
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.find_message("x")


def test_sync_database_for_the_cli(open_same_database: Any) -> None:
    with open_same_database(store_subject=True) as db:
        db.record_message(make_record(1))
        db.record_opens([hit(1)])
    with open_same_database() as db:
        [listed] = db.list_messages(limit=10)
        assert listed.record == make_record(1)
        assert listed.opens[0].ip == "192.0.2.0/24"
        assert db.integrity_check() == "ok"
