"""Copy a SQLite tracking store into PostgreSQL (``smtp-tracker migrate-store``, issue 14).

The source, ``DATA_DIR/tracker.sqlite3``, is opened read-only (``mode=ro``):
nothing in it changes.  Each table is copied in batches, each batch one
PostgreSQL transaction (``COPY`` into a temporary table, then ``INSERT ...
SELECT ... ON CONFLICT DO NOTHING``), so an interrupted copy leaves whole
batches behind and running it again goes on where it stopped: tables keyed
by an integer id start after the largest id already there, the others are
copied again with their existing rows left as they are.  At the end the
identity sequences are moved past the copied ids and every table is
verified: row counts, and a checksum of its rows (order-independent: the sum
of each row's SHA-256 prefix, with JSON normalised), equal on both sides.

The webhook outbox (``webhook_events``, ``webhook_deliveries``,
``webhook_hooks``) is copied as any table: pending deliveries and dead
letters go on from PostgreSQL.  Its one-row ``webhook_outbox_state`` is not
a table of rows to copy: its ``depth`` is set to the events copied and its
``dropped`` to the source's, at the end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from smtp_tracker.errors import StoreError
from smtp_tracker.store import schema
from smtp_tracker.store.instant import Instant
from smtp_tracker.store.integrity import DB_FILENAME
from smtp_tracker.store.migrations import CURRENT_VERSION
from smtp_tracker.store.postgresql.connection import pg_names

if TYPE_CHECKING:
    import psycopg

__all__ = ["TABLES", "Table", "TableCheck", "copy_store", "open_source", "verify"]

#: What ``ip_policy = "hash"`` stores: 64 lower-case hex digits (:mod:`.address`).
_HASH: Final = re.compile("[0-9a-f]{64}")


@dataclass(frozen=True)
class Table:
    """How one table is copied; its columns are the schema's (:data:`.schema.TABLES`).

    :ivar key: the integer column batches advance on (resumed after its largest
        value in the target), or None for a table copied whole each run.
    :ivar group: with *key*: batches hold whole groups of equal keys (a table
        without a primary key: ``message_recipients``).
    """

    name: str
    key: str | None = None
    group: bool = False

    @functools.cached_property
    def definition(self) -> schema.Table:
        """The table in the one schema definition.

        :raises KeyError: when the definition has no table of this name.
        """
        for table in schema.TABLES:
            if table.name == self.name:
                return table
        raise KeyError(self.name)

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns as SQLite (the source) names them, in the definition's order."""
        return tuple(column.name for column in self.definition.columns)

    @property
    def identity(self) -> str | None:
        """The identity column whose sequence follows the copied ids, if any."""
        ids = [column.name for column in self.definition.columns if column.kind == "id"]
        return ids[0] if ids else None

    @property
    def json_columns(self) -> tuple[str, ...]:
        """The ``jsonb`` columns (compared as parsed JSON)."""
        return tuple(column.name for column in self.definition.columns if column.kind == "json")

    @property
    def target_columns(self) -> tuple[str, ...]:
        """The columns on PostgreSQL: times renamed, an address in two (``ip_address``,
        ``ip_hash``)."""
        return tuple(name for column in self.definition.columns for name in column.pg_columns)

    def target_row(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """A source row as :attr:`target_columns` take it: times as
        :class:`~smtp_tracker.store.instant.Instant`, the address apart from its hash."""
        values: list[Any] = []
        for column, value in zip(self.definition.columns, row, strict=True):
            if column.kind == "address":
                hashed = isinstance(value, str) and _HASH.fullmatch(value) is not None
                values += [None, bytes.fromhex(value)] if hashed else [value, None]
            elif value is not None and column.kind == "instant":
                values.append(Instant(value))
            else:
                values.append(value)
        return tuple(values)


#: The tables, in the order they are copied (every table SQLite holds).
TABLES: Final = (
    Table("messages", key="id"),
    Table("message_recipients", key="message_rowid", group=True),
    Table("links"),
    Table("opens", key="id"),
    Table("clicks", key="id"),
    Table("daily_stats"),
    Table("webhook_events", key="seq"),
    Table("webhook_deliveries"),
    Table("webhook_hooks"),
    Table("consent"),
    Table("optout_links"),
    Table("optout_used"),
    Table("dkim_stats"),
)


def open_source(data_dir: Path) -> sqlite3.Connection:
    """``DATA_DIR/tracker.sqlite3`` read-only, at this code's schema version.

    :raises StoreError: when it is missing, unreadable, or at another version
        (run smtp-tracker of this version on it once first).
    """
    path = Path(data_dir) / DB_FILENAME
    if not path.is_file():
        raise StoreError(f"no tracking store in {data_dir}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if version != CURRENT_VERSION:
        conn.close()
        raise StoreError(
            f"{path} is at schema v{version}, this smtp-tracker copies v{CURRENT_VERSION}: "
            "run 'smtp-tracker stats' (or serve) of this version on it once first"
        )
    return conn


def _source_rows(
    source: sqlite3.Connection, table: Table, after: int | None, batch_rows: int
) -> list[tuple[Any, ...]]:
    columns = ", ".join(table.columns)
    if table.key is None:
        raise AssertionError(table)
    if table.group:  # whole groups: every row of the last key read
        last = source.execute(
            f"SELECT max(k) FROM (SELECT {table.key} AS k FROM {table.name}"  # noqa: S608 - constant names
            f" WHERE {table.key} > ? ORDER BY {table.key} LIMIT ?)",
            (after if after is not None else -1, batch_rows),
        ).fetchone()[0]
        if last is None:
            return []
        return source.execute(
            f"SELECT {columns} FROM {table.name} WHERE {table.key} > ? AND {table.key} <= ?"  # noqa: S608 - constant names
            f" ORDER BY {table.key}",
            (after if after is not None else -1, last),
        ).fetchall()
    return source.execute(
        f"SELECT {columns} FROM {table.name} WHERE {table.key} > ?"  # noqa: S608 - constant names
        f" ORDER BY {table.key} LIMIT ?",
        (after if after is not None else -1, batch_rows),
    ).fetchall()


def _write_batch(
    target: psycopg.Connection[Any], table: Table, rows: Sequence[tuple[Any, ...]]
) -> None:
    """One transaction: COPY *rows* into a temporary table, then insert what is missing."""
    columns = ", ".join(table.target_columns)
    with target.transaction():
        target.execute(f"CREATE TEMPORARY TABLE copy_stage (LIKE {table.name}) ON COMMIT DROP")
        with target.cursor() as cursor:
            with cursor.copy(f"COPY copy_stage ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(table.target_row(row))
            conflict = "" if table.group else " ON CONFLICT DO NOTHING"
            cursor.execute(
                f"INSERT INTO {table.name} ({columns}) OVERRIDING SYSTEM VALUE"  # noqa: S608 - constant names
                f" SELECT {columns} FROM copy_stage{conflict}"
            )


def _target_after(target: psycopg.Connection[Any], table: Table) -> int | None:
    assert table.key is not None
    row = target.execute(f"SELECT max({table.key}) FROM {table.name}").fetchone()  # noqa: S608 - constant names
    return None if row is None or row[0] is None else int(row[0])


def _all_rows(source: sqlite3.Connection, table: Table, batch_rows: int) -> Iterator[list[Any]]:
    cursor = source.execute(f"SELECT {', '.join(table.columns)} FROM {table.name}")  # noqa: S608 - constant names
    while rows := cursor.fetchmany(batch_rows):
        yield rows


def count_rows(source: sqlite3.Connection) -> dict[str, int]:
    """Rows per table of the source."""
    return {
        table.name: int(source.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0])  # noqa: S608 - constant names
        for table in TABLES
    }


def copy_store(
    source: sqlite3.Connection,
    target: psycopg.Connection[Any],
    *,
    batch_rows: int = 5000,
    progress: Callable[[str, int], None] = lambda table, rows: None,
) -> dict[str, int]:
    """Copy every table of *source* into *target* (a migrated PostgreSQL store, connected
    with the store's adapters: :meth:`.postgresql.PgDatabase.open`'s connection).

    Resumable (see the module's docstring).  *progress* is told of each
    batch committed: the table and its rows.

    :returns: the rows copied (written or found already there) per table.
    :raises psycopg.Error: when the target fails (what is committed stays).
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    copied: dict[str, int] = {}
    for table in TABLES:
        done = 0
        if table.key is None:
            for rows in _all_rows(source, table, batch_rows):
                _write_batch(target, table, rows)
                done += len(rows)
                progress(table.name, len(rows))
        else:
            after = _target_after(target, table)
            if after is not None:  # already there: counted as done
                skipped = source.execute(
                    f"SELECT count(*) FROM {table.name} WHERE {table.key} <= ?",  # noqa: S608 - constant names
                    (after,),
                ).fetchone()[0]
                done += int(skipped)
                progress(table.name, int(skipped))
            while rows := _source_rows(source, table, after, batch_rows):
                _write_batch(target, table, rows)
                after = int(rows[-1][table.columns.index(table.key)])
                done += len(rows)
                progress(table.name, len(rows))
        copied[table.name] = done
    with target.transaction():
        for table in TABLES:
            if table.identity is not None:
                target.execute(
                    "SELECT setval(pg_get_serial_sequence(%s, %s),"  # noqa: S608 - constant names
                    f" coalesce((SELECT max({table.identity}) FROM {table.name}), 0) + 1, false)",
                    (table.name, table.identity),
                )
        state = source.execute("SELECT dropped FROM webhook_outbox_state").fetchone()
        target.execute(
            "UPDATE webhook_outbox_state SET depth = (SELECT count(*) FROM webhook_events),"
            " dropped = %s",
            (int(state[0]) if state else 0,),
        )
    return copied


@dataclass(frozen=True)
class TableCheck:
    """A table's rows and checksum on both sides."""

    table: str
    source_rows: int
    target_rows: int
    source_sum: str
    target_sum: str

    @property
    def ok(self) -> bool:
        return self.source_rows == self.target_rows and self.source_sum == self.target_sum


def _canonical(value: Any, *, is_json: bool) -> str:
    if value is None:
        return "\\N"
    if is_json:
        parsed = json.loads(value) if isinstance(value, str | bytes) else value
        return json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def _checksum(rows: Iterator[Sequence[Any]], table: Table) -> tuple[int, str]:
    flags = [column in table.json_columns for column in table.columns]
    total, count = 0, 0
    for row in rows:
        text = "\x1f".join(
            _canonical(value, is_json=flag) for value, flag in zip(row, flags, strict=True)
        )
        total = (total + int.from_bytes(hashlib.sha256(text.encode()).digest()[:8])) % 2**64
        count += 1
    return count, f"{total:016x}"


def verify(source: sqlite3.Connection, target: psycopg.Connection[Any]) -> list[TableCheck]:
    """Each table's row count and checksum on both sides."""
    checks = []
    for table in TABLES:
        columns = ", ".join(table.columns)
        source_count, source_sum = _checksum(
            iter(source.execute(f"SELECT {columns} FROM {table.name}")),  # noqa: S608 - constant names
            table,
        )
        with target.transaction(), target.cursor(name=f"verify_{table.name}") as cursor:
            cursor.execute(f"SELECT {pg_names(columns)} FROM {table.name}")  # noqa: S608 - constant names
            target_count, target_sum = _checksum(iter(cursor), table)
        checks.append(TableCheck(table.name, source_count, target_count, source_sum, target_sum))
    return checks
