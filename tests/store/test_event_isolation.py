"""One hostile event never costs its neighbours (issue 12, item 1).

A pixel ``GET`` for a real token whose ``User-Agent`` is not UTF-8 (the byte
``\\xff``, which aiohttp hands on as the lone surrogate ``'\\udcff'``) used to
make the whole batch it landed in fail (``'utf-8' codec can't encode
character '\\udcff'``): opens of other recipients were lost.  Here over the
real pixel listener (HTTPS on port 0), then at the writer and store level; the
listener and store tests on both backends (conftest's ``store``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import MessageRecord, OpenEvent, SqliteStore
from smtp_tracker.store.records import header_text
from smtp_tracker.store.writer import EventWriter
from smtp_tracker.web import WRITER_KEY, make_pixel_app, start_site
from tests.support.stores import OpensOnlyStore
from tests.support.waiting import wait_until

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LEGITIMATE = 12


def _token(i: int) -> str:
    return base64.urlsafe_b64encode(i.to_bytes(17, "big")).rstrip(b"=").decode()


def _record(i: int) -> MessageRecord:
    return MessageRecord(
        tracking_id=_token(i),
        queue_id=f"Q{i:06d}",
        message_id=f"<m{i}@example.com>",
        sender="alice@example.com",
        recipients=[f"r{i}@example.net"],
        size_bytes=500,
        received_at=T0,
        relayed_at=T0,
        upstream_reply="250 2.0.0 Ok",
        tracked=True,
    )


async def _get(port: int, path: str, user_agent: bytes, context: ssl.SSLContext) -> bytes:
    """One raw HTTPS request whose User-Agent octets are sent as they are."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        writer.write(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
            b"User-Agent: " + user_agent + b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_a_non_utf8_user_agent_costs_no_neighbour_its_open(
    store: SqliteStore, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    for i in range(LEGITIMATE + 1):
        await store.record_message(_record(i))
    app = make_pixel_app(store=store)
    runner, port = await start_site(app, host="127.0.0.1", port=0, ssl_context=server_ssl_context)
    try:
        writer = app[WRITER_KEY]
        requests = [
            _get(port, f"/o/{_token(i)}.gif", f"Mail/{i}".encode(), client_ssl_context)
            for i in range(1, LEGITIMATE + 1)
        ]
        # the bad one in the middle of the others, so that it shares their batch
        bad = _get(port, f"/o/{_token(0)}.gif", b"Evil\xff/1.0", client_ssl_context)
        requests.insert(LEGITIMATE // 2, bad)
        replies = await asyncio.gather(*requests)
        assert all(r.startswith(b"HTTP/1.1 200 ") for r in replies), [r[:20] for r in replies]
        await wait_until(
            lambda: writer.recorded + writer.failed + writer.unknown >= LEGITIMATE + 1,
            timeout_s=30,
            message="the opens were not all written",
        )
    finally:
        await runner.cleanup()
    for i in range(1, LEGITIMATE + 1):
        found = await store.find_message(_token(i))
        assert found is not None and [o.user_agent for o in found.opens] == [f"Mail/{i}"], i
    bad = await store.find_message(_token(0))
    assert bad is not None
    assert [o.user_agent for o in bad.opens] == ["Evil\ufffd/1.0"]  # replaced, not lost
    assert (writer.recorded, writer.failed) == (LEGITIMATE + 1, 0)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, None),
        ("Mozilla/5.0", "Mozilla/5.0"),
        ("Evil\udcff/1.0", "Evil\ufffd/1.0"),  # aiohttp's surrogateescape'd \xff
        ("caf\udcc3\udca9", "caf\u00e9"),  # UTF-8 octets escaped one by one: decoded
        ("\ud800x", "\ufffdx"),  # any other lone surrogate
        ("a\x00b", "a\ufffdb"),  # NUL
    ],
)
def test_header_text(value: str | None, text: str | None) -> None:
    assert header_text(value) == text
    if text is not None:
        text.encode("utf-8")  # always encodable


async def test_store_records_a_lone_surrogate_user_agent_replaced(store: SqliteStore) -> None:
    await store.record_message(_record(1))
    await store.record_message(_record(2))
    hits = [
        OpenEvent(tracking_id=_token(1), at=T0, ip="192.0.2.1", user_agent="A\udcffB"),
        OpenEvent(tracking_id=_token(2), at=T0, ip="192.0.2.2", user_agent="ok"),
    ]
    assert await store.record_opens(hits) == 2
    one, two = await store.find_message(_token(1)), await store.find_message(_token(2))
    assert one is not None and two is not None
    assert [o.user_agent for o in one.opens] == ["A\ufffdB"]
    assert [o.user_agent for o in two.opens] == ["ok"]


class PoisonStore(OpensOnlyStore):
    """Refuses any batch holding the poison token (as a store bug would); counts its calls."""

    def __init__(self, *, down: bool = False) -> None:
        self.written: list[str] = []
        self.calls = 0
        self.down = down

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        self.calls += 1
        if self.down or any(h.tracking_id == _token(0) for h in hits):
            raise StoreError("cannot record")
        self.written.extend(h.tracking_id for h in hits)
        return len(hits)


def _hit(i: int) -> OpenEvent:
    return OpenEvent(tracking_id=_token(i), at=T0, ip=None, user_agent=None)


async def test_a_failing_batch_is_retried_one_by_one_and_only_the_bad_event_is_lost() -> None:
    store = PoisonStore()
    writer = EventWriter(store, batch_max=100)
    await writer.start()
    for i in [1, 2, 3, 0, 4, 5]:
        writer.offer(_hit(i))
    await writer.stop()
    assert sorted(store.written) == sorted(_token(i) for i in [1, 2, 3, 4, 5])
    assert (writer.recorded, writer.failed) == (5, 1)


async def test_a_store_that_is_down_is_not_hammered_once_per_event() -> None:
    store = PoisonStore(down=True)
    writer = EventWriter(store, batch_max=500)
    await writer.start()
    for i in range(1, 401):
        writer.offer(_hit(i))
    await writer.stop()
    assert writer.failed == 400
    assert store.calls <= 1 + 3 + 1  # the batch, a few single retries: then the rest is given up
