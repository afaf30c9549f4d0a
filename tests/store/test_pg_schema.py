"""The PostgreSQL schema keeps step with SQLite's: same version, same tables and columns."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import CURRENT_VERSION, SqliteDatabase, pg_schema

pytest.importorskip("psycopg")


def _sqlite_columns(data_dir: Path) -> dict[str, list[str]]:
    with SqliteDatabase.open(data_dir) as db:
        conn = db.connection
        tables = [
            str(row[0])
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {
            table: sorted(str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})"))
            for table in tables
        }


def _pg_columns(dsn: str) -> dict[str, list[str]]:
    import psycopg

    from smtp_tracker.store.postgresql import PgDatabase

    PgDatabase.open(dsn).close()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c"
            " JOIN information_schema.tables t USING (table_schema, table_name)"
            " WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'"
            " AND c.table_name <> 'smtp_tracker_schema'"
        ).fetchall()
    columns: dict[str, list[str]] = {}
    for table, column in rows:
        columns.setdefault(table, []).append(column)
    return {table: sorted(names) for table, names in columns.items()}


def test_versions_in_lockstep() -> None:
    assert pg_schema.CURRENT_VERSION == CURRENT_VERSION


def test_same_tables_and_columns(data_dir: Path, pg_dsn: str) -> None:
    assert _pg_columns(pg_dsn) == _sqlite_columns(data_dir)


def test_postgresql_types_where_they_matter(pg_dsn: str) -> None:
    import psycopg

    from smtp_tracker.store.postgresql import PgDatabase

    PgDatabase.open(pg_dsn).close()
    with psycopg.connect(pg_dsn) as conn:
        types = dict(
            ((table, column), kind)
            for table, column, kind in conn.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = 'public'"
            )
        )
    assert types["messages", "id"] == "bigint"
    assert types["opens", "signals"] == types["clicks", "signals"] == "jsonb"
    assert types["daily_stats", "day"] == "date"
    assert types["messages_times", "relayed_at"] == "timestamp with time zone"


def test_opening_twice_migrates_once_and_a_newer_schema_is_refused(pg_dsn: str) -> None:
    import psycopg

    from smtp_tracker.store.postgresql import PgDatabase

    PgDatabase.open(pg_dsn).close()
    PgDatabase.open(pg_dsn).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM smtp_tracker_schema").fetchall() == [
            (CURRENT_VERSION,)
        ]
        conn.execute("UPDATE smtp_tracker_schema SET version = version + 1")
    with pytest.raises(StoreError, match="newer than this smtp-tracker"):
        PgDatabase.open(pg_dsn)


def test_a_password_in_the_dsn_is_refused() -> None:
    from smtp_tracker.store.postgresql import PgDatabase

    with pytest.raises(StoreError, match="must not hold the password"):
        PgDatabase.open("postgresql://u:secret@127.0.0.1:1/db")
