"""The schema of a PostgreSQL store: its version, and creating it (from the one
definition, :mod:`smtp_tracker.store.schema`) or migrating it
(:mod:`smtp_tracker.store.pg_schema` holds the migrations)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smtp_tracker.errors import StoreError
from smtp_tracker.store import pg_schema, schema

if TYPE_CHECKING:
    import psycopg

__all__ = ["migrate", "schema_version"]


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The database's schema version; 0 when it holds no store yet."""
    row = conn.execute("SELECT to_regclass('smtp_tracker_schema')").fetchone()
    if row is None or row[0] is None:
        return 0
    found = conn.execute("SELECT version FROM smtp_tracker_schema").fetchone()
    return 0 if found is None else int(found[0])


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Create or migrate the schema to :data:`.pg_schema.CURRENT_VERSION`; the version before.

    Under an advisory lock, so that several processes starting at once create it once.

    :raises StoreError: when the database's schema is newer than this code.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(74617263)")
        version = schema_version(conn)
        if version > pg_schema.CURRENT_VERSION:
            raise StoreError(
                f"the store's schema is v{version}, newer than this smtp-tracker"
                f" (v{pg_schema.CURRENT_VERSION})"
            )
        if version == 0:  # a new store: the one definition (:mod:`..schema`)
            for statement in schema.postgresql_statements():
                conn.execute(statement)
            version_before, version = 0, schema.VERSION
        else:
            version_before = version
        for number in sorted(pg_schema.MIGRATIONS):
            if number > version:
                for statement in pg_schema.MIGRATIONS[number]:
                    conn.execute(statement)
                conn.execute("UPDATE smtp_tracker_schema SET version = %s", (number,))
                version = number
    return version_before
