"""A damaged store: checked, recovered, and never in the way of mail (issue 12, item 8).

The damage is real: octets of the database file or of its write-ahead log
overwritten on disk, as a failing disk or a stray write does.

SQLite only, but for the last test: the damage, the suspension and ``store recover``
are about SQLite's own files.  PostgreSQL's ``store check`` is in
``test_store_check_cli.py``; a PostgreSQL server away while mail flows in
``tests/e2e/test_postgres_outage.py``.
"""

from __future__ import annotations

import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import CURRENT_VERSION, DB_FILENAME, OpenEvent, SqliteDatabase, SqliteStore
from smtp_tracker.store.base import store_degraded
from smtp_tracker.store.integrity import (
    SQLITE_MAGIC,
    StoreSuspendedError,
    check_store,
    recover_store,
)
from tests.support.process import run_cli

from .store_helpers import GARBAGE, T0, build_store, make_record, overwrite, token

MESSAGES = 200


def count_messages(data_dir: Path) -> int:
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def test_a_sound_store_checks_ok(tmp_path: Path) -> None:
    build_store(tmp_path / "data")
    report = check_store(tmp_path / "data")
    assert (report.ok, report.problems, report.schema_version) == (True, (), CURRENT_VERSION)
    assert report.lines()[0].endswith(": ok")


def test_check_reports_an_overwritten_header_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build_store(data)
    overwrite(data / DB_FILENAME, 0)
    before = (data / DB_FILENAME).read_bytes()
    report = check_store(data)
    assert not report.ok
    assert "the file header is not SQLite's (overwritten?)" in report.problems
    assert (data / DB_FILENAME).read_bytes() == before
    assert report.lines()[0].endswith(": DAMAGED")


def test_check_reports_an_overwritten_write_ahead_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build_store(data, keep_wal=True)
    overwrite(data / (DB_FILENAME + "-wal"), 0)
    report = check_store(data)
    assert not report.ok
    assert any("write-ahead log header" in p for p in report.problems), report.problems


