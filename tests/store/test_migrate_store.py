"""``smtp-tracker migrate-store``: a SQLite store copied into PostgreSQL without loss,
resumable after an interruption, verified table by table, the source untouched."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.cli import main as cli_main
from smtp_tracker.store import DB_FILENAME, ClickEvent, OpenEvent, SqliteDatabase
from smtp_tracker.tokens import LinkRecord

from .store_helpers import T0, make_record, token

psycopg = pytest.importorskip("psycopg")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _small_store(data_dir: Path) -> None:
    """Every table with rows: messages, recipients, links, opens, clicks, rollup, consent."""
    with SqliteDatabase.open(data_dir) as db:
        for i in range(30):
            links = (LinkRecord(token=f"L{i:021d}", url=f"https://example.com/{i}", position=0),)
            db.record_message(make_record(i, links=links))
        db.record_opens(
            [
                OpenEvent(
                    tracking_id=token(i),
                    at=T0 + timedelta(hours=1, seconds=i),
                    ip="192.0.2.9",
                    user_agent="Mozilla/5.0",
                )
                for i in range(0, 30, 2)
            ]
        )
        db.record_clicks(
            [
                ClickEvent(
                    link_token=f"L{i:021d}",
                    at=T0 + timedelta(hours=2),
                    ip=None,
                    user_agent=None,
                )
                for i in range(0, 30, 3)
            ]
        )
        db.connection.execute(
            "UPDATE opens SET signals = ? WHERE id = 1", (json.dumps({"b": 1, "a": [1, 2]}),)
        )
        db.connection.execute(
            "INSERT INTO consent (address, state, at_us, source) VALUES (?, ?, ?, ?)",
            ("dave@example.net", "denied", 1, "cli"),
        )


def _migrate(data_dir: Path, dsn: str, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        status = cli_main(["migrate-store", "--from", str(data_dir), "--to", dsn, *extra])
    return status, out.getvalue()


def test_copies_every_table_and_verifies(data_dir: Path, pg_dsn: str) -> None:
    _small_store(data_dir)
    before = _digest(data_dir / DB_FILENAME)
    status, out = _migrate(data_dir, pg_dsn, "--batch-rows", "7")
    assert status == 0, out
    assert "MISMATCH" not in out
    assert "messages: 30/30 rows" in out and "opens: 15/15 rows" in out
    assert "clicks: 10/10 rows" in out and "consent: 1/1 rows" in out
    assert _digest(data_dir / DB_FILENAME) == before  # the source untouched
    # the copy is a working store: same answers, and new ids follow the copied ones
    from smtp_tracker.store.postgresql import PgDatabase

    with SqliteDatabase.open(data_dir, create=False) as old, PgDatabase.open(pg_dsn) as new:
        assert new.query_stats() == old.query_stats()
        assert new.query_message(token(4)) == old.query_message(token(4))
        new.record_message(make_record(99))
        new.record_opens([OpenEvent(tracking_id=token(99), at=T0, ip=None, user_agent=None)])
    # again: nothing new to copy, still exact
    status, out = _migrate(data_dir, pg_dsn)
    assert status == 1 and "messages: 31/30 rows" in out and "MISMATCH" in out


def test_a_bad_target_and_a_missing_source_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["migrate-store", "--from", str(tmp_path), "--to", "/tmp/x"]) == 2
    assert "--to: expected postgresql://" in capsys.readouterr().err
    status = cli_main(
        ["migrate-store", "--from", str(tmp_path), "--to", "postgresql://u@127.0.0.1:1/d"]
    )
    assert status == 1
    assert capsys.readouterr().err.strip().count("\n") == 0


def _bulk_store(data_dir: Path, messages: int, opens_per_message: int) -> None:
    """*messages* records and *opens_per_message* opens each, written in bulk."""
    SqliteDatabase.open(data_dir).close()
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    base = 1_714_564_800_000_000
    with conn:
        conn.executemany(
            "INSERT INTO messages (id, tracking_id, queue_id, message_id, sender, recipients,"
            " size_bytes, received_at_us, relayed_at_us, upstream_reply, tracked, sender_domain,"
            " open_count) VALUES (?, ?, ?, ?, 'a@example.com', ?, 1000, ?, ?, '250 ok', 1,"
            " 'example.com', ?)",
            (
                (
                    i,
                    f"t{i:010d}",
                    f"Q{i}",
                    f"<m{i}@example.com>",
                    json.dumps([f"r{i}@example.net"]),
                    base + i,
                    base + i,
                    opens_per_message,
                )
                for i in range(1, messages + 1)
            ),
        )
        conn.executemany(
            "INSERT INTO message_recipients (message_rowid, address) VALUES (?, ?)",
            ((i, f"r{i}@example.net") for i in range(1, messages + 1)),
        )
        conn.executemany(
            "INSERT INTO opens (tracking_id, at_us, ip, user_agent, verdict, signals)"
            " VALUES (?, ?, '192.0.2.0/24', 'UA', 'human', ?)",
            (
                (f"t{i:010d}", base + i + k, '{"ua": "UA"}' if k == 0 else None)
                for i in range(1, messages + 1)
                for k in range(opens_per_message)
            ),
        )
        conn.execute(
            "INSERT INTO daily_stats (day, sender_domain, relayed, opens) VALUES (?, ?, ?, ?)",
            ("2024-05-01", "example.com", messages, messages * opens_per_message),
        )
    conn.close()


class _Interrupted(Exception):
    pass


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_large_store_interrupted_half_way_and_resumed(data_dir: Path, pg_dsn: str) -> None:
    """100,000 messages and 200,000 opens; the first run stops part way through the opens."""
    from smtp_tracker.store import pg_copy
    from smtp_tracker.store.postgresql import PgDatabase

    messages = 100_000
    _bulk_store(data_dir, messages, 2)
    before = _digest(data_dir / DB_FILENAME)
    total = messages * 4 + 1  # messages, recipients, opens, one rollup row
    seen = 0

    def stop_half_way(table: str, rows: int) -> None:
        nonlocal seen
        seen += rows
        if seen >= total * 6 // 10:  # inside the opens
            raise _Interrupted(table)

    source = pg_copy.open_source(data_dir)
    with PgDatabase.open(pg_dsn) as database:
        with pytest.raises(_Interrupted, match="opens"):
            pg_copy.copy_store(
                source, database.connection.raw, batch_rows=20_000, progress=stop_half_way
            )
        partial = database.connection.execute("SELECT count(*) FROM opens").fetchone()[0]
        assert 0 < partial < 2 * messages
    source.close()
    status, out = _migrate(data_dir, pg_dsn, "--batch-rows", "20000", "--quiet")
    assert status == 0, out
    assert f"messages: {messages}/{messages} rows" in out
    assert f"opens: {2 * messages}/{2 * messages} rows" in out
    assert "MISMATCH" not in out
    assert _digest(data_dir / DB_FILENAME) == before
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(DISTINCT id) FROM opens").fetchone()[0] == 2 * messages


def test_a_tampered_row_is_a_mismatch(data_dir: Path, pg_dsn: str) -> None:
    _small_store(data_dir)
    assert _migrate(data_dir, pg_dsn)[0] == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE opens SET user_agent = 'changed' WHERE id = 2")
    status, out = _migrate(data_dir, pg_dsn)
    assert status == 1
    lines = [line for line in out.splitlines() if "MISMATCH" in line]
    assert len(lines) == 1 and lines[0].startswith("opens: 15/15 rows"), out


def test_every_table_of_a_sqlite_store_is_copied(tmp_path: Path) -> None:
    """A table added to the schema and not to ``pg_copy.TABLES`` would be left behind."""
    from smtp_tracker.store import SqliteDatabase, pg_copy

    SqliteDatabase.open(tmp_path / "data").close()
    conn = pg_copy.open_source(tmp_path / "data")
    try:
        tables = {
            str(row[0])
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
    finally:
        conn.close()
    copied = {table.name for table in pg_copy.TABLES}
    assert tables - {"webhook_outbox_state"} == copied  # the state row: set, not copied
    for table in pg_copy.TABLES:
        assert table.definition.name == table.name and table.columns


ALICE, BOB = ("alice", "alice's long password"), ("bob", "bob's long password")


def _users_file(data_dir: Path) -> Path:
    """The data directory's users file with alice and bob, made as ``user add`` does."""
    from smtp_tracker.web.reports.users import USERS_FILENAME, add_user

    path = data_dir / USERS_FILENAME
    for name, password in (ALICE, BOB):
        add_user(path, name, password)
    return path


