"""The event writer: pixel hits go through a bounded queue to the store in batches.

The pixel handler calls :meth:`EventWriter.offer`, which never waits: when the
queue is full the hit is dropped and counted.  One writer task takes whatever
has accumulated (up to *batch_max* hits) and records it in one
:meth:`~smtp_tracker.store.base.Store.record_opens` transaction; while that
transaction runs in the store's thread, the next batch accumulates, so the
batch size follows the load.  Whether a token is known is decided by the store
inside that transaction, so no request waits for the database.  Clicks
(:class:`~smtp_tracker.store.records.ClickEvent`, from the click endpoint) go
through the same queue; a batch holding both is written with
:meth:`~smtp_tracker.store.base.Store.record_opens` then
:meth:`~smtp_tracker.store.base.Store.record_clicks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from smtp_tracker.store.base import Store
from smtp_tracker.store.integrity import StoreSuspendedError
from smtp_tracker.store.records import ClickEvent, OpenEvent

__all__ = ["EventWriter"]

logger = logging.getLogger(__name__)

#: Single events failing in a row, none recorded, before a failed batch's rest is given up.
_GIVE_UP_AFTER = 3


class EventWriter:
    """Batches :class:`OpenEvent` and :class:`ClickEvent` events from a bounded queue into a
    :class:`Store`.

    Counters (plain ints, read them for logs and reports):

    * :attr:`offered`: hits offered;
    * :attr:`dropped`: hits dropped because the queue was full, the writer was
      not running, or :meth:`stop` timed out (a write under way at that
      moment may or may not have been committed);
    * :attr:`recorded`: opens and clicks the store recorded;
    * :attr:`unknown`: hits the store ignored (token not known);
    * :attr:`failed`: hits lost because the store raised (logged as warnings).
      When a batch fails, its events are written again one by one, so an
      event the store cannot take costs only itself, never its neighbours;
      a store failing :data:`_GIVE_UP_AFTER` single events in a row (down,
      not fed a bad event) is not tried for the rest of that batch.

    :param store: where the opens and clicks go.
    :param queue_size: queue bound, in events (>= 1).
    :param batch_max: most events per transaction (>= 1).
    :param flush_timeout_s: how long :meth:`stop` waits for the queue to drain,
        in seconds; what is left after it is counted in :attr:`dropped`.
    """

    def __init__(
        self,
        store: Store,
        *,
        queue_size: int = 10_000,
        batch_max: int = 500,
        flush_timeout_s: float = 10.0,
    ) -> None:
        if queue_size < 1 or batch_max < 1:
            raise ValueError("queue_size and batch_max must be at least 1")
        self._store = store
        self._queue: asyncio.Queue[OpenEvent | ClickEvent | None] = asyncio.Queue(queue_size)
        self._batch_max = batch_max
        self._flush_timeout_s = flush_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._in_flight = 0
        self.offered = 0
        self.dropped = 0
        self.recorded = 0
        self.unknown = 0
        self.failed = 0

    def __repr__(self) -> str:
        return (
            f"EventWriter(offered={self.offered}, recorded={self.recorded},"
            f" unknown={self.unknown}, dropped={self.dropped}, failed={self.failed},"
            f" pending={self.pending})"
        )

    @property
    def pending(self) -> int:
        """Hits queued and not yet handed to the store."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        """Whether the writer task is running."""
        return self._task is not None and not self._task.done()

    def offer(self, hit: OpenEvent | ClickEvent) -> bool:
        """Queue *hit* without waiting; ``False`` (and counted) when dropped."""
        self.offered += 1
        if not self._accepting:
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait(hit)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    async def start(self) -> None:
        """Start the writer task (in the running loop)."""
        if self._task is not None:
            raise RuntimeError("EventWriter already started")
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="smtp-tracker-event-writer")

    async def stop(self) -> None:
        """Stop accepting hits, write the queued ones, and end the writer task."""
        self._accepting = False
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(self._flush_timeout_s):
                await self._queue.put(None)
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            left = self._in_flight + sum(1 for item in _drain(self._queue) if item is not None)
            self._in_flight = 0
            self.dropped += left
            logger.warning("event writer: %d opens not written at shutdown", left)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            item = await queue.get()
            batch: list[OpenEvent | ClickEvent] = []
            stopping = False
            while True:
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                if len(batch) >= self._batch_max or queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                await self._write(batch)
            if stopping:
                return

    async def _write(self, batch: list[OpenEvent | ClickEvent]) -> None:
        opens = [hit for hit in batch if isinstance(hit, OpenEvent)]
        clicks = [hit for hit in batch if isinstance(hit, ClickEvent)]
        self._in_flight = len(batch)
        for kind, hits in (("opens", opens), ("clicks", clicks)):
            if not hits:
                continue
            try:
                recorded = await self._record(kind, hits)
            except StoreSuspendedError:  # said loudly once, at start; counted here
                self.failed += len(hits)
            except Exception as exc:  # keep the writer alive whatever the store does
                if len(hits) == 1:
                    self.failed += 1
                    logger.warning("event writer: 1 %s lost: %s", kind[:-1], exc)
                else:
                    logger.warning(
                        "event writer: a batch of %d %s failed (%s); writing them one by one",
                        len(hits),
                        kind,
                        exc,
                    )
                    await self._write_one_by_one(kind, hits)
            else:
                self.recorded += recorded
                self.unknown += len(hits) - recorded
            self._in_flight -= len(hits)
        self._in_flight = 0  # (left set when cancelled: stop() counts it)

    async def _record(self, kind: str, hits: Sequence[OpenEvent | ClickEvent]) -> int:
        if kind == "opens":
            return await self._store.record_opens([h for h in hits if isinstance(h, OpenEvent)])
        return await self._store.record_clicks([h for h in hits if isinstance(h, ClickEvent)])

    async def _write_one_by_one(self, kind: str, hits: Sequence[OpenEvent | ClickEvent]) -> None:
        """After a failed batch: each event alone, so a bad one costs only itself.

        A store that fails :data:`_GIVE_UP_AFTER` single events in a row
        without one success is down, not fed a bad event: the rest of the
        batch is counted as failed without trying each.
        """
        in_a_row = 0
        for done, hit in enumerate(hits):
            try:
                recorded = await self._record(kind, [hit])
            except Exception as exc:
                self.failed += 1
                in_a_row += 1
                logger.warning("event writer: 1 %s lost: %s", kind[:-1], exc)
                if in_a_row >= _GIVE_UP_AFTER:
                    left = len(hits) - done - 1
                    self.failed += left
                    if left:
                        logger.warning(
                            "event writer: the store keeps failing; %d %s lost", left, kind
                        )
                    return
            else:
                in_a_row = 0
                self.recorded += recorded
                self.unknown += 1 - recorded


def _drain(
    queue: asyncio.Queue[OpenEvent | ClickEvent | None],
) -> list[OpenEvent | ClickEvent | None]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
