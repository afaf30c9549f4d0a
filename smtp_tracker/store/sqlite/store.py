"""The async SQLite store: :class:`SqliteStore`, two connections in two threads.

:class:`SqliteStore`, the async :class:`.base.Store`, owns
two :class:`~.database.SqliteDatabase` connections, each confined to its own
single-thread executor: one for writes (so writes from this process are
serialised without lock contention) and one for reads (WAL readers do not
wait for writers).  The event loop only ever awaits futures.  Its health
(suspension at start, checks while open) is :mod:`.health`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from smtp_tracker.errors import StoreError
from smtp_tracker.store import queries, retention
from smtp_tracker.store.address import IpPolicy
from smtp_tracker.store.integrity import DB_FILENAME, StoreSuspendedError
from smtp_tracker.store.records import (
    ClickEvent,
    EventClassifier,
    LinkRecord,
    MessageRecord,
    OpenEvent,
    StoredMessage,
    unclassified,
)
from smtp_tracker.store.rows import KnownTokens, to_us
from smtp_tracker.store.sqlite.database import SqliteDatabase
from smtp_tracker.store.sqlite.health import (
    DEFAULT_HEALTH_INTERVAL_S,
    StoreCounters,
    StoreHealth,
    SuspendedDatabase,
    opened_or_suspended,
)
from smtp_tracker.store.sqlite.recording import OutboxHook

__all__ = ["SqliteStore"]

log = logging.getLogger("smtp_tracker.store")

_T = TypeVar("_T")


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
        self._health = StoreHealth(writer.data_dir / DB_FILENAME)

    @property
    def degraded(self) -> str | None:
        """None when the store is sound; else why records are not being kept (one line).

        Set when the store was suspended at start, or when a health check
        (:meth:`check_health`) found it damaged or not keeping what it was
        given; cleared by a later check that finds it sound again.
        """
        return self._health.degraded

    @property
    def suspended(self) -> str | None:
        """Why records are suspended (the store could not be opened at start), or None."""
        return self._health.suspended

    @property
    def counters(self) -> StoreCounters:
        """What the store counts about its own health."""
        return self._health.counters

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
        store = await opened_or_suspended(
            data_dir / DB_FILENAME,
            lambda: cls.open(data_dir, **options),
            lambda reason: cls._suspended_store(data_dir, reason),
        )
        if store.suspended is None and health_interval_s is not None:
            store._health.start(store.check_health, health_interval_s)
        return store

    @classmethod
    def _suspended_store(cls, data_dir: Path, reason: str) -> SqliteStore:
        stand_in = cast(SqliteDatabase, SuspendedDatabase(data_dir))
        store = cls(
            stand_in,
            stand_in,
            ThreadPoolExecutor(1, thread_name_prefix="store-suspended"),
            ThreadPoolExecutor(1, thread_name_prefix="store-suspended"),
            known_cache_size=0,
        )
        store._health.suspended = reason
        return store

    async def check_health(self) -> str | None:
        """Check the database on disk now; :attr:`degraded` follows the answer.

        :func:`.integrity.probe` on a connection of its own
        (``PRAGMA quick_check``; the last message row written must read back),
        in a thread of its own so that the writer and reader threads are not
        held (:meth:`.health.StoreHealth.check`).  A change either way is
        logged (an error when it goes bad).

        :returns: None when sound, else what is wrong (one line).
        """
        writer = self._writer
        return await self._health.check(
            writer.last_message_rowid,
            lambda rowid: self._run(self._writer_executor, lambda: writer.has_message_row(rowid)),
            closed=self._closed,
        )

    async def aclose(self) -> None:
        """Let queued work finish, close both connections and their threads."""
        if self._closed:
            return
        self._closed = True
        await self._health.stop()
        if self.degraded is not None:
            log.warning("tracking store closed degraded (%s): %s", self.degraded, self.counters)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer_executor, self._writer.close)
        await loop.run_in_executor(self._reader_executor, self._reader.close)
        self._health.release()  # only now: its close drops the process's locks
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
