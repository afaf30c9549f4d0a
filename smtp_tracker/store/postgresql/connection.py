"""A PostgreSQL store's DSN and connection: no password in the DSN, the shared queries' dialect.

Passwords
    Never in the DSN of a configuration file or flag: libpq reads
    ``PGPASSWORD``, ``PGPASSFILE`` or ``~/.pgpass``, or *password_file* (the
    ``store_password_file`` key) names a file holding it.

psycopg is imported only when a connection is made, so that it is needed only
by those who use PostgreSQL (the ``postgresql`` extra).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

from smtp_tracker.errors import StoreError
from smtp_tracker.store import pg_outbox, pg_schema
from smtp_tracker.store.address import AddressPolicy, IpPolicy
from smtp_tracker.store.records import EventClassifier

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Connected",
    "Options",
    "PgConnection",
    "address_policy",
    "check_dsn",
    "connect_kwargs",
    "error_text",
    "is_dsn",
    "pg_names",
    "redacted",
]

_T = TypeVar("_T")

#: Seconds a call waits for a connection (and libpq for the server) before it fails.
DEFAULT_TIMEOUT_S = 3.0


def is_dsn(store: str | None) -> bool:
    """Whether *store* (the ``store`` key) names a PostgreSQL server rather than a path."""
    return store is not None and store.startswith(("postgresql://", "postgres://"))


def redacted(dsn: str) -> str:
    """*dsn* without a password, for logs and errors."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_dsn(dsn: str) -> None:
    """Refuse a DSN carrying a password (it belongs in ``PGPASSFILE`` or ``store_password_file``).

    :raises ValueError: when *dsn* has a password or is not a ``postgresql://`` URL.
    """
    if not is_dsn(dsn):
        raise ValueError(f"not a postgresql:// URL: {redacted(dsn)!r}")
    parts = urlsplit(dsn)
    if parts.password is not None or "password=" in parts.query:
        raise ValueError(
            "the store's DSN must not hold the password: use PGPASSFILE, ~/.pgpass, "
            "PGPASSWORD or store_password_file"
        )


def address_policy(dsn: str, ip_policy: IpPolicy, hash_key: bytes | None) -> AddressPolicy:
    """The address policy of *ip_policy* once *dsn* is found fit to open.

    :raises StoreError: when *dsn* holds a password or is not a PostgreSQL URL, or
        *ip_policy* is unknown or ``hash`` without a key of 16 bytes or more.
    """
    try:
        check_dsn(dsn)
        return AddressPolicy(ip_policy, hash_key=hash_key)
    except ValueError as exc:
        raise StoreError(str(exc)) from None


def connect_kwargs(password_file: Path | None, timeout_s: float) -> dict[str, Any]:
    """psycopg.connect's keyword arguments: autocommit, libpq's ``connect_timeout`` (whole
    seconds, at least 1), the store's adapters (:mod:`.adapters`: times as
    :class:`~smtp_tracker.store.instant.Instant`) and the password read from *password_file*.

    :raises StoreError: when *password_file* cannot be read.
    """
    from smtp_tracker.store.postgresql.adapters import adapters

    kwargs: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": max(1, round(timeout_s)),
        "context": adapters(),
    }
    if password_file is not None:
        try:
            kwargs["password"] = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StoreError(
                f"cannot read store_password_file {password_file}: {exc.strerror}"
            ) from None
    return kwargs


_NAMES: Final = re.compile(rf"\b({'|'.join(pg_schema.TIME_COLUMNS)})\b|\b((?:\w+\.)?)ip\b")


def _name(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return pg_schema.TIME_COLUMNS[match.group(1)]
    return pg_schema.IP_TEXT.format(table=match.group(2))


@functools.lru_cache(maxsize=1024)
def pg_names(sql: str) -> str:
    """*sql* naming SQLite's columns with PostgreSQL's (:data:`.pg_schema.TIME_COLUMNS`:
    ``relayed_at_us`` is ``relayed_at``), and each ``ip`` (qualified or not) read as the
    text SQLite holds (:data:`.pg_schema.IP_TEXT`: the ``inet`` address or network, or
    the hash in hex).  ``ip`` is not a column on PostgreSQL, so a statement writing it
    through here fails rather than writing the wrong column.
    """
    return _NAMES.sub(_name, sql)


@functools.lru_cache(maxsize=1024)
def _dialect(sql: str) -> str:
    """*sql* written for :mod:`sqlite3` (SQLite's column names, ``?`` placeholders) as
    psycopg takes it (:func:`pg_names`, ``%s``)."""
    return pg_names(sql).replace("%", "%%").replace("?", "%s")


class PgConnection:
    """A psycopg connection speaking the shared queries' dialect (:class:`.base.Connection`)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, parameters: Any = (), /) -> psycopg.Cursor[Any]:
        """Run *sql* (``?`` placeholders) with *parameters*; the cursor."""
        return self.raw.execute(_dialect(sql), parameters)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> None:
        """Run *sql* (``?`` placeholders) once per row of *rows* (psycopg pipelines them)."""
        with self.raw.cursor() as cursor:
            cursor.executemany(_dialect(sql), rows)

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A transaction block (psycopg's ``Connection.transaction``)."""
        return self.raw.transaction()


def error_text(exc: BaseException) -> str:
    """One line naming what went wrong (the server's message, first line)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class Options:
    """What a store records and how (shared by its connections; see
    :meth:`~.store.PostgresStore.set_tracking_mode` and ``set_outbox``)."""

    store_subject: bool
    address_policy: AddressPolicy
    classifier: EventClassifier
    tracking_mode: str = "per-person"
    aggregate_per_message: bool = False
    link_retention_days: int = 1825
    #: told of each record and event inside the transaction that writes it (webhooks)
    outbox: pg_outbox.PgOutboxHook | None = None


class Connected:
    """What each part of :class:`~.database.PgDatabase` stands on: its connection
    (``_raw`` psycopg's, ``_conn`` in the shared queries' dialect), its
    :class:`Options`, and reads in one snapshot at a time."""

    _raw: psycopg.Connection[Any]
    _conn: PgConnection
    _options: Options

    def _read(self, query: Callable[[], _T]) -> _T:
        """Run *query* in one read-only snapshot (``REPEATABLE READ``)."""
        import psycopg

        try:
            with self._raw.transaction():
                self._raw.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return query()
        except psycopg.Error as exc:
            raise StoreError(f"cannot read the store: {error_text(exc)}") from exc
