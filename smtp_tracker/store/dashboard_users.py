"""The reports dashboard's users in a PostgreSQL store (schema v9, issue 14).

With ``store = "postgresql://..."`` the users who may log in to the reports
dashboard live in the store's ``dashboard_users`` table, so that every reports
host on the store shares them; with SQLite they stay in the users file
(:mod:`smtp_tracker.web.reports.users`, which checks names and passwords and
makes the argon2id hashes for both).  One row per user::

    dashboard_users (name text PRIMARY KEY,
                     password_hash text,      -- "$argon2id$v=19$..." (a CHECK: "$argon2%")
                     changed_at timestamptz)  -- when the password was set

The functions take a :class:`~.postgresql.connection.PgConnection` in
autocommit mode (``?`` placeholders; ``changed_us`` is read as
``changed_at``) and are blocking: the CLI calls them on its connection, the
reports listener through :meth:`.postgresql.PostgresStore.read_dashboard_users`.
Each is one statement, so each is atomic; :func:`add_new` (``migrate-store``'s
copy of a users file) is one transaction.  A hash is never
logged nor put in an error message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from smtp_tracker.errors import StoreError
from smtp_tracker.store.instant import Instant, from_us, to_us

if TYPE_CHECKING:
    from smtp_tracker.store.postgresql.connection import PgConnection

__all__ = ["SCHEMA_VERSION", "UserEntry", "add", "add_new", "read_all", "remove", "replace"]

#: The schema version that has ``dashboard_users`` (PostgreSQL only).
SCHEMA_VERSION: Final = 9


@dataclass(frozen=True, slots=True)
class UserEntry:
    """One user: the argon2 encoded hash (``$argon2id$...``) and when it was set (UTC)."""

    name: str
    password_hash: str
    created_at: datetime


def _failed(what: str, exc: Exception) -> StoreError:
    from smtp_tracker.store.postgresql.connection import error_text

    return StoreError(f"cannot {what} the dashboard's users: {error_text(exc)}")


def read_all(conn: PgConnection) -> dict[str, UserEntry]:
    """Every user: name -> :class:`UserEntry` (an empty mapping when there is none).

    :raises StoreError: when the table cannot be read (the server's message, one line).
    """
    import psycopg

    try:
        rows = conn.execute(
            "SELECT name, password_hash, changed_us FROM dashboard_users"
        ).fetchall()
    except psycopg.Error as exc:
        raise _failed("read", exc) from exc
    return {
        str(name): UserEntry(str(name), str(encoded), from_us(Instant.of(changed)))
        for name, encoded, changed in rows
    }


def add(conn: PgConnection, entry: UserEntry) -> bool:
    """Add *entry* unless a user of its name exists (then nothing changes).

    :returns: whether it was added (false: the name was taken).
    :raises StoreError: when the table cannot be written.
    """
    import psycopg

    try:
        cursor = conn.execute(
            "INSERT INTO dashboard_users (name, password_hash, changed_us) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (entry.name, entry.password_hash, to_us(entry.created_at)),
        )
    except psycopg.Error as exc:
        raise _failed("write", exc) from exc
    return cursor.rowcount == 1


def add_new(conn: PgConnection, entries: Iterable[UserEntry]) -> list[str]:
    """Add each of *entries* as :func:`add` (hash and time as they are), in one transaction:
    a user whose name exists is left as it is.  Running it again changes nothing.

    :returns: the names that existed (left as they were), in *entries*' order.
    :raises StoreError: when the table cannot be written (then none is added).
    """
    with conn.transaction():
        return [entry.name for entry in entries if not add(conn, entry)]


def replace(conn: PgConnection, entry: UserEntry) -> bool:
    """Set *entry*'s hash and time, adding the user if there is none of its name.

    :returns: whether the user existed before.
    :raises StoreError: when the table cannot be written.
    """
    import psycopg

    values = (entry.password_hash, to_us(entry.created_at), entry.name)
    try:
        cursor = conn.execute(
            "UPDATE dashboard_users SET password_hash = ?, changed_us = ? WHERE name = ?", values
        )
        if cursor.rowcount == 1:
            return True
        conn.execute(
            "INSERT INTO dashboard_users (password_hash, changed_us, name) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,"
            " changed_us = excluded.changed_us",
            values,
        )
    except psycopg.Error as exc:
        raise _failed("write", exc) from exc
    return False


def remove(conn: PgConnection, name: str) -> bool:
    """Remove user *name*.

    :returns: whether there was one.
    :raises StoreError: when the table cannot be written.
    """
    import psycopg

    try:
        cursor = conn.execute("DELETE FROM dashboard_users WHERE name = ?", (name,))
    except psycopg.Error as exc:
        raise _failed("write", exc) from exc
    return cursor.rowcount == 1