def test_check_reports_damaged_pages(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build_store(data)
    size = (data / DB_FILENAME).stat().st_size
    overwrite(data / DB_FILENAME, size * 3 // 4, GARBAGE * 64)  # in the b-trees of the records
    report = check_store(data)
    assert not report.ok
    assert any("quick_check" in p or "cannot read" in p for p in report.problems), report


def test_check_of_a_missing_store(tmp_path: Path) -> None:
    report = check_store(tmp_path)
    assert (report.ok, report.problems) == (False, ("no database file",))


@pytest.mark.parametrize("shell", [True, False], ids=["sqlite3-recover", "iterdump"])
@pytest.mark.parametrize("damage", ["header", "pages"])
def test_recover_rebuilds_the_store_and_keeps_the_damaged_file_aside(
    tmp_path: Path, damage: str, shell: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shell and shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 shell is not installed")
    if not shell:
        monkeypatch.setattr("smtp_tracker.store.integrity.shutil.which", lambda _name: None)
    data = tmp_path / "data"
    build_store(data)
    db_file = data / DB_FILENAME
    if damage == "header":
        overwrite(db_file, 0, b"\0" * len(SQLITE_MAGIC))
    else:
        overwrite(db_file, db_file.stat().st_size - 4096 * 3, GARBAGE * 64)
    damaged = db_file.read_bytes()
    aside = recover_store(data, now=datetime(2026, 12, 7, 5, 30, 0, tzinfo=UTC))
    assert aside == data / "tracker.sqlite3.damaged-20261207T053000Z"
    assert aside.read_bytes() == damaged  # kept as it was
    assert check_store(data).ok, check_store(data).problems
    recovered = count_messages(data)
    assert 0 < recovered <= MESSAGES
    if damage == "header":
        assert recovered == MESSAGES  # only the magic string was lost
    assert oct(db_file.stat().st_mode & 0o777) == "0o600"
    with SqliteDatabase.open(data) as db:  # serve opens it again, at the current schema
        found = db.find_message(token(1))
    assert found is None or found.record.queue_id == "Q00001"


def test_recover_without_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no tracking store"):
        recover_store(tmp_path)


async def test_a_store_that_cannot_be_opened_is_suspended_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    build_store(data)
    overwrite(data / DB_FILENAME, 0)
    with pytest.raises(StoreError):
        await SqliteStore.open(data)  # what serve used to do: exit 1
    store = await SqliteStore.open_or_suspend(data)
    try:
        assert store.suspended is not None and store_degraded(store) == store.suspended
        assert "TRACKING SUSPENDED" in caplog.text and "store recover" in caplog.text
        with pytest.raises(StoreSuspendedError):
            await store.record_message(make_record(999))
        with pytest.raises(StoreSuspendedError):
            await store.record_opens(
                [OpenEvent(tracking_id=token(1), at=T0, ip=None, user_agent=None)]
            )
        assert store.counters.suspended_calls == 2
    finally:
        await store.aclose()
    assert (data / DB_FILENAME).read_bytes()[:32] == GARBAGE  # left as it was, for recovery


async def test_a_damaged_write_ahead_log_suspends_rather_than_being_discarded(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    build_store(data, keep_wal=True)
    overwrite(data / (DB_FILENAME + "-wal"), 0)
    wal = (data / (DB_FILENAME + "-wal")).read_bytes()
    store = await SqliteStore.open_or_suspend(data)
    try:
        assert store.suspended is not None and "write-ahead log" in store.suspended
    finally:
        await store.aclose()
    assert (data / (DB_FILENAME + "-wal")).read_bytes() == wal


async def test_a_store_overwritten_while_open_is_reported_degraded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = await SqliteStore.open_or_suspend(data, health_interval_s=None)
    try:
        await store.record_message(make_record(1))
        assert await store.check_health() is None
        assert store.degraded is None
        overwrite(data / DB_FILENAME, 0)  # the headers go under the running process
        await store.record_message(make_record(2))  # "succeeds"
        problem = await store.check_health()
        assert problem is not None and store.degraded == problem
        assert store.counters.health_failures == 1
    finally:
        await store.aclose()


async def test_a_pruned_last_message_is_not_taken_for_a_lost_write(
    backend: str, data_dir: Path, open_store: Any
) -> None:
    """Both backends: the health check after a prune that emptied the store."""
    if backend == "sqlite":  # as serve opens it, without the periodic check
        store = await SqliteStore.open_or_suspend(data_dir, health_interval_s=None)
    else:
        store = await open_store()
    try:
        await store.record_message(make_record(1))
        removed = await store.prune(datetime(2100, 1, 1, tzinfo=UTC))
        assert removed.messages == 1
        assert await store.check_health() is None
        assert store.degraded is None
    finally:
        await store.aclose()


def test_the_store_commands_check_and_recover_a_damaged_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build_store(data)
    checked = run_cli("store", "check", "--data-dir", str(data))
    assert (checked.returncode, checked.stderr) == (0, "")
    assert checked.stdout.splitlines()[0] == f"{data / DB_FILENAME}: ok"

    overwrite(data / DB_FILENAME, 0, b"\0" * len(SQLITE_MAGIC))
    checked = run_cli("store", "check", "--data-dir", str(data))
    assert checked.returncode == 1
    assert "DAMAGED" in checked.stdout and "the file header is not SQLite's" in checked.stdout
    assert "store recover" in checked.stdout

    recovered = run_cli("store", "recover", "--data-dir", str(data))
    assert recovered.returncode == 0, recovered.stderr
    (aside,) = data.glob("tracker.sqlite3.damaged-*Z")  # (its -wal, -shm beside it)
    assert f"kept as {aside}" in recovered.stdout
    assert f"{data / DB_FILENAME}: ok" in recovered.stdout
    assert count_messages(data) == MESSAGES
    assert run_cli("store", "check", "--data-dir", str(data)).returncode == 0


def test_the_store_commands_without_a_store_say_so_in_one_line(tmp_path: Path) -> None:
    for action in ("check", "recover"):
        done = run_cli("store", action, "--data-dir", str(tmp_path / "none"))
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "no tracking store" in done.stderr
        assert "Traceback" not in done.stderr