def _store_users(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT name, password_hash, changed_at FROM dashboard_users ORDER BY name"
        ).fetchall()


async def _logins(dsn: str, *attempts: tuple[str, str]) -> list[bool]:
    """Whether the dashboard over the store at *dsn* lets in each (name, password)."""
    from smtp_tracker.store.postgresql import PostgresStore
    from smtp_tracker.web.reports.users import UserDirectory

    store = await PostgresStore.open(dsn)
    try:
        users = await UserDirectory.open_store(store, dsn)
        return [await users.verify(name, password) for name, password in attempts]
    finally:
        await store.aclose()


async def test_the_users_file_is_copied_with_its_hashes(data_dir: Path, pg_dsn: str) -> None:
    from smtp_tracker.web.reports.users import read_users

    _small_store(data_dir)
    in_file = read_users(_users_file(data_dir))
    status, out = _migrate(data_dir, pg_dsn, "--quiet")
    assert status == 0, out
    assert "dashboard users: 2 copied, 0 already in the store (left as they were)\n" in out
    assert _store_users(pg_dsn) == [  # the same hashes and times: nobody re-hashed
        (entry.name, entry.password_hash, entry.created_at)
        for entry in sorted(in_file.values(), key=lambda entry: entry.name)
    ]
    assert await _logins(pg_dsn, ALICE, BOB, ("alice", BOB[1])) == [True, True, False]


