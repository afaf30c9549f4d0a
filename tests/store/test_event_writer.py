"""The event writer: bounded queue, batches, drops counted, flush at stop.

No backend: the writer over a fake store (the stores themselves are tested on both).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import OpenEvent
from smtp_tracker.store.writer import EventWriter
from tests.support.stores import OpensOnlyStore

from .store_helpers import T0, token


class FakeStore(OpensOnlyStore):
    """Records batches; :attr:`gate` (when set) makes each write wait until opened."""

    def __init__(self, *, gated: bool = False, fail_first: int = 0) -> None:
        self.batches: list[list[OpenEvent]] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.entered = asyncio.Event()
        self.fail_first = fail_first

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        self.entered.set()
        await self.gate.wait()
        if self.fail_first:
            self.fail_first -= 1
            raise StoreError("disk full")
        self.batches.append(list(hits))
        return sum(1 for h in hits if h.tracking_id != token(0))  # token 0 is "unknown"


def hit(i: int) -> OpenEvent:
    return OpenEvent(tracking_id=token(i), at=T0, ip=None, user_agent=None)


async def test_batches_follow_the_load_and_stop_flushes() -> None:
    store = FakeStore(gated=True)
    writer = EventWriter(store, queue_size=100, batch_max=4)
    await writer.start()
    assert writer.offer(hit(1))
    await asyncio.wait_for(store.entered.wait(), 5)  # the writer holds batch [1]
    for i in range(2, 12):
        assert writer.offer(hit(i))
    store.gate.set()
    await writer.stop()
    assert [len(b) for b in store.batches] == [1, 4, 4, 2]
    assert [h.tracking_id for b in store.batches for h in b] == [token(i) for i in range(1, 12)]
    assert (writer.offered, writer.recorded, writer.dropped, writer.pending) == (11, 11, 0, 0)
    assert not writer.running


async def test_full_queue_drops_and_counts() -> None:
    store = FakeStore(gated=True)
    writer = EventWriter(store, queue_size=2, batch_max=1)
    await writer.start()
    writer.offer(hit(1))
    await asyncio.wait_for(store.entered.wait(), 5)
    results = [writer.offer(hit(i)) for i in range(2, 7)]
    assert results == [True, True, False, False, False]
    assert writer.dropped == 3
    store.gate.set()
    await writer.stop()
    assert writer.recorded == 3


async def test_unknown_tokens_are_counted() -> None:
    store = FakeStore()
    writer = EventWriter(store)
    await writer.start()
    writer.offer(hit(0))
    writer.offer(hit(1))
    await writer.stop()
    assert (writer.recorded, writer.unknown) == (1, 1)


async def test_store_errors_are_counted_and_the_writer_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore(fail_first=1)
    writer = EventWriter(store)
    await writer.start()
    writer.offer(hit(1))
    await writer.stop()
    assert writer.failed == 1
    assert "disk full" in caplog.text

    writer = EventWriter(store)
    await writer.start()
    writer.offer(hit(2))
    await writer.stop()
    assert (writer.failed, writer.recorded) == (0, 1)


async def test_offers_before_start_or_after_stop_are_dropped() -> None:
    writer = EventWriter(FakeStore())
    assert not writer.offer(hit(1))
    await writer.start()
    with pytest.raises(RuntimeError):
        await writer.start()
    await writer.stop()
    assert not writer.offer(hit(2))
    assert writer.dropped == 2


async def test_stop_gives_up_after_the_flush_timeout(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore(gated=True)  # never opened: the store hangs
    writer = EventWriter(store, queue_size=10, batch_max=1, flush_timeout_s=0.2)
    await writer.start()
    for i in range(1, 4):
        writer.offer(hit(i))
    await writer.stop()
    assert not writer.running
    assert writer.dropped == 3  # hit 1 was in the hung write; 2 and 3 were still queued
    assert "not written at shutdown" in caplog.text


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EventWriter(FakeStore(), queue_size=0)
