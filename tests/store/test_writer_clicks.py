"""The event writer carries clicks too: one queue, opens and clicks written apart.

No backend: the writer over a fake store (clicks in a real store: test_schema_v3.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from smtp_tracker.errors import StoreError
from smtp_tracker.store import ClickEvent, OpenEvent
from smtp_tracker.store.writer import EventWriter
from tests.support.stores import OpensOnlyStore

from .store_helpers import T0, token


class EventsStore(OpensOnlyStore):
    """Keeps what it is given; clicks can be made to fail."""

    def __init__(self, *, clicks_fail: bool = False) -> None:
        self.opens: list[OpenEvent] = []
        self.clicks: list[ClickEvent] = []
        self.clicks_fail = clicks_fail

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        assert all(isinstance(h, OpenEvent) for h in hits)
        self.opens.extend(hits)
        return len(hits)

    async def record_clicks(self, hits: Sequence[ClickEvent]) -> int:
        assert all(isinstance(h, ClickEvent) for h in hits)
        if self.clicks_fail:
            raise StoreError("disk full")
        self.clicks.extend(hits)
        return len(hits) - 1  # one unknown link token


def open_hit(i: int) -> OpenEvent:
    return OpenEvent(tracking_id=token(i), at=T0, ip=None, user_agent=None)


def click_hit(i: int) -> ClickEvent:
    return ClickEvent(link_token=token(i), at=T0, ip="192.0.2.1", user_agent="ua")


async def test_opens_and_clicks_in_one_queue_reach_their_own_store_calls() -> None:
    store = EventsStore()
    writer = EventWriter(store, queue_size=100, batch_max=50)
    await writer.start()
    offered = [open_hit(1), click_hit(2), open_hit(3), click_hit(4), click_hit(5)]
    for hit in offered:
        assert writer.offer(hit)
    await writer.stop()
    assert store.opens == [offered[0], offered[2]]
    assert store.clicks == [offered[1], offered[3], offered[4]]
    assert (writer.recorded, writer.unknown, writer.failed, writer.dropped) == (4, 1, 0, 0)


async def test_a_failing_click_write_loses_only_the_clicks() -> None:
    store = EventsStore(clicks_fail=True)
    writer = EventWriter(store, queue_size=100, batch_max=50)
    await writer.start()
    for hit in (open_hit(1), click_hit(2), open_hit(3)):
        assert writer.offer(hit)
    await writer.stop()
    assert [h.tracking_id for h in store.opens] == [token(1), token(3)]
    assert (writer.recorded, writer.failed) == (2, 1)
