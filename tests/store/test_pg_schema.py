"""The PostgreSQL schema keeps step with SQLite's: same version, same tables and columns,
same keys and named indexes, whether SQLite's store was made new or migrated from v1.

Both schemas are read back from a database each backend made (not from the scripts), so
a migration added to one backend and not the other fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import CURRENT_VERSION, SqliteDatabase, pg_schema, schema

from .test_migrations import build_v1

pytest.importorskip("psycopg")

_V = TypeVar("_V")

#: table -> primary key columns, unique column sets, named index -> columns
Keys = dict[str, tuple[list[str], list[list[str]], dict[str, list[str]]]]


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


def _sqlite_keys(data_dir: Path) -> Keys:
    with SqliteDatabase.open(data_dir) as db:
        conn = db.connection
        tables = [
            str(row[0])
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        keys: Keys = {}
        for table in tables:
            info = sorted(conn.execute(f"PRAGMA table_info({table})"), key=lambda row: row[5])
            primary = [str(row[1]) for row in info if row[5]]
            unique, named = [], {}
            for index in conn.execute(f"PRAGMA index_list({table})"):
                name, is_unique, origin = str(index[1]), bool(index[2]), index[3]
                columns = [str(row[2]) for row in conn.execute(f"PRAGMA index_info('{name}')")]
                if origin == "u" and is_unique:
                    unique.append(columns)
                elif origin == "c":
                    named[name] = columns
            keys[table] = (primary, sorted(unique), named)
        return keys


def _pg_keys(dsn: str) -> Keys:
    import psycopg

    from smtp_tracker.store.postgresql import PgDatabase

    PgDatabase.open(dsn).close()
    keys: Keys = {}
    with psycopg.connect(dsn) as conn:
        for table, kind, columns in conn.execute(
            "SELECT tc.table_name, tc.constraint_type,"
            " array_agg(k.column_name::text ORDER BY k.ordinal_position)"
            " FROM information_schema.table_constraints tc"
            " JOIN information_schema.key_column_usage k"
            "   USING (constraint_schema, constraint_name, table_name)"
            " WHERE tc.table_schema = 'public' AND tc.table_name <> 'smtp_tracker_schema'"
            " AND tc.constraint_type IN ('PRIMARY KEY', 'UNIQUE')"
            " GROUP BY tc.table_name, tc.constraint_name, tc.constraint_type"
        ):
            primary, unique, _ = keys.setdefault(table, ([], [], {}))
            if kind == "PRIMARY KEY":
                primary.extend(columns)
            else:
                unique.append(list(columns))
        for table, name, columns in conn.execute(
            "SELECT t.relname, i.relname, array_agg(a.attname::text ORDER BY k.ord)"
            " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
            " JOIN pg_class t ON t.oid = x.indrelid"
            " JOIN pg_namespace n ON n.oid = t.relnamespace"
            " CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum"
            " WHERE n.nspname = 'public' AND NOT x.indisprimary"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)"
            " GROUP BY t.relname, i.relname"
        ):
            keys.setdefault(table, ([], [], {}))[2][name] = list(columns)
    return {table: (p, sorted(u), n) for table, (p, u, n) in keys.items()}


def _as_postgresql(names: list[str]) -> list[str]:
    """SQLite's column names as PostgreSQL's (times without the unit, ``ip`` in two)."""
    mapped: list[str] = []
    for name in names:
        mapped += (
            ["ip_address", "ip_hash"] if name == "ip" else [pg_schema.TIME_COLUMNS.get(name, name)]
        )
    return mapped


def _columns_as_postgresql(columns: dict[str, list[str]]) -> dict[str, list[str]]:
    return {table: sorted(_as_postgresql(names)) for table, names in columns.items()}


def _keys_as_postgresql(keys: Keys) -> Keys:
    return {
        table: (
            _as_postgresql(primary),
            sorted(_as_postgresql(u) for u in unique),
            {name: _as_postgresql(columns) for name, columns in named.items()},
        )
        for table, (primary, unique, named) in keys.items()
    }


#: The tables PostgreSQL alone holds (:attr:`.schema.Table.backends`): left out of the
#: comparisons with SQLite, after checking they are exactly these.
PG_ONLY: frozenset[str] = frozenset(
    table.name for table in schema.TABLES if "sqlite" not in table.backends
)


def _shared(found: dict[str, _V]) -> dict[str, _V]:
    """*found* (PostgreSQL's tables) without :data:`PG_ONLY`, which must all be there."""
    assert set(found) >= PG_ONLY
    return {table: value for table, value in found.items() if table not in PG_ONLY}


def test_versions_in_lockstep() -> None:
    assert pg_schema.CURRENT_VERSION == CURRENT_VERSION


def test_postgresql_holds_the_dashboard_users_sqlite_does_not(data_dir: Path) -> None:
    assert sorted(PG_ONLY) == ["dashboard_users"]
    assert not PG_ONLY & set(_sqlite_columns(data_dir))


def test_same_tables_and_columns(data_dir: Path, pg_dsn: str) -> None:
    assert _shared(_pg_columns(pg_dsn)) == _columns_as_postgresql(_sqlite_columns(data_dir))


def test_same_tables_and_columns_as_a_sqlite_store_migrated_from_v1(
    data_dir: Path, pg_dsn: str
) -> None:
    build_v1(data_dir)
    assert _shared(_pg_columns(pg_dsn)) == _columns_as_postgresql(_sqlite_columns(data_dir))


def test_same_keys_and_named_indexes(data_dir: Path, pg_dsn: str) -> None:
    """The keys the upserts and lookups rely on, and every index by name and columns."""
    sqlite_keys = _sqlite_keys(data_dir)
    assert sqlite_keys["messages"] == (
        ["id"],
        [["tracking_id"]],
        {
            "messages_queue_id": ["queue_id"],
            "messages_message_id": ["message_id"],
            "messages_relayed_at": ["relayed_at_us", "id"],
            "messages_sender": ["sender", "relayed_at_us", "id"],
            "messages_sender_domain": ["sender_domain", "relayed_at_us", "id"],
        },
    )
    assert sqlite_keys["daily_stats"][0] == ["day", "sender_domain"]
    assert _shared(_pg_keys(pg_dsn)) == _keys_as_postgresql(sqlite_keys)


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
    times = [(table, pg_schema.TIME_COLUMNS[c]) for table, c in pg_schema.TIMES]
    assert len(times) == 13
    assert {types[t] for t in times} == {"timestamp with time zone"}
    assert {kind for (_, column), kind in types.items() if column.endswith("_us")} == set()
    assert types["opens", "ip_address"] == types["clicks", "ip_address"] == "inet"
    assert types["opens", "ip_hash"] == types["clicks", "ip_hash"] == "bytea"
    assert not any(table.endswith("_times") for table, _ in types)  # the v6..v7 views are gone


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


def test_a_v8_store_is_migrated_to_v9_keeping_its_records(pg_dsn: str) -> None:
    """v8 -> v9 adds ``dashboard_users``, empty, and touches nothing else."""
    import psycopg

    from smtp_tracker.store.postgresql import PgDatabase

    from .store_helpers import make_record

    with PgDatabase.open(pg_dsn) as db:
        db.record_message(make_record(1))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the store as v8 left it
        conn.execute("DROP TABLE dashboard_users")
        conn.execute("UPDATE smtp_tracker_schema SET version = 8")
    PgDatabase.open(pg_dsn).close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT version FROM smtp_tracker_schema").fetchall() == [(9,)]
        assert conn.execute("SELECT count(*) FROM messages").fetchall() == [(1,)]
        assert conn.execute("SELECT count(*) FROM dashboard_users").fetchall() == [(0,)]
        columns = conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_name = 'dashboard_users' ORDER BY ordinal_position"
        ).fetchall()
    assert columns == [
        ("name", "text", "NO"),
        ("password_hash", "text", "NO"),
        ("changed_at", "timestamp with time zone", "NO"),
    ]
