"""The SQLite database file and its connection: made private, opened in WAL mode, read in snapshots.

The data directory is created mode 0700 and the database file 0600 (by
explicit ``mode``/``fchmod``, not by changing the process-wide umask, which
would race with other threads); SQLite gives its ``-wal`` and ``-shm`` files
the database file's mode.  An existing directory is used as it is.  The
database runs in WAL mode with ``synchronous=NORMAL`` and a busy timeout, so
the relay and the pixel endpoint may be one process or two processes on the
same host sharing the directory (WAL needs a local file system, not NFS).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from smtp_tracker.errors import StoreError
from smtp_tracker.store.migrations import check_known_version, migrate

__all__ = ["Connected", "connect", "prepare"]

_T = TypeVar("_T")


def prepare(data_dir: Path, db_path: Path) -> None:
    """Create *data_dir* (0700) and an empty *db_path* (0600) when missing.

    :raises StoreError: when either cannot be created, or *data_dir* is not a directory.
    """
    try:
        try:
            data_dir.mkdir(mode=0o700, parents=True)
            os.chmod(data_dir, 0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            if not stat.S_ISDIR(data_dir.stat().st_mode):
                raise StoreError(f"data directory {data_dir} is not a directory") from None
        try:
            fd = os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot create the tracking store in {data_dir}: {exc.strerror}") from exc


def connect(db_path: Path, *, busy_timeout_s: float, migrate_schema: bool) -> sqlite3.Connection:
    """A connection to the existing database *db_path*, in WAL mode, migrated by default.

    In autocommit mode (``isolation_level=None``: the store begins its own
    transactions), usable from any one thread at a time, with a busy timeout of
    *busy_timeout_s* seconds, ``synchronous=NORMAL`` and ``trusted_schema=OFF``.

    :param migrate_schema: apply pending migrations; when false, only check
        that the schema is not newer than this code.
    :raises StoreError: when it cannot be opened, put in WAL mode or migrated,
        or is newer than this code.
    """
    try:
        conn = sqlite3.connect(
            db_path,
            timeout=busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {db_path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{db_path}: cannot use WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA trusted_schema = OFF")
        if migrate_schema:
            migrate(conn)
        else:
            check_known_version(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"cannot open {db_path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


class Connected:
    """What each part of :class:`~.database.SqliteDatabase` stands on: its
    connection (``_conn``, set by the database), read one snapshot at a time."""

    _conn: sqlite3.Connection

    def _read(self, query: Callable[[], _T]) -> _T:
        """Run *query* in one read transaction, so it sees one snapshot."""
        conn = self._conn
        try:
            conn.execute("BEGIN")
            try:
                return query()
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store: {exc}") from exc
