"""The blocking PostgreSQL store: :class:`PgDatabase`, one connection (the CLI's; the
async store's calls, each on a connection of its pool)."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from smtp_tracker.errors import StoreError
from smtp_tracker.store.address import IpPolicy
from smtp_tracker.store.postgresql.connection import (
    DEFAULT_TIMEOUT_S,
    Options,
    PgConnection,
    address_policy,
    connect_kwargs,
    error_text,
    redacted,
)
from smtp_tracker.store.postgresql.maintenance import Maintenance
from smtp_tracker.store.postgresql.migration import migrate, schema_version
from smtp_tracker.store.postgresql.reading import Reading
from smtp_tracker.store.postgresql.recording import Recording
from smtp_tracker.store.records import EventClassifier, unclassified

if TYPE_CHECKING:
    import psycopg

__all__ = ["PgDatabase"]


class PgDatabase(Recording, Reading, Maintenance):
    """The blocking store over one PostgreSQL connection (the CLI's; the async store's calls).

    The methods are those of :class:`~.sqlite.SqliteDatabase` the CLI and the
    async store use, with the same meaning.  Open with :meth:`open`; a context
    manager (closes on exit).  Its parts are in their own modules: the writes
    (:class:`~.recording.Recording`), the reads and reports
    (:class:`~.reading.Reading`), retention and reclassification
    (:class:`~.maintenance.Maintenance`).
    """

    def __init__(self, conn: psycopg.Connection[Any], options: Options) -> None:
        self._raw = conn
        self._conn = PgConnection(conn)
        self._options = options

    @classmethod
    def open(
        cls,
        dsn: str,
        *,
        store_subject: bool = False,
        ip_policy: IpPolicy = "truncate",
        hash_key: bytes | None = None,
        password_file: Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        migrate_schema: bool = True,
        create: bool = True,
        classifier: EventClassifier = unclassified,
    ) -> PgDatabase:
        """Connect to *dsn* and (by default) create or migrate the schema.

        :param create: make the schema in a database without one; when false such a
            database is an error, as a missing SQLite store is (the read-only CLI
            commands: a mistyped database name must not get the store's tables).
        :raises StoreError: when the server cannot be reached, the DSN holds a
            password, the database holds no store and *create* or *migrate_schema*
            is false, or the schema is newer than this code.
        """
        import psycopg

        policy = address_policy(dsn, ip_policy, hash_key)
        try:
            conn = psycopg.connect(dsn, **connect_kwargs(password_file, timeout_s))
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {redacted(dsn)}: {error_text(exc)}") from exc
        try:
            if (not migrate_schema or not create) and schema_version(conn) == 0:
                raise StoreError(f"no tracking store in {redacted(dsn)}")
            if migrate_schema:
                migrate(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"cannot open {redacted(dsn)}: {error_text(exc)}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, Options(store_subject, policy, classifier))

    @property
    def connection(self) -> PgConnection:
        """The connection in the shared queries' dialect."""
        return self._conn

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._raw.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
