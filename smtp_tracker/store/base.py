"""The :class:`Store` interface the relay, the pixel endpoint and the CLI use.

:class:`~smtp_tracker.store.sqlite.SqliteStore` implements it over SQLite in
the data directory; a server-database backend can implement it later without
the callers changing.  Every method is a coroutine that never blocks the event
loop: implementations do their I/O in worker threads or with an async driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from smtp_tracker.store.records import MessageRecord, OpenHit, StoredMessage

__all__ = ["Store"]


class Store(Protocol):
    """Where message records and open events are kept."""

    async def record_message(self, record: MessageRecord) -> None:
        """Record one relayed transaction (call only after the upstream's 2xx).

        :raises StoreError: when it cannot be written, or its tracking id is
            already recorded.
        :raises ValueError: when a datetime in *record* is naive.
        """
        ...

    async def record_opens(self, hits: Sequence[OpenHit]) -> int:
        """Record the opens among *hits* whose tracking id is known, in one transaction.

        The store applies its ``ip_policy`` to each client address and cuts the
        User-Agent to 512 characters before storing.  Hits for unknown tracking
        ids are ignored.

        :returns: how many opens were recorded.
        :raises StoreError: when the batch cannot be written (nothing is).
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
