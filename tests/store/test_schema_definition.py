"""One schema definition (:mod:`smtp_tracker.store.schema`), migrations for both backends
kept in lockstep: on each backend a store migrated from its oldest version equals a new
one made from the definition, column by column (type, nullability, default), key by
key, check by check and index by index; and both are the definition's tables.

Read back from databases each backend made, never from the scripts, so a migration
that forgets a column, a default or an index fails here.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

from smtp_tracker.store import CURRENT_VERSION, DB_FILENAME, SqliteDatabase, pg_schema, schema
from smtp_tracker.store.migrations import migrate

from .test_migrations import build_pg_baseline, build_v1


def _sqlite_schema(path: Path) -> dict[str, Any]:
    """Each table's columns (name, type, not null, default, primary key position), its
    indexes (name -> columns, unique), its ``WITHOUT ROWID``, and the triggers' text."""
    conn = sqlite3.connect(path)
    try:
        found: dict[str, Any] = {}
        for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite_%' ORDER BY name"
        ):
            columns = sorted(
                (str(r[1]), str(r[2]), int(r[3]), r[4], int(r[5]))
                for r in conn.execute(f"PRAGMA table_info({name})")
            )
            indexes = {
                str(i[1]) if i[3] == "c" else f"<{i[3]}>": (
                    [str(r[2]) for r in conn.execute(f"PRAGMA index_info('{i[1]}')")],
                    int(i[2]),
                )
                for i in conn.execute(f"PRAGMA index_list({name})")
            }
            checks = sorted(re.findall(r"CHECK \(([^()]*(?:\([^()]*\)[^()]*)*)\)", str(sql)))
            found[name] = (columns, indexes, str(sql).rstrip().endswith("WITHOUT ROWID"), checks)
        found["<triggers>"] = sorted(
            " ".join(str(row[0]).split())
            for row in conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'")
        )
        found["<version>"] = int(conn.execute("PRAGMA user_version").fetchone()[0])
        found["<outbox state>"] = conn.execute("SELECT * FROM webhook_outbox_state").fetchall()
        return found
    finally:
        conn.close()


def test_the_definition_is_the_current_version() -> None:
    assert schema.VERSION == CURRENT_VERSION == pg_schema.CURRENT_VERSION


def test_backend_only_tables_are_rendered_for_their_backend_alone() -> None:
    only_pg = [t.name for t in schema.TABLES if t.backends == ("postgresql",)]
    assert only_pg == ["dashboard_users"]
    assert not any("dashboard_users" in s for s in schema.sqlite_statements())
    assert any(s.startswith("CREATE TABLE dashboard_users") for s in schema.postgresql_statements())
    assert {t.name for t in schema.tables_of("sqlite")} == (
        {t.name for t in schema.TABLES} - set(only_pg)
    )


def test_every_instant_has_a_postgresql_name_without_its_unit() -> None:
    instants = {c.name for t in schema.TABLES for c in t.columns if c.kind == "instant"}
    assert instants == set(schema.PG_TIME_NAMES)
    assert all(c.endswith("_us") for c in instants)
    assert not any(n.endswith("_us") for n in schema.PG_TIME_NAMES.values())


def test_a_sqlite_store_migrated_from_v1_equals_a_new_one(tmp_path: Path) -> None:
    SqliteDatabase.open(tmp_path / "new").close()
    build_v1(tmp_path / "old")
    SqliteDatabase.open(tmp_path / "old").close()  # migrated v1 -> current
    new = _sqlite_schema(tmp_path / "new" / DB_FILENAME)
    assert _sqlite_schema(tmp_path / "old" / DB_FILENAME) == new
    assert new["<version>"] == schema.VERSION
    assert new["<outbox state>"] == [(1, 0, 0)]


def test_a_sqlite_store_migrated_step_by_step_equals_the_definition(tmp_path: Path) -> None:
    """Every migration from an empty database, one version at a time."""
    conn = sqlite3.connect(tmp_path / "stepped.sqlite3", isolation_level=None)
    try:
        for version in range(1, CURRENT_VERSION + 1):
            migrate(conn, target=version)
    finally:
        conn.close()
    made = sqlite3.connect(tmp_path / "made.sqlite3", isolation_level=None)
    try:
        for statement in schema.sqlite_statements():
            made.execute(statement)
        made.execute(f"PRAGMA user_version = {schema.VERSION}")
    finally:
        made.close()
    assert _sqlite_schema(tmp_path / "stepped.sqlite3") == _sqlite_schema(tmp_path / "made.sqlite3")


