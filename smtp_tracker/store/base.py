"""The :class:`Store` interface the relay, the pixel endpoint and the CLI use.

:class:`~smtp_tracker.store.sqlite.SqliteStore` implements it over SQLite in
the data directory, :class:`~smtp_tracker.store.postgresql.PostgresStore`
over a PostgreSQL server (``store = "postgresql://..."``);
:func:`~smtp_tracker.store.backends.open_store` picks one.  :class:`ReportingStore`
adds what the reports and ``serve`` call.  Every method is a coroutine that never
blocks the event loop: implementations do their I/O in worker threads or with an async driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

from smtp_tracker.store.queries import Connection, Cursor
from smtp_tracker.store.records import (
    ClickEvent,
    LinkRecord,
    MessageRecord,
    OpenEvent,
    StoredMessage,
)

if TYPE_CHECKING:
    from smtp_tracker.store import queries, reclassify, retention

__all__ = [
    "Connection",
    "Cursor",
    "Database",
    "HealthReporting",
    "ReportingStore",
    "Store",
    "store_degraded",
]


class Store(Protocol):
    """Where message records and open events are kept."""

    async def record_message(self, record: MessageRecord) -> None:
        """Record one relayed transaction (call only after the upstream's 2xx).

        :raises StoreError: when it cannot be written, or its tracking id is
            already recorded.
        :raises ValueError: when a datetime in *record* is naive.
        """
        ...

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        """Record the opens among *hits* whose tracking id is known, in one transaction.

        The store classifies each open (its ``classifier``, which sees the
        client address before ``ip_policy``), applies its ``ip_policy`` to each
        client address and cuts the User-Agent to 512 characters before
        storing, and keeps the message's counters and the ``daily_stats``
        rollup current.  Hits for unknown tracking ids are ignored.

        :returns: how many opens were recorded.
        :raises StoreError: when the batch cannot be written (nothing is).
        """
        ...

    async def record_clicks(self, hits: Sequence[ClickEvent]) -> int:
        """Record the clicks among *hits* whose link token is known, in one transaction.

        Classified, ``ip_policy`` applied and User-Agent cut as for opens.

        :returns: how many clicks were recorded.
        :raises StoreError: when the batch cannot be written (nothing is).
        """
        ...

    async def find_link(self, token: str) -> tuple[LinkRecord, str] | None:
        """The wrapped link with click token *token*, and its message's tracking id.

        :raises StoreError: when the store cannot be read.
        """
        ...

    async def find_message(self, ident: str) -> StoredMessage | None:
        """The message whose tracking id, else queue id, else Message-ID is *ident*.

        A Message-ID matches with or without its angle brackets; when several
        messages share a queue id or Message-ID, the newest is returned.

        :raises StoreError: when the store cannot be read.
        """
        ...

    async def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """Messages relayed at or after *since*, newest first, at most *limit*.

        :param since: aware datetime, or ``None`` for no lower bound.
        :param limit: maximum number of messages (>= 0), or ``None`` for all.
        :raises StoreError: when the store cannot be read.
        :raises ValueError: when *since* is naive or *limit* negative.
        """
        ...

    async def is_known_token(self, tracking_id: str) -> bool:
        """Whether a message with *tracking_id* is recorded.

        :raises StoreError: when the store cannot be read.
        """
        ...

    async def aclose(self) -> None:
        """Finish pending writes and release the store; later calls raise StoreError."""
        ...


@runtime_checkable
class HealthReporting(Protocol):
    """A store that knows whether it keeps what it is given."""

    @property
    def degraded(self) -> str | None:
        """None when sound; else one line saying why records are not being kept."""
        ...


def store_degraded(store: object) -> str | None:
    """*store*'s :attr:`HealthReporting.degraded`, or None when it does not report its health."""
    return store.degraded if isinstance(store, HealthReporting) else None


class ReportingStore(Store, Protocol):
    """A :class:`Store` with the reports' queries (:mod:`.queries`) and retention:
    what ``serve``, ``pixel``, ``reports`` and the JSON API call.  Both backends are one.
    """

    @property
    def degraded(self) -> str | None:
        """See :attr:`HealthReporting.degraded`."""
        ...

    def set_tracking_mode(
        self, mode: str, *, per_message: bool = False, link_retention_days: int = 1825
    ) -> None:
        """``tracking_mode`` for the records written from now on (see the SQLite store)."""
        ...

    async def query_messages(
        self,
        message_filter: queries.MessageFilter,
        *,
        limit: int = ...,
        cursor: str | None = None,
    ) -> queries.MessagePage:
        """See :func:`.queries.query_messages`."""
        ...

    async def query_message(self, ident: str) -> queries.MessageDetail | None:
        """See :func:`.queries.query_message`."""
        ...

    async def query_stats(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        group: queries.StatsGroup = "day",
    ) -> list[queries.StatsRow]:
        """See :func:`.queries.query_stats`."""
        ...

    async def prune(self, before: datetime, *, batch_rows: int = ...) -> retention.Removed:
        """Every message relayed before *before*, with its events, links and recipients."""
        ...


class Database(Protocol):
    """The blocking store of a CLI command, on either backend: what ``stats``,
    ``messages``, ``show``, ``prune`` and ``forget`` call
    (:class:`~.sqlite.SqliteDatabase`, :class:`~.postgresql.PgDatabase`;
    :func:`~.backends.open_database` gives one).  Errors: :class:`StoreError`.
    """

    def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`Store.list_messages`."""
        ...

    def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`Store.find_message`."""
        ...

    def query_message(self, ident: str) -> queries.MessageDetail | None:
        """See :func:`.queries.query_message`."""
        ...

    def query_stats(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        group: queries.StatsGroup = "day",
    ) -> list[queries.StatsRow]:
        """See :func:`.queries.query_stats`."""
        ...

    def prune(self, before: datetime, *, batch_rows: int = ...) -> retention.Removed:
        """Every message relayed before *before*, whole; the rows removed."""
        ...

    def count_prunable(self, before: datetime) -> retention.Removed:
        """What :meth:`prune` would remove."""
        ...

    def forget_recipient(self, address: str, *, batch_rows: int = ...) -> retention.Removed:
        """Every message sent to *address*, whole; the rows removed and their queue ids."""
        ...

    def count_recipient(self, address: str) -> retention.Removed:
        """What :meth:`forget_recipient` would remove."""
        ...

    def reclassify_scope(self, since: date | None) -> tuple[int, list[str]]:
        """Messages :meth:`reclassify_batch` will read, and the days to rebuild."""
        ...

    def reclassify_batch(
        self, *, since: date | None = ..., after_rowid: int = ..., batch_messages: int = ...
    ) -> reclassify.Batch:
        """See :func:`.reclassify.reclassify_batch`, with the store's classifier."""
        ...

    def rebuild_rollup_day(self, day: str) -> reclassify.DayRebuild:
        """See :func:`.reclassify.rebuild_rollup_day`."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
