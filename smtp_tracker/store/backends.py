"""Which backend holds the tracking store: the ``store`` key (issue 14).

``store`` absent: SQLite in ``data_dir`` (:class:`~.sqlite.SqliteStore`);
``store = "postgresql://USER@HOST:PORT/DBNAME"``: PostgreSQL
(:class:`~.postgresql.PostgresStore`), imported only then, so that psycopg is
needed only by those who use it (the ``postgresql`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtp_tracker.errors import StoreError
from smtp_tracker.store import consent
from smtp_tracker.store.address import HASH_KEY_FILENAME, IpPolicy, load_or_create_hash_key
from smtp_tracker.store.integrity import DB_FILENAME
from smtp_tracker.store.records import EventClassifier, unclassified

if TYPE_CHECKING:
    from smtp_tracker.store.base import Database, ReportingStore

__all__ = [
    "check_server",
    "is_postgresql",
    "open_database",
    "open_registry",
    "open_store",
    "store_name",
]


def is_postgresql(store: str | None) -> bool:
    """Whether the ``store`` key names a PostgreSQL server."""
    return store is not None and store.startswith(("postgresql://", "postgres://"))


def store_name(store: str | None, data_dir: Path) -> str:
    """The store as a person reads it in a message: the DSN (no password) or the SQLite file."""
    if is_postgresql(store):
        from smtp_tracker.store.postgresql import redacted

        assert store is not None
        return redacted(store)
    return str(data_dir / DB_FILENAME)


def _pg_module() -> Any:
    try:
        from smtp_tracker.store import postgresql
    except ImportError as exc:  # psycopg missing
        raise StoreError(
            "store is a PostgreSQL URL but psycopg is not installed: "
            "pip install 'smtp-tracker[postgresql]'"
        ) from exc
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise StoreError(
            "store is a PostgreSQL URL but psycopg is not installed: "
            "pip install 'smtp-tracker[postgresql]'"
        ) from exc
    return postgresql


def check_server(store: str, *, password_file: Path | None = None) -> Any:
    """``store check`` on PostgreSQL: :func:`.postgresql.check_server`'s report
    (``ok``, ``lines()``).

    :raises StoreError: when psycopg is missing or the DSN holds a password.
    """
    return _pg_module().check_server(store, password_file=password_file)


def _hash_key(data_dir: Path, ip_policy: IpPolicy) -> bytes | None:
    if ip_policy != "hash":
        return None
    try:
        return load_or_create_hash_key(data_dir / HASH_KEY_FILENAME)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the address hash key: {exc}") from exc


async def open_store(
    *,
    store: str | None,
    data_dir: Path,
    store_subject: bool = False,
    ip_policy: IpPolicy = "truncate",
    classifier: EventClassifier = unclassified,
    password_file: Path | None = None,
    pool_size: int = 4,
    timeout_s: float = 3.0,
) -> ReportingStore:
    """The async store of ``serve``, ``pixel`` and ``reports``.

    SQLite: :meth:`~.sqlite.SqliteStore.open_or_suspend` (a damaged file
    suspends recording, mail flows).  PostgreSQL: a pool that opens even when
    the server is down at start (the outage is logged once; records resume
    when it answers).  With ``ip_policy = "hash"`` the key is
    ``DATA_DIR/ip-hash.key`` on each host: give every host the same file.

    :raises StoreError: when the store cannot be had at all (bad DSN, no psycopg,
        an uncreatable data directory).
    """
    if is_postgresql(store):
        assert store is not None
        postgresql = _pg_module()
        opened: ReportingStore = await postgresql.PostgresStore.open(
            store,
            store_subject=store_subject,
            ip_policy=ip_policy,
            hash_key=_hash_key(data_dir, ip_policy),
            password_file=password_file,
            pool_size=pool_size,
            timeout_s=timeout_s,
            classifier=classifier,
            require_server=False,
        )
        return opened
    from smtp_tracker.store.sqlite import SqliteStore

    return await SqliteStore.open_or_suspend(
        data_dir, store_subject=store_subject, ip_policy=ip_policy, classifier=classifier
    )


def open_database(
    *,
    store: str | None,
    data_dir: Path,
    password_file: Path | None = None,
    create: bool = False,
    migrate_schema: bool = False,
    classifier: EventClassifier = unclassified,
    timeout_s: float = 10.0,
) -> Database:
    """The blocking store of a CLI command: a :class:`~.sqlite.SqliteDatabase` or a
    :class:`~.postgresql.PgDatabase` (the same methods; a context manager).

    :param create: make the store where there is none (a data directory or a
        database without one); when false, that is an error on either backend.
    :param migrate_schema: migrate an older SQLite store (a PostgreSQL store is
        always migrated: its migrations are one transaction under a lock).
    :raises StoreError: when there is no store there (and not *create*), or it
        cannot be opened.
    """
    if is_postgresql(store):
        assert store is not None
        database: Database = _pg_module().PgDatabase.open(
            store,
            password_file=password_file,
            migrate_schema=True,  # a PostgreSQL store is migrated whoever opens it
            create=create,
            classifier=classifier,
            timeout_s=timeout_s,
        )
        return database
    from smtp_tracker.store.sqlite import SqliteDatabase

    if not create and not (data_dir / DB_FILENAME).exists():
        raise StoreError(f"no tracking store in {data_dir}")
    return SqliteDatabase.open(
        data_dir, create=create, migrate_schema=migrate_schema, classifier=classifier
    )


def open_registry(
    *,
    store: str | None,
    data_dir: Path,
    password_file: Path | None = None,
    timeout_s: float = 3.0,
    suspended: str | None = None,
) -> consent.ConsentRegistry:
    """The registry of the configured store: ``DATA_DIR/tracker.sqlite3``, or the
    PostgreSQL database *store* names (a connection of its own, opened at first use).
    """
    if not is_postgresql(store):
        return consent.ConsentRegistry(data_dir, suspended=suspended)
    assert store is not None
    dsn = store

    def connect() -> tuple[consent.Conn, Callable[[], None]]:
        database = _pg_module().PgDatabase.open(
            dsn, password_file=password_file, timeout_s=timeout_s, migrate_schema=False
        )
        return database.connection, database.close

    return consent.ConsentRegistry(connect=connect, suspended=suspended)