async def test_migrating_again_leaves_the_users_in_the_store(data_dir: Path, pg_dsn: str) -> None:
    from smtp_tracker.store.postgresql import PgDatabase
    from smtp_tracker.web.reports.users import add_user_to

    _small_store(data_dir)
    _users_file(data_dir)
    assert _migrate(data_dir, pg_dsn, "--quiet")[0] == 0
    new_password = "alice's new long password"
    with PgDatabase.open(pg_dsn) as database:  # changed in the store after the move
        add_user_to(database.connection, "alice", new_password, replace=True)
    before = _store_users(pg_dsn)
    status, out = _migrate(data_dir, pg_dsn, "--quiet")
    assert status == 0, out
    assert "dashboard users: 0 copied, 2 already in the store (left as they were)\n" in out
    assert _store_users(pg_dsn) == before
    assert await _logins(pg_dsn, ("alice", new_password), ALICE, BOB) == [True, False, True]


@pytest.mark.parametrize("problem", ["missing", "not a users file", "a directory"])
def test_a_bad_users_file_is_a_one_line_usage_error(
    data_dir: Path, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before the copy starts: the target (nothing listens there) is not tried."""
    _small_store(data_dir)
    path = data_dir / "users.json"
    if problem == "not a users file":
        path.write_text('{"version": 1, "users": {"alice": {"hash": "plain"}}}')
    elif problem == "a directory":
        path.mkdir()
    dsn = "postgresql://u@127.0.0.1:1/d"
    status = cli_main(
        ["migrate-store", "--from", str(data_dir), "--to", dsn, "--reports-users-file", str(path)]
    )
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert captured.err.startswith("smtp-tracker: error: ") and str(path) in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_no_users_file_no_users_line(data_dir: Path, pg_dsn: str) -> None:
    _small_store(data_dir)
    status, out = _migrate(data_dir, pg_dsn, "--quiet")
    assert status == 0, out
    assert "dashboard users" not in out
    assert _store_users(pg_dsn) == []