def test_sqlite_columns_are_the_definitions(tmp_path: Path) -> None:
    SqliteDatabase.open(tmp_path / "new").close()
    found = _sqlite_schema(tmp_path / "new" / DB_FILENAME)
    tables = schema.tables_of("sqlite")
    assert set(found) - {"<triggers>", "<version>", "<outbox state>"} == {
        t.name for t in tables
    }  # and none of PostgreSQL's own (dashboard_users)
    for table in tables:
        columns = {c[0]: c for c in found[table.name][0]}
        assert set(columns) == {c.name for c in table.columns}, table.name
        for column in table.columns:
            name, kind, not_null, default, key = columns[column.name]
            assert kind == (
                "INTEGER" if column.kind in ("id", "ref", "int", "count", "instant") else "TEXT"
            ), (table.name, name)
            declared = (  # the rowid is never declared; WITHOUT ROWID keys are NOT NULL
                column.not_null or (table.without_rowid and name in table.primary_key)
            ) and column.kind != "id"
            assert (bool(not_null), default) == (declared, column.default), (table.name, name)
            assert key == (table.primary_key.index(name) + 1 if name in table.primary_key else 0)


def _pg_schema(dsn: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        columns: dict[str, list[tuple[Any, ...]]] = {}
        for row in conn.execute(
            "SELECT c.table_name, c.column_name, c.data_type, c.is_nullable, c.column_default,"
            " c.is_identity, c.identity_generation FROM information_schema.columns c"
            " JOIN information_schema.tables t USING (table_schema, table_name)"
            " WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'"
        ):
            columns.setdefault(str(row[0]), []).append(tuple(row[1:]))
        constraints = sorted(
            conn.execute(
                "SELECT conrelid::regclass::text, conname, contype::text,"
                " pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE connamespace = 'public'::regnamespace"
            ).fetchall()
        )
        indexes = sorted(
            conn.execute(
                "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
            ).fetchall()
        )
        version = conn.execute("SELECT version FROM smtp_tracker_schema").fetchall()
        state = conn.execute("SELECT * FROM webhook_outbox_state").fetchall()
        views = conn.execute(
            "SELECT table_name FROM information_schema.views WHERE table_schema = 'public'"
        ).fetchall()
    return {
        "columns": {t: sorted(c) for t, c in columns.items()},
        "constraints": constraints,
        "indexes": indexes,
        "version": version,
        "outbox state": state,
        "views": views,
    }


def test_a_postgresql_store_migrated_from_v6_equals_a_new_one(pg_cluster: Any) -> None:

    from smtp_tracker.store.postgresql import PgDatabase

    new, old = pg_cluster.new_database(), pg_cluster.new_database()
    PgDatabase.open(new).close()
    build_pg_baseline(old)
    PgDatabase.open(old).close()  # migrated v6 -> current
    made = _pg_schema(new)
    assert _pg_schema(old) == made
    assert made["version"] == [(schema.VERSION,)] and made["views"] == []


def test_postgresql_columns_are_the_definitions(pg_dsn: str) -> None:
    from smtp_tracker.store.postgresql import PgDatabase

    PgDatabase.open(pg_dsn).close()
    found = _pg_schema(pg_dsn)["columns"]
    types = {
        "id": "bigint",
        "ref": "bigint",
        "int": "integer",
        "count": "bigint",
        "text": "text",
        "day": "date",
        "json": "jsonb",
        "instant": "timestamp with time zone",
    }
    tables = schema.tables_of("postgresql")
    assert set(found) - {"smtp_tracker_schema"} == {t.name for t in tables}
    for table in tables:
        columns = {c[0]: c for c in found[table.name]}
        for column in table.columns:
            if column.kind == "address":
                assert columns.pop("ip_address")[1] == "inet"
                assert columns.pop("ip_hash")[1] == "bytea"
                continue
            name, kind, nullable, _default, identity, _ = columns.pop(column.pg_name)
            assert kind == types[column.kind], (table.name, name)
            assert (identity == "YES") == (column.kind == "id"), (table.name, name)
            assert (nullable == "NO") == (column.not_null or name in table.primary_key)
        assert columns == {}, table.name  # nothing the definition does not hold
