"""The SQLite backend of the tracking store: ``DATA_DIR/tracker.sqlite3``.

Layout and sharing
    The data directory is created mode 0700 and the database file 0600 (by
    explicit ``mode``/``fchmod``, not by changing the process-wide umask,
    which would race with other threads); SQLite gives its ``-wal`` and
    ``-shm`` files the database file's mode.  An existing directory is used as
    it is.  The database runs in WAL mode with ``synchronous=NORMAL`` and a
    busy timeout, so the relay and the pixel endpoint may be one process or
    two processes on the same host sharing the directory (WAL needs a local
    file system, not NFS).  Every write is one short transaction started with
    ``BEGIN IMMEDIATE``, so a writer waits for the lock (up to the busy
    timeout) instead of failing on a snapshot upgrade.

Threads
    :class:`SqliteDatabase` is the blocking core: one connection, used by one
    thread at a time.  :class:`SqliteStore`, the async :class:`~.base.Store`,
    owns two of them, each confined to its own single-thread executor: one for
    writes (so writes from this process are serialised without lock
    contention) and one for reads (WAL readers do not wait for writers).  The
    event loop only ever awaits futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar, cast

from smtp_tracker.errors import StoreError
from smtp_tracker.store import consent, queries, reclassify, retention
from smtp_tracker.store.address import (
    HASH_KEY_FILENAME,
    AddressPolicy,
    IpPolicy,
    load_or_create_hash_key,
)
from smtp_tracker.store.integrity import (
    DB_FILENAME,
    StoreSuspendedError,
    header_problem,
    open_held,
    probe,
)
from smtp_tracker.store.migrations import check_known_version, immediate_transaction, migrate
from smtp_tracker.store.records import (
    ClickEvent,
    EventClassifier,
    EventKind,
    LinkRecord,
    MessageRecord,
    OpenEvent,
    StoredMessage,
    unclassified,
)
from smtp_tracker.store.rows import MESSAGE_COLUMNS as _MESSAGE_COLUMNS
from smtp_tracker.store.rows import ORDER as _ORDER
from smtp_tracker.store.rows import (
    KnownTokens,
    aggregate_record,
    day_of,
    sender_domain_of,
    to_us,
)
from smtp_tracker.store.rows import MessageState as _MessageState
from smtp_tracker.store.rows import count_message as _count_message
from smtp_tracker.store.rows import event_rows as _event_rows
from smtp_tracker.store.rows import link_rows as _link_rows
from smtp_tracker.store.rows import listing_clauses as _listing_clauses
from smtp_tracker.store.rows import message_from_row as _message_from_row
from smtp_tracker.store.rows import message_row as _message_row
from smtp_tracker.store.rows import recipient_rows as _recipient_rows
from smtp_tracker.store.rows import with_events as _events_of

__all__ = [
    "DB_FILENAME",
    "OutboxHook",
    "SqliteDatabase",
    "SqliteStore",
    "aggregate_record",
    "day_of",
    "sender_domain_of",
]

log = logging.getLogger("smtp_tracker.store")

#: Seconds between two health checks of an open store (:meth:`SqliteStore.check_health`).
DEFAULT_HEALTH_INTERVAL_S = 300.0


_T = TypeVar("_T")
_INSERT_MESSAGE = (
    f"INSERT INTO messages ({_MESSAGE_COLUMNS}, sender_domain)"  # noqa: S608 - constant
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_OPEN = (
    "INSERT INTO opens (tracking_id, at_us, ip, user_agent, verdict, verdict_reason, signals)"
    " VALUES (?,?,?,?,?,?,?)"
)
_INSERT_CLICK = (
    "INSERT INTO clicks (link_token, tracking_id, at_us, ip, user_agent, verdict, verdict_reason,"
    " signals) VALUES (?,?,?,?,?,?,?,?)"
)


def _select_rows_in(
    conn: sqlite3.Connection, query: str, keys: Iterable[str]
) -> Iterator[Sequence[Any]]:
    """Rows of *query* (with one ``IN ({})``) for *keys*, in chunks within SQLite's limits."""
    pending = list(keys)
    for start in range(0, len(pending), _IN_CHUNK):
        chunk = pending[start : start + _IN_CHUNK]
        yield from conn.execute(query.format(", ".join("?" * len(chunk))), chunk)


