"""The async PostgreSQL store: :class:`PostgresStore`, over a bounded connection pool.

psycopg 3 with a bounded :class:`psycopg_pool.ConnectionPool`; each call
borrows a connection in one of as many worker threads as the pool has
connections, and runs a :class:`~.database.PgDatabase` on it.  Outages are
:mod:`.outage`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from smtp_tracker.errors import StoreError
from smtp_tracker.store import dashboard_users, pg_outbox, queries, retention
from smtp_tracker.store.address import IpPolicy
from smtp_tracker.store.postgresql.connection import (
    DEFAULT_TIMEOUT_S,
    Options,
    address_policy,
    connect_kwargs,
    error_text,
    redacted,
)
from smtp_tracker.store.postgresql.database import PgDatabase
from smtp_tracker.store.postgresql.migration import migrate
from smtp_tracker.store.postgresql.outage import (
    Outage,
    PgCounters,
    StoreUnavailableError,
    is_outage,
)
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

if TYPE_CHECKING:
    import psycopg_pool

__all__ = ["DEFAULT_POOL_SIZE", "PostgresStore"]

log = logging.getLogger("smtp_tracker.store")

_T = TypeVar("_T")

#: Connections (and worker threads) per process.
DEFAULT_POOL_SIZE = 4


class PostgresStore:
    """The async :class:`~.base.ReportingStore` over a bounded psycopg connection pool.

    Open with ``await PostgresStore.open(dsn, ...)``; close with :meth:`aclose`
    or ``async with``.  Positive :meth:`is_known_token` answers are cached as
    :class:`~.sqlite.SqliteStore` does.
    """

    def __init__(
        self,
        dsn: str,
        pool: psycopg_pool.ConnectionPool[Any],
        executor: ThreadPoolExecutor,
        options: Options,
        *,
        known_cache_size: int = 4096,
    ) -> None:
        self.dsn = dsn
        self._pool = pool
        self._executor = executor
        self._options = options
        self._known = KnownTokens(known_cache_size)
        self._closed = False
        self._timeout_s = DEFAULT_TIMEOUT_S
        self.counters = PgCounters()
        self._outage = Outage(self.counters)
        #: never set: a PostgreSQL store is not suspended, it waits for its server
        self.suspended: str | None = None

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        store_subject: bool = False,
        ip_policy: IpPolicy = "truncate",
        hash_key: bytes | None = None,
        password_file: Path | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        known_cache_size: int = 4096,
        classifier: EventClassifier = unclassified,
        require_server: bool = True,
    ) -> PostgresStore:
        """Open a pool on *dsn*, creating or migrating the schema when the server answers.

        :param pool_size: connections (and threads) at most, >= 1.
        :param timeout_s: seconds a call waits for a connection before failing.
        :param require_server: when false, a server down at start is logged
            (the first outage) and the store opens anyway: mail flows and the
            schema is made when the server comes (``serve``, ``pixel``).
        :raises StoreError: when the DSN holds a password, or (with
            *require_server*) the server cannot be reached or migrated.
        """
        from psycopg_pool import ConnectionPool

        # the pool logs each failed reconnection; the store logs an outage once
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        policy = address_policy(dsn, ip_policy, hash_key)
        kwargs = connect_kwargs(password_file, timeout_s)
        pool: ConnectionPool[Any] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs=kwargs,
            timeout=timeout_s,
            open=False,
            check=ConnectionPool.check_connection,
            reconnect_timeout=timeout_s * 4,
            name="smtp-tracker-store",
        )
        executor = ThreadPoolExecutor(max(1, pool_size), thread_name_prefix="store-pg")
        store = cls(
            dsn,
            pool,
            executor,
            Options(store_subject, policy, classifier),
            known_cache_size=known_cache_size,
        )
        store._timeout_s = timeout_s
        await asyncio.get_running_loop().run_in_executor(executor, lambda: pool.open(wait=False))
        store._migrated = False
        try:
            await store._ensure_schema()
        except StoreError:
            if require_server:
                await store.aclose()
                raise
        return store

    _migrated: bool = False

    async def _ensure_schema(self) -> None:
        if not self._migrated:
            await self._call(lambda db: migrate(db._raw), migrate_first=False)
            self._migrated = True

    @property
    def degraded(self) -> str | None:
        """None while the server answers; else why records are not being kept (one line)."""
        return self._outage.reason

    @property
    def data_dir(self) -> None:
        """No data directory: the store is on a server."""
        return None

    def set_tracking_mode(
        self, mode: str, *, per_message: bool = False, link_retention_days: int = 1825
    ) -> None:
        """As :meth:`.sqlite.SqliteStore.set_tracking_mode`."""
        if mode not in ("per-person", "aggregate"):
            raise ValueError(f"tracking_mode must be per-person or aggregate, got {mode!r}")
        self._options.tracking_mode = mode
        self._options.aggregate_per_message = per_message
        self._options.link_retention_days = link_retention_days

    def set_outbox(self, hook: pg_outbox.PgOutboxHook | None) -> None:
        """Have *hook* told of each record and event inside the transaction that writes
        it (the webhook outbox, :mod:`.pg_outbox`); None: no longer."""
        self._options.outbox = hook

    # -- plumbing -----------------------------------------------------------------------

    def _run_sync(self, call: Callable[[PgDatabase], _T]) -> _T:
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn:
                result = call(PgDatabase(conn, self._options))
        except PoolTimeout as exc:
            self._outage.failed(f"no connection within {self._timeout_s:g} s")
            raise StoreUnavailableError(
                f"the store at {redacted(self.dsn)} does not answer"
            ) from exc
        except StoreError as exc:
            if is_outage(exc):
                self._outage.failed(error_text(exc.__cause__ or exc))
                raise StoreUnavailableError(str(exc)) from exc.__cause__
            raise
        except Exception as exc:
            import psycopg

            if isinstance(exc, psycopg.OperationalError):
                self._outage.failed(error_text(exc))
                raise StoreUnavailableError(f"the store failed: {error_text(exc)}") from exc
            if isinstance(exc, psycopg.Error):
                raise StoreError(f"the store failed: {error_text(exc)}") from exc
            raise
        self._outage.succeeded()
        return result

    async def _call(self, call: Callable[[PgDatabase], _T], *, migrate_first: bool = True) -> _T:
        if self._closed:
            raise StoreError("the tracking store is closed")
        self._outage.refuse_early()
        if migrate_first and not self._migrated:
            await self._ensure_schema()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._run_sync(call)
        )

    async def aclose(self) -> None:
        """Close the pool and its threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._pool.close)
        self._executor.shutdown(wait=False)
        if self.counters.failures:
            log.warning("tracking store closed: %s", self.counters)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the Store ----------------------------------------------------------------------

    async def record_message(self, record: MessageRecord) -> None:
        """See :meth:`.base.Store.record_message`."""
        to_us(record.relayed_at)
        to_us(record.received_at)
        await self._call(lambda db: db.record_message(record))

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        """See :meth:`.base.Store.record_opens`."""
        batch = list(hits)
        return await self._call(lambda db: db.record_opens(batch))

    async def record_clicks(self, hits: Sequence[ClickEvent]) -> int:
        """See :meth:`.base.Store.record_clicks`."""
        batch = list(hits)
        return await self._call(lambda db: db.record_clicks(batch))

    async def find_link(self, token: str) -> tuple[LinkRecord, str] | None:
        """See :meth:`.base.Store.find_link`."""
        return await self._call(lambda db: db.find_link(token))

    async def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`.base.Store.find_message`."""
        return await self._call(lambda db: db.find_message(ident))

    async def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`.base.Store.list_messages`."""
        if since is not None:
            to_us(since)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return await self._call(lambda db: db.list_messages(since=since, limit=limit))

    async def is_known_token(self, tracking_id: str) -> bool:
        """See :meth:`.base.Store.is_known_token`; positive answers are cached."""
        if self._known.hit(tracking_id):
            return True
        known = await self._call(lambda db: db.is_known_token(tracking_id))
        if known:
            self._known.add(tracking_id)
        return known

    async def integrity_check(self) -> str:
        """``"ok"`` when the server answers."""
        return await self._call(lambda db: db.integrity_check())

    async def read_dashboard_users(self) -> dict[str, dashboard_users.UserEntry]:
        """The reports dashboard's users (:func:`.dashboard_users.read_all`).

        :raises StoreError: when they cannot be read (a
            :class:`~.outage.StoreUnavailableError` while the server is away).
        """
        return await self._call(lambda db: dashboard_users.read_all(db.connection))

    async def check_health(self) -> str | None:
        """Ask the server now; :attr:`degraded` follows the answer."""
        self.counters.health_checks += 1
        with contextlib.suppress(StoreError):
            await self._call(lambda db: db.integrity_check())
        return self.degraded

    async def query_messages(
        self,
        message_filter: queries.MessageFilter,
        *,
        limit: int = queries.DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> queries.MessagePage:
        """See :func:`.queries.query_messages`."""
        queries.check_limit(limit)
        return await self._call(
            lambda db: db.query_messages(message_filter, limit=limit, cursor=cursor)
        )

    async def query_message(self, ident: str) -> queries.MessageDetail | None:
        """See :func:`.queries.query_message`."""
        return await self._call(lambda db: db.query_message(ident))

    async def query_stats(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        group: queries.StatsGroup = "day",
    ) -> list[queries.StatsRow]:
        """See :func:`.queries.query_stats`."""
        return await self._call(lambda db: db.query_stats(since=since, until=until, group=group))

    async def prune(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """See :meth:`PgDatabase.prune`; one batch per call, so writers run between them."""
        to_us(before)
        total = retention.Removed()
        try:
            while (
                removed := await self._call(
                    lambda db: db.prune_batch(before, batch_rows=batch_rows)
                )
            ).messages:
                total += removed
            total += removed  # the last: the webhook outbox's old events
            while links := await self._call(lambda db: db.prune_links_batch(batch_rows=batch_rows)):
                total += retention.Removed(links=links)
            return total
        finally:
            self._known.clear()
