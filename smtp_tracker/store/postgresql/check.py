"""``smtp-tracker store check`` on PostgreSQL: :func:`check_server`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smtp_tracker.errors import StoreError
from smtp_tracker.store import pg_schema
from smtp_tracker.store.postgresql.connection import (
    DEFAULT_TIMEOUT_S,
    check_dsn,
    connect_kwargs,
    error_text,
    redacted,
)
from smtp_tracker.store.postgresql.migration import schema_version

__all__ = ["ServerCheck", "check_server"]


@dataclass(frozen=True)
class ServerCheck:
    """What :func:`check_server` found (``smtp-tracker store check`` on PostgreSQL)."""

    #: the DSN without a password
    where: str
    #: the schema version; ``None`` when the server could not be asked
    schema_version: int | None
    #: what is wrong, one line each; empty when sound
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether the store is sound: reached, at this code's schema, writable."""
        return not self.problems

    def lines(self) -> list[str]:
        """The report as text lines, for the command line (as SQLite's report)."""
        head = f"{self.where}: {'ok' if self.ok else 'DAMAGED'}"
        schema = "unreadable" if self.schema_version is None else f"v{self.schema_version}"
        return [head, f"  schema: {schema}", *(f"  problem: {p}" for p in self.problems)]


def check_server(
    dsn: str, *, password_file: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ServerCheck:
    """Check a PostgreSQL store without changing it: a connection, the schema
    version (:data:`.pg_schema.CURRENT_VERSION`), and a trivial write read back
    (``smtp_tracker_schema`` updated to its own value and read in a transaction
    that is rolled back, so a read-only server or a role without write rights
    is found).

    :raises StoreError: when *dsn* holds a password or is not a PostgreSQL URL,
        or *password_file* cannot be read.
    """
    import psycopg

    try:
        check_dsn(dsn)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    where = redacted(dsn)
    try:
        conn = psycopg.connect(dsn, **connect_kwargs(password_file, timeout_s))
    except psycopg.Error as exc:
        return ServerCheck(where, None, (f"cannot connect: {error_text(exc)}",))
    with conn:
        try:
            version = schema_version(conn)
        except psycopg.Error as exc:
            return ServerCheck(where, None, (f"cannot read the schema: {error_text(exc)}",))
        if version == 0:
            return ServerCheck(where, 0, ("no tracking store in this database",))
        problems: list[str] = []
        if version != pg_schema.CURRENT_VERSION:
            relation = "newer" if version > pg_schema.CURRENT_VERSION else "older"
            problems.append(
                f"schema v{version} is {relation} than this smtp-tracker's"
                f" (v{pg_schema.CURRENT_VERSION})"
            )
        try:
            conn.execute("BEGIN")
            try:
                conn.execute("UPDATE smtp_tracker_schema SET version = version")
                read = conn.execute("SELECT version FROM smtp_tracker_schema").fetchone()
            finally:
                conn.execute("ROLLBACK")
            if read is None or int(read[0]) != version:
                problems.append("a write was not read back")
        except psycopg.Error as exc:
            problems.append(f"cannot write: {error_text(exc)}")
        return ServerCheck(where, version, tuple(problems))