def _select_in(conn: sqlite3.Connection, query: str, keys: Iterable[str]) -> dict[str, str]:
    """``{first column: second column}`` of :func:`_select_rows_in`."""
    return {str(row[0]): str(row[1]) for row in _select_rows_in(conn, query, keys)}


#: Keys per ``IN (...)`` look-up (SQLite allows 32,766 variables since 3.32).
_IN_CHUNK = 500


class OutboxHook(Protocol):
    """Called inside the store's write transactions (the webhook outbox, issue 18).

    Must not raise: what it writes is its own business, never the record's.
    """

    def message_recorded(self, conn: sqlite3.Connection, record: MessageRecord) -> None:
        """*record* was inserted; the transaction is still open."""
        ...

    def events_recorded(
        self, conn: sqlite3.Connection, kind: EventKind, rows: Sequence[Sequence[Any]]
    ) -> None:
        """*rows* (``_INSERT_OPEN`` or ``_INSERT_CLICK`` columns) were inserted, before
        the messages' counters were updated; the transaction is still open."""
        ...


class SqliteDatabase:
    """The blocking store over one SQLite connection; for one thread at a time.

    Use :meth:`open`; usable as a context manager (closes on exit).  The CLI may
    use it directly; async code uses :class:`SqliteStore`.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        data_dir: Path,
        store_subject: bool,
        address_policy: AddressPolicy,
        classifier: EventClassifier = unclassified,
    ) -> None:
        self._conn = conn
        self.data_dir = data_dir
        #: ``messages.id`` of the last message committed here (:func:`.integrity.probe` reads it).
        self.last_message_rowid: int | None = None
        #: told of each record and event inside the transaction that writes it (webhooks)
        self.outbox: OutboxHook | None = None
        self.store_subject = store_subject
        self.address_policy = address_policy
        self.classifier = classifier
        #: ``tracking_mode`` (issue 20): ``"aggregate"`` records no recipient, sender,
        #: client address, User-Agent or event row (:func:`aggregate_record`).
        self.tracking_mode = "per-person"
        #: with ``"aggregate"``: keep each message's queue id, Message-ID and subject.
        self.aggregate_per_message = False
        #: days a link outlives its message record (:meth:`prune_links`; 0: forever).
        self.link_retention_days = 1825

    # -- life cycle -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        store_subject: bool = False,
        ip_policy: IpPolicy = "truncate",
        busy_timeout_s: float = 5.0,
        create: bool = True,
        migrate_schema: bool = True,
        classifier: EventClassifier = unclassified,
    ) -> SqliteDatabase:
        """Open (and by default create and migrate) the store in *data_dir*.

        :param store_subject: keep :attr:`MessageRecord.subject`; otherwise it is
            stored as ``None``.
        :param ip_policy: what of client addresses :meth:`record_opens` keeps
            (see :mod:`smtp_tracker.store.address`); ``"hash"`` reads or creates
            ``DATA_DIR/ip-hash.key``.
        :param busy_timeout_s: how long a statement waits for another
            connection's lock, in seconds.
        :param create: create the directory and database when missing; when
            false a missing database is an error (for read-only CLI commands).
        :param migrate_schema: apply pending migrations (tests turn it off to
            build old databases).
        :param classifier: judges each open and click event as it is recorded
            (:mod:`smtp_tracker.classification`); by default every event is
            ``unknown``.
        :raises StoreError: when the directory or database cannot be created,
            opened, put in WAL mode or migrated, or is newer than this code.
        """
        data_dir = Path(data_dir)
        db_path = data_dir / DB_FILENAME
        if create:
            _prepare(data_dir, db_path)
        elif not db_path.is_file():
            raise StoreError(f"no tracking store at {db_path}")
        try:
            policy = AddressPolicy(
                ip_policy,
                hash_key=(
                    load_or_create_hash_key(data_dir / HASH_KEY_FILENAME)
                    if ip_policy == "hash"
                    else None
                ),
            )
        except ValueError as exc:
            raise StoreError(str(exc)) from exc
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
        return cls(
            conn,
            data_dir=data_dir,
            store_subject=store_subject,
            address_policy=policy,
            classifier=classifier,
        )

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection, for the store's own modules (:mod:`.consent`) run from the CLI."""
        return self._conn

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writes -----------------------------------------------------------------

    def record_message(self, record: MessageRecord) -> None:
        """See :meth:`.base.Store.record_message`."""
        aggregate = self.tracking_mode == "aggregate"
        record, row = _message_row(
            record,
            aggregate=aggregate,
            per_message=self.aggregate_per_message,
            store_subject=self.store_subject,
        )
        relayed_us, domain = row[7], row[-1]
        conn = self._conn
        try:
            with immediate_transaction(conn):
                rowid = conn.execute(_INSERT_MESSAGE, row).lastrowid
                conn.executemany(
                    "INSERT INTO message_recipients (message_rowid, address) VALUES (?, ?)",
                    _recipient_rows(rowid, record),
                )
                conn.executemany(
                    "INSERT INTO links (token, tracking_id, url, position, relayed_at_us)"
                    " VALUES (?, ?, ?, ?, ?)",
                    _link_rows(record, relayed_us),
                )
                _count_message(conn, record, domain, relayed_us, aggregate=aggregate)
                if self.outbox is not None:
                    self.outbox.message_recorded(conn, record)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"tracking id {record.tracking_id} is already recorded") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record message {record.queue_id}: {exc}") from exc
        self.last_message_rowid = rowid

    def has_message_row(self, rowid: int) -> bool:
        """Whether this connection sees ``messages.id == rowid`` (pruned or forgotten: no)."""
        return (
            self._conn.execute("SELECT 1 FROM messages WHERE id = ?", (rowid,)).fetchone()
            is not None
        )

    def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        """See :meth:`.base.Store.record_opens`; each open is classified first."""
        return self._record_events("open", hits)

    def record_clicks(self, hits: Sequence[ClickEvent]) -> int:
        """See :meth:`.base.Store.record_clicks`; each click is classified first."""
        return self._record_events("click", hits)

    def _record_events(
        self, kind: EventKind, hits: Sequence[OpenEvent] | Sequence[ClickEvent]
    ) -> int:
        """Record *hits* of known tokens in one transaction, with counters and rollup.

        Per message the counters ``open_count``/``counted_open_count``/
        ``first_open_at_us`` (or ``click_count``/``counted_click_count``) grow,
        and the ``daily_stats`` row of its relay day and sender domain gets the
        events by verdict and, for a message's first (counted) event, ``opened_any``
        and ``opened`` (``clicked``).
        """
        if not hits:
            return 0
        aggregate = self.tracking_mode == "aggregate"
        conn = self._conn
        try:
            with immediate_transaction(conn):
                owners: dict[str, str] = {}  # link token → tracking id
                if kind == "click":
                    owners = _select_in(
                        conn,
                        "SELECT token, tracking_id FROM links WHERE token IN ({})",
                        {hit.link_token for hit in hits if isinstance(hit, ClickEvent)},
                    )
                messages = {
                    str(row[0]): _MessageState(row[1:])
                    for row in _select_rows_in(
                        conn,
                        _MessageState.SELECT_BY_TRACKING_IDS,
                        {
                            owners.get(hit.link_token, "")
                            if isinstance(hit, ClickEvent)
                            else hit.tracking_id
                            for hit in hits
                        }
                        - {""},
                    )
                }
                rows = _event_rows(
                    kind,
                    hits,
                    owners,
                    messages,
                    classify=self.classifier,
                    apply=self.address_policy.apply,
                    aggregate=aggregate,
                )
                if not aggregate:
                    conn.executemany(_INSERT_CLICK if kind == "click" else _INSERT_OPEN, rows)
                if self.outbox is not None:
                    self.outbox.events_recorded(conn, kind, rows)
                _MessageState.save_all(conn, messages.values())
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record {len(hits)} {kind}s: {exc}") from exc
        return len(rows)

    # -- reads ------------------------------------------------------------------

    def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`.base.Store.find_message`."""

        def query() -> StoredMessage | None:
            for column, value in queries.ident_candidates(ident):
                row = self._conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {column} = ? {_ORDER} LIMIT 1",  # noqa: S608 - constants
                    (value,),
                ).fetchone()
                if row is not None:
                    return self._with_events(
                        [_message_from_row(row)], "tracking_id = ?", (row[0],)
                    )[0]
            return None

        return self._read(query)

    def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`.base.Store.list_messages`."""
        where, tail, params = _listing_clauses(since, limit)
        selected = f"SELECT {{}} FROM messages {where} {_ORDER} {tail}"  # noqa: S608 - constants

        def query() -> list[StoredMessage]:
            rows = self._conn.execute(selected.format(_MESSAGE_COLUMNS), params).fetchall()
            return self._with_events(
                [_message_from_row(row) for row in rows],
                f"tracking_id IN ({selected.format('tracking_id')})",
                params,
            )

        return self._read(query)

    def is_known_token(self, tracking_id: str) -> bool:
        """See :meth:`.base.Store.is_known_token`."""
        try:
            row = self._conn.execute(
                "SELECT 1 FROM messages WHERE tracking_id = ?", (tracking_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store: {exc}") from exc
        return row is not None

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"``, or the problems found, one per line."""
        rows = self._read(lambda: self._conn.execute("PRAGMA integrity_check").fetchall())
        return "\n".join(str(row[0]) for row in rows)

    def find_link(self, token: str) -> tuple[LinkRecord, str] | None:
        """The wrapped link with click token *token* and its message's tracking id.

        :raises StoreError: when the store cannot be read.
        """
        try:
            row = self._conn.execute(
                "SELECT url, position, tracking_id FROM links WHERE token = ?", (token,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store: {exc}") from exc
        if row is None:
            return None
        return LinkRecord(token=token, url=row[0], position=int(row[1])), str(row[2])

    def _with_events(
        self, records: list[MessageRecord], where: str, params: Iterable[Any]
    ) -> list[StoredMessage]:
        """*records* with their links, opens and clicks (``where`` selects their tracking ids)."""
        return _events_of(self._conn, records, where, tuple(params))

    # -- reports (smtp_tracker.store.queries) ----------------------------------------

    def query_messages(
        self,
        message_filter: queries.MessageFilter,
        *,
        limit: int = queries.DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> queries.MessagePage:
        """See :func:`.queries.query_messages` (one snapshot).

        :raises ValueError: when *limit* or *cursor* is invalid, or a filter time naive.
        :raises StoreError: when the store cannot be read.
        """
        return self._read(
            lambda: queries.query_messages(self._conn, message_filter, limit=limit, cursor=cursor)
        )

    def query_message(self, ident: str) -> queries.MessageDetail | None:
        """See :func:`.queries.query_message` (one snapshot).

        :raises StoreError: when the store cannot be read.
        """
        return self._read(lambda: queries.query_message(self._conn, ident))

    def query_stats(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        group: queries.StatsGroup = "day",
    ) -> list[queries.StatsRow]:
        """See :func:`.queries.query_stats`.

        :raises ValueError: when *group* is unknown or *since* after *until*.
        :raises StoreError: when the store cannot be read.
        """
        return self._read(
            lambda: queries.query_stats(self._conn, since=since, until=until, group=group)
        )

    def export_rows(
        self, message_filter: queries.MessageFilter, *, page_rows: int = queries.MAX_LIMIT
    ) -> Iterator[queries.MessageSummary]:
        """Every message *message_filter* selects, newest first, *page_rows* per read.

        Memory stays flat: one page at a time, each in its own short read
        transaction (so a long export never holds a snapshot that keeps the
        WAL from being checkpointed).

        :raises ValueError: when a filter time is naive.
        :raises StoreError: when the store cannot be read.
        """
        yield from queries.pages(
            lambda cursor: self.query_messages(message_filter, limit=page_rows, cursor=cursor)
        )

    # -- retention (smtp_tracker.store.retention) --------------------------------------

    def prune_batch(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """See :func:`.retention.prune_batch`: one transaction, the oldest first.

        :raises ValueError: when *before* is naive or *batch_rows* not positive.
        :raises StoreError: when the store cannot be written.
        """
        before_us = to_us(before)
        try:
            return retention.prune_batch(self._conn, before_us, batch_rows=batch_rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prune the store: {exc}") from exc

    def prune(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """Every message relayed before *before*, with its events, links and recipients.

        In transactions of about *batch_rows* rows (see :meth:`prune_batch`).
        """
        total = retention.Removed()
        while True:
            removed = self.prune_batch(before, batch_rows=batch_rows)
            total += removed
            if removed.messages == 0:
                break
        while links := self.prune_links_batch(batch_rows=batch_rows):
            total += retention.Removed(links=links)
        return total

    def prune_links_batch(
        self, *, now: datetime | None = None, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> int:
        """One batch of :func:`.retention.prune_links_batch` for :attr:`link_retention_days`
        before *now*; 0 when the days are 0 (kept forever).

        :raises StoreError: when the store cannot be written.
        """
        if self.link_retention_days <= 0:
            return 0
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.link_retention_days)
        try:
            return retention.prune_links_batch(self._conn, to_us(cutoff), batch_rows=batch_rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prune the store's links: {exc}") from exc

    def count_prunable(self, before: datetime) -> retention.Removed:
        """What :meth:`prune` would delete (see :func:`.retention.count_older`)."""
        before_us = to_us(before)
        return self._read(lambda: retention.count_older(self._conn, before_us))

    def forget_recipient(
        self, address: str, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """Every message sent to *address*, whole (see :func:`.retention.forget_recipient_batch`).

        :raises StoreError: when the store cannot be written.
        """
        total = retention.Removed()
        while True:
            try:
                removed = retention.forget_recipient_batch(
                    self._conn, address, batch_rows=batch_rows
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot forget {address}: {exc}") from exc
            total += removed
            if removed.messages == 0:
                break
        try:  # objection links naming the address; an objection itself stays
            consent.forget_address(self._conn, address)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot forget {address}: {exc}") from exc
        return total

    def count_recipient(self, address: str) -> retention.Removed:
        """What :meth:`forget_recipient` would delete (see :func:`.retention.count_recipient`)."""
        return self._read(lambda: retention.count_recipient(self._conn, address))

    # -- reclassification (smtp_tracker.store.reclassify) ------------------------------

    def reclassify_scope(self, since: date | None) -> tuple[int, list[str]]:
        """How many messages :meth:`reclassify_batch` will read, and the days to rebuild.

        :raises StoreError: when the store cannot be read.
        """
        return self._read(
            lambda: (
                reclassify.count_messages(self._conn, since),
                reclassify.days_from(self._conn, since),
            )
        )

    def reclassify_batch(
        self,
        *,
        since: date | None = None,
        after_rowid: int = 0,
        batch_messages: int = reclassify.DEFAULT_BATCH_MESSAGES,
    ) -> reclassify.Batch:
        """See :func:`.reclassify.reclassify_batch`, with this store's classifier.

        :raises StoreError: when the store cannot be written.
        """
        try:
            return reclassify.reclassify_batch(
                self._conn,
                self.classifier,
                since=since,
                after_rowid=after_rowid,
                batch_messages=batch_messages,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot reclassify: {exc}") from exc

    def rebuild_rollup_day(self, day: str) -> reclassify.DayRebuild:
        """See :func:`.reclassify.rebuild_rollup_day`.

        :raises StoreError: when the store cannot be written.
        """
        try:
            return reclassify.rebuild_rollup_day(self._conn, day)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot rebuild the daily counts of {day}: {exc}") from exc

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


@dataclass
class StoreCounters:
    """What the store counts about its own health (plain ints; logged when it closes degraded).

    :ivar suspended_calls: calls refused because the store is suspended
        (records and look-ups that did not happen).
    :ivar health_checks: health checks run.
    :ivar health_failures: health checks that found the store damaged or losing writes.
    """

    suspended_calls: int = 0
    health_checks: int = 0
    health_failures: int = 0


class _Suspended:
    """Stands for both connections of a suspended store: closes, and nothing else."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.last_message_rowid: int | None = None

    def close(self) -> None:
        pass


def _prepare(data_dir: Path, db_path: Path) -> None:
    """Create *data_dir* (0700) and an empty *db_path* (0600) when missing."""
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


class SqliteStore:
    """The async :class:`~.base.Store` over :class:`SqliteDatabase`.

    Open with ``await SqliteStore.open(data_dir, ...)`` (same options as
    :meth:`SqliteDatabase.open`) and close with :meth:`aclose`, or use
    ``async with``.  Positive :meth:`is_known_token` answers are kept in an
    LRU cache of *known_cache_size* entries, emptied by :meth:`prune`; a token
    pruned or forgotten by another process may stay cached, which is harmless:
    recording an event looks the message up again and drops it when gone.
    """

    def __init__(
        self,
        writer: SqliteDatabase,
        reader: SqliteDatabase,
        writer_executor: ThreadPoolExecutor,
        reader_executor: ThreadPoolExecutor,
        *,
        known_cache_size: int = 4096,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._writer_executor = writer_executor
        self._reader_executor = reader_executor
        self._known = KnownTokens(known_cache_size)
        self._closed = False
        #: Why records are suspended (the store could not be opened at start), or None.
        self.suspended: str | None = None
        self._degraded: str | None = None
        self._health_task: asyncio.Task[None] | None = None
        #: the database file, held open until the connections close: the health check
        #: reads its header through it (closing a descriptor drops the process's locks)
        self._held_fd: int | None = None
        self.counters = StoreCounters()

    @property
    def degraded(self) -> str | None:
        """None when the store is sound; else why records are not being kept (one line).

        Set when the store was suspended at start, or when a health check
        (:meth:`check_health`) found it damaged or not keeping what it was
        given; cleared by a later check that finds it sound again.
        """
        return self.suspended or self._degraded

    @property
    def data_dir(self) -> Path:
        """The data directory."""
        return self._writer.data_dir

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        store_subject: bool = False,
        ip_policy: IpPolicy = "truncate",
        busy_timeout_s: float = 5.0,
        known_cache_size: int = 4096,
        classifier: EventClassifier = unclassified,
    ) -> SqliteStore:
        """Open, creating and migrating it if needed, the store in *data_dir*.

        :raises StoreError: as :meth:`SqliteDatabase.open`.
        """
        loop = asyncio.get_running_loop()
        writer_executor = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        reader_executor = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        writer: SqliteDatabase | None = None
        try:
            writer = await loop.run_in_executor(
                writer_executor,
                lambda: SqliteDatabase.open(
                    data_dir,
                    store_subject=store_subject,
                    ip_policy=ip_policy,
                    busy_timeout_s=busy_timeout_s,
                    classifier=classifier,
                ),
            )
            reader = await loop.run_in_executor(
                reader_executor,
                lambda: SqliteDatabase.open(
                    data_dir,
                    store_subject=store_subject,
                    ip_policy="none",
                    busy_timeout_s=busy_timeout_s,
                    create=False,
                    migrate_schema=False,
                ),
            )
        except BaseException:
            if writer is not None:
                await loop.run_in_executor(writer_executor, writer.close)
            writer_executor.shutdown(wait=False)
            reader_executor.shutdown(wait=False)
            raise
        return cls(
            writer,
            reader,
            writer_executor,
            reader_executor,
            known_cache_size=known_cache_size,
        )

    @classmethod
    async def open_or_suspend(
        cls,
        data_dir: Path,
        *,
        health_interval_s: float | None = DEFAULT_HEALTH_INTERVAL_S,
        **options: Any,
    ) -> SqliteStore:
        """:meth:`open`, or, when the database cannot be opened, a suspended store.

        Mail must not depend on the store (issue 12, item 8): a damaged
        ``tracker.sqlite3`` at start is logged as an error (with the commands
        that check and recover it) and gives a store whose every call raises
        :class:`~.integrity.StoreSuspendedError` (counted in
        ``counters.suspended_calls``) and whose :attr:`degraded` says why.
        An opened store checks itself at once and every *health_interval_s*
        seconds (:meth:`check_health`).

        :param health_interval_s: seconds between health checks; None for none.
        :param options: as :meth:`open`.
        :raises StoreError: only for what is not the database's fault (the data
            directory cannot be created).
        """
        data_dir = Path(data_dir)
        db_path = data_dir / DB_FILENAME
        try:
            # damaged headers: no connection at all, which could lose the log's writes
            problem = await asyncio.to_thread(header_problem, db_path)
            if problem is not None:
                raise StoreError(problem)
            store = await cls.open(data_dir, **options)
        except StoreError as exc:
            if not db_path.is_file():
                raise
            log.error(
                "TRACKING SUSPENDED: the tracking store %s cannot be opened (%s); mail is "
                "relayed untracked and unrecorded until it is repaired: stop smtp-tracker, "
                "run 'smtp-tracker store check' and 'smtp-tracker store recover', start again",
                db_path,
                exc.__cause__ or exc,
            )
            return cls._suspended_store(data_dir, f"store suspended: {exc.__cause__ or exc}")
        if health_interval_s is not None:
            store._health_task = asyncio.create_task(
                store._check_health_every(health_interval_s), name="smtp-tracker-store-health"
            )
        return store

    @classmethod
    def _suspended_store(cls, data_dir: Path, reason: str) -> SqliteStore:
        stand_in = cast(SqliteDatabase, _Suspended(data_dir))
        store = cls(
            stand_in,
            stand_in,
            ThreadPoolExecutor(1, thread_name_prefix="store-suspended"),
            ThreadPoolExecutor(1, thread_name_prefix="store-suspended"),
            known_cache_size=0,
        )
        store.suspended = reason
        return store

    async def check_health(self) -> str | None:
        """Check the database on disk now; :attr:`degraded` follows the answer.

        :func:`.integrity.probe` on a connection of its own (``PRAGMA
        quick_check``; the last message row written must read back), in a
        thread of its own so that the writer and reader threads are not held.
        A change either way is logged (an error when it goes bad).

        :returns: None when sound, else what is wrong (one line).
        """
        if self.suspended is not None:
            return self.suspended
        self.counters.health_checks += 1
        last = self._writer.last_message_rowid
        db_path = self._writer.data_dir / DB_FILENAME
        try:
            if self._held_fd is None and not self._closed:
                self._held_fd = open_held(db_path)
        except OSError as exc:
            problem: str | None = f"cannot read {db_path}: {exc.strerror}"
        else:
            problem = await asyncio.to_thread(probe, db_path, last, db_fd=self._held_fd)
        if (
            problem is not None
            and last is not None
            and "read back" in problem
            and not await self._run(
                self._writer_executor, lambda: self._writer.has_message_row(last)
            )
        ):
            problem = None  # gone for the writer too (pruned, forgotten): not a lost write
        if problem is not None:
            self.counters.health_failures += 1
            if self._degraded is None:
                log.error(
                    "TRACKING STORE DEGRADED: %s; records may be lost: stop smtp-tracker and run "
                    "'smtp-tracker store check'",
                    problem,
                )
        elif self._degraded is not None:
            log.warning("tracking store sound again")
        self._degraded = problem and f"store: {problem}"
        return self._degraded

    async def _check_health_every(self, interval_s: float) -> None:
        while True:
            with contextlib.suppress(StoreError):  # closed under us
                await self.check_health()
            await asyncio.sleep(interval_s)

    async def aclose(self) -> None:
        """Let queued work finish, close both connections and their threads."""
        if self._closed:
            return
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.degraded is not None:
            log.warning("tracking store closed degraded (%s): %s", self.degraded, self.counters)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer_executor, self._writer.close)
        await loop.run_in_executor(self._reader_executor, self._reader.close)
        if self._held_fd is not None:  # only now: its close drops the process's locks
            os.close(self._held_fd)
            self._held_fd = None
        self._writer_executor.shutdown(wait=False)
        self._reader_executor.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self, executor: ThreadPoolExecutor, call: Callable[[], _T]) -> _T:
        if self._closed:
            raise StoreError("the tracking store is closed")
        if self.suspended is not None:
            self.counters.suspended_calls += 1
            raise StoreSuspendedError(self.suspended)
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    def set_tracking_mode(
        self, mode: str, *, per_message: bool = False, link_retention_days: int = 1825
    ) -> None:
        """``tracking_mode``, ``aggregate_per_message`` and ``link_retention_days`` for
        the records written (and pruned) from now on.

        :raises ValueError: when *mode* is not ``per-person`` or ``aggregate``.
        """
        if mode not in ("per-person", "aggregate"):
            raise ValueError(f"tracking_mode must be per-person or aggregate, got {mode!r}")
        if self.suspended is None:
            self._writer.tracking_mode = mode
            self._writer.aggregate_per_message = per_message
            self._writer.link_retention_days = link_retention_days

    def set_outbox(self, hook: OutboxHook | None) -> None:
        """Have *hook* told of each record and event as it is written (not when suspended)."""
        if self.suspended is None:
            self._writer.outbox = hook

    async def record_message(self, record: MessageRecord) -> None:
        """See :meth:`.base.Store.record_message`."""
        await self._run(self._writer_executor, lambda: self._writer.record_message(record))

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        """See :meth:`.base.Store.record_opens`."""
        batch = list(hits)
        return await self._run(self._writer_executor, lambda: self._writer.record_opens(batch))

    async def record_clicks(self, hits: Sequence[ClickEvent]) -> int:
        """See :meth:`.base.Store.record_clicks`."""
        batch = list(hits)
        return await self._run(self._writer_executor, lambda: self._writer.record_clicks(batch))

    async def find_link(self, token: str) -> tuple[LinkRecord, str] | None:
        """See :meth:`SqliteDatabase.find_link`."""
        return await self._run(self._reader_executor, lambda: self._reader.find_link(token))

    async def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`.base.Store.find_message`."""
        return await self._run(self._reader_executor, lambda: self._reader.find_message(ident))

    async def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`.base.Store.list_messages`."""
        if since is not None:
            to_us(since)  # raise ValueError here, not in the thread
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return await self._run(
            self._reader_executor,
            lambda: self._reader.list_messages(since=since, limit=limit),
        )

    async def is_known_token(self, tracking_id: str) -> bool:
        """See :meth:`.base.Store.is_known_token`; positive answers are cached."""
        if self._known.hit(tracking_id):
            return True
        known = await self._run(
            self._reader_executor, lambda: self._reader.is_known_token(tracking_id)
        )
        if known:
            self._known.add(tracking_id)
        return known

    async def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` of the database (``"ok"`` when sound)."""
        return await self._run(self._reader_executor, self._reader.integrity_check)

    # -- reports (smtp_tracker.store.queries; on the reader thread) -----------------------

    async def query_messages(
        self,
        message_filter: queries.MessageFilter,
        *,
        limit: int = queries.DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> queries.MessagePage:
        """See :meth:`SqliteDatabase.query_messages`; page through it for an export."""
        queries.check_limit(limit)  # raise ValueError here, not in the thread
        return await self._run(
            self._reader_executor,
            lambda: self._reader.query_messages(message_filter, limit=limit, cursor=cursor),
        )

    async def query_message(self, ident: str) -> queries.MessageDetail | None:
        """See :meth:`SqliteDatabase.query_message`."""
        return await self._run(self._reader_executor, lambda: self._reader.query_message(ident))

    async def query_stats(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        group: queries.StatsGroup = "day",
    ) -> list[queries.StatsRow]:
        """See :meth:`SqliteDatabase.query_stats`."""
        return await self._run(
            self._reader_executor,
            lambda: self._reader.query_stats(since=since, until=until, group=group),
        )

    # -- retention (on the writer thread, one job per batch) ----------------------------

    async def prune(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """See :meth:`SqliteDatabase.prune`; never holds the writer thread for long.

        Each batch is its own job on the writer thread, so the relay's and the
        pixel endpoint's writes queued meanwhile run between two batches.

        :raises ValueError: when *before* is naive or *batch_rows* not positive.
        :raises StoreError: when the store cannot be written.
        """
        to_us(before)  # raise ValueError here, not in the thread
        total = retention.Removed()
        try:
            while True:
                removed = await self._run(
                    self._writer_executor,
                    lambda: self._writer.prune_batch(before, batch_rows=batch_rows),
                )
                total += removed
                if removed.messages == 0:
                    break
            while links := await self._run(
                self._writer_executor, lambda: self._writer.prune_links_batch(batch_rows=batch_rows)
            ):
                total += retention.Removed(links=links)
            return total
        finally:
            self._known.clear()  # a pruned token is no longer known
