"""The SQLite schema, as numbered migrations recorded in ``PRAGMA user_version``.

Version *n* of the schema is reached by applying :data:`MIGRATIONS` ``[0..n-1]``
in order.  :func:`migrate` runs the missing ones in one ``BEGIN IMMEDIATE``
transaction, so two processes opening the same database at once migrate it
exactly once, and a failure leaves the database at its old version.

Times are stored as integer microseconds since the Unix epoch, UTC (``*_us``);
recipients as a JSON array of strings.

* **v1** - tables ``messages`` and ``opens``.
* **v2** - column ``messages.subject``; indexes for the look-ups by queue id,
  Message-ID, time, and for the opens of a message.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Final

from smtp_tracker.errors import StoreError

__all__ = [
    "CURRENT_VERSION",
    "MIGRATIONS",
    "check_known_version",
    "immediate_transaction",
    "migrate",
    "schema_version",
]

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # v1: initial tables
    (
        """
        CREATE TABLE messages (
            id                 INTEGER PRIMARY KEY,
            tracking_id        TEXT    NOT NULL UNIQUE,
            queue_id           TEXT    NOT NULL,
            message_id         TEXT,
            sender             TEXT    NOT NULL,
            recipients         TEXT    NOT NULL,
            size_bytes         INTEGER NOT NULL,
            received_at_us     INTEGER NOT NULL,
            relayed_at_us      INTEGER NOT NULL,
            upstream_reply     TEXT    NOT NULL,
            tracked            INTEGER NOT NULL,
            not_tracked_reason TEXT
        )
        """,
        """
        CREATE TABLE opens (
            id          INTEGER PRIMARY KEY,
            tracking_id TEXT    NOT NULL,
            at_us       INTEGER NOT NULL,
            ip          TEXT,
            user_agent  TEXT
        )
        """,
    ),
    # v2: subject column and indexes
    (
        "ALTER TABLE messages ADD COLUMN subject TEXT",
        "CREATE INDEX messages_queue_id ON messages (queue_id)",
        "CREATE INDEX messages_message_id ON messages (message_id)",
        "CREATE INDEX messages_relayed_at ON messages (relayed_at_us, id)",
        "CREATE INDEX opens_tracking_id ON opens (tracking_id, at_us)",
    ),
)

CURRENT_VERSION: Final[int] = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's ``PRAGMA user_version``."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


@contextlib.contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any exception.

    IMMEDIATE takes the write lock at once, so a writer waits for another
    process's writer (up to the busy timeout) instead of failing at COMMIT
    (SQLite "Transaction" documentation).  The connection is in autocommit mode.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection, *, target: int = CURRENT_VERSION) -> int:
    """Bring the database on *conn* to schema version *target*.

    *conn* must be in autocommit mode (``isolation_level=None``).  Blocking:
    call it from a worker thread.

    :param target: the version to reach; lower than current only in tests that
        build an old database.
    :returns: the version the database was at before.
    :raises StoreError: when the database is newer than this code knows, or a
        migration fails (the database is then left unchanged).
    """
    if not 0 <= target <= CURRENT_VERSION:
        raise ValueError(f"no schema version {target}")
    try:
        if schema_version(conn) >= target:
            return check_known_version(conn)
        with immediate_transaction(conn):
            before = check_known_version(conn)  # re-read under the write lock
            for version in range(before + 1, target + 1):
                for statement in MIGRATIONS[version - 1]:
                    conn.execute(statement)
            if before < target:
                conn.execute(f"PRAGMA user_version = {int(target)}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot migrate the store's schema to v{target}: {exc}") from exc
    return before


def check_known_version(conn: sqlite3.Connection) -> int:
    """The database's schema version.

    :raises StoreError: when it is newer than :data:`CURRENT_VERSION`.
    """
    version = schema_version(conn)
    if version > CURRENT_VERSION:
        raise StoreError(
            f"the store's schema is v{version}, newer than this smtp-tracker (v{CURRENT_VERSION})"
        )
    return version
