"""Rate limits on recorded events: the limiter alone, then floods over real HTTPS.

The GIF is always served; only what is recorded is limited, per token and per
token and client, never per client alone.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import aiohttp
import pytest

from smtp_tracker.store import SqliteStore
from smtp_tracker.web import TRANSPARENT_GIF, WRITER_KEY
from smtp_tracker.web.public.limits import EventLimiter
from smtp_tracker.web.public.pixel import LIMITER_KEY

from .web_helpers import StartPixel, make_record, token, wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_per_token_and_client_limit_then_the_window_restarts() -> None:
    clock = FakeClock()
    limiter = EventLimiter(per_token_per_min=30, per_token_client_per_min=5, clock=clock)
    assert [limiter.allow("t1", "192.0.2.1") for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("t1", "192.0.2.2")  # another client has its own allowance
    assert limiter.allow("t2", "192.0.2.1")  # another token too
    clock.now = 1059.5
    assert not limiter.allow("t1", "192.0.2.1")
    clock.now = 1060.0  # 60 s after the first event: a new window
    assert [limiter.allow("t1", "192.0.2.1") for _ in range(6)] == [True] * 5 + [False]
    assert limiter.counters == {"allowed": 12, "limited_token": 0, "limited_client": 4}


def test_per_token_cap_across_clients_and_refused_events_use_no_allowance() -> None:
    limiter = EventLimiter(per_token_per_min=8, per_token_client_per_min=5, clock=FakeClock())
    a = [limiter.allow("t", "192.0.2.1") for _ in range(20)]
    b = [limiter.allow("t", "2001:db8::2") for _ in range(20)]
    c = [limiter.allow("t", "198.51.100.3") for _ in range(3)]
    assert (sum(a), sum(b), sum(c)) == (5, 3, 0)  # 15 refusals of A cost B nothing
    assert limiter.counters == {"allowed": 8, "limited_token": 20, "limited_client": 15}


def test_no_limit_per_client_address_alone() -> None:
    """One provider proxy fetching for a thousand recipients: every open is recorded."""
    limiter = EventLimiter(clock=FakeClock())
    assert all(limiter.allow(f"token-{i}", "66.249.84.22") for i in range(1000))
    assert limiter.limited_token == limiter.limited_client == 0


def test_zero_disables_a_limit_and_unknown_clients_share_one_allowance() -> None:
    limiter = EventLimiter(per_token_per_min=0, per_token_client_per_min=2, clock=FakeClock())
    assert [limiter.allow("t", None) for _ in range(3)] == [True, True, False]
    assert sum(limiter.allow("t", f"192.0.2.{i}") for i in range(100)) == 100
    unlimited = EventLimiter(per_token_per_min=0, per_token_client_per_min=0)
    assert all(unlimited.allow("t", "192.0.2.1") for _ in range(1000)) and unlimited.keys == 0
    with pytest.raises(ValueError, match="0 \\(no limit\\) or more"):
        EventLimiter(per_token_per_min=-1)
    with pytest.raises(ValueError, match="max_keys"):
        EventLimiter(max_keys=0)


def test_memory_is_bounded_least_recently_used_first_out() -> None:
    limiter = EventLimiter(per_token_per_min=3, per_token_client_per_min=3, max_keys=100)
    for _ in range(3):
        assert limiter.allow("hot", "192.0.2.1")
    for i in range(10_000):
        limiter.allow(f"cold-{i}", f"198.51.{i // 256 % 256}.{i % 256}")
        if i % 50 == 0:
            assert not limiter.allow("hot", "192.0.2.1")  # still known: touched, kept
    assert limiter.keys == 200  # 100 tokens + 100 (token, client) pairs


# -- over real HTTPS ---------------------------------------------------------------------


async def get_many(
    base_url: str, path: str, count: int, ssl_context: ssl.SSLContext, *, local: str
) -> list[tuple[int, bytes]]:
    connector = aiohttp.TCPConnector(ssl=ssl_context, limit=50, local_addr=(local, 0))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> tuple[int, bytes]:
            async with session.get(base_url + path) as response:
                return response.status, await response.read()

        return await asyncio.gather(*(one() for _ in range(count)))


async def test_a_flood_on_one_token_gets_every_gif_and_records_the_limit(
    store: SqliteStore,
    start_pixel: StartPixel,
    client_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await store.record_message(make_record(1))
    limiter = EventLimiter()  # the defaults: 30 per token, 5 per token and client
    server = await start_pixel(store=store, limiter=limiter)
    assert server.app[LIMITER_KEY] is limiter
    answers = await get_many(
        server.base_url, f"/o/{token(1)}.gif", 500, client_ssl_context, local="127.0.0.1"
    )
    assert answers == [(200, TRANSPARENT_GIF)] * 500
    writer = server.app[WRITER_KEY]
    await wait_until(lambda: writer.pending == 0 and writer.recorded == 5, what="the writer")
    assert writer.offered == 5
    found = await store.find_message(token(1))
    assert found is not None and len(found.opens) == 5
    assert limiter.counters == {"allowed": 5, "limited_token": 0, "limited_client": 495}
    with caplog.at_level(logging.INFO, logger="smtp_tracker.web.public.pixel"):
        await server.runner.cleanup()
    expected = "EventLimiter(allowed=5, limited_token=0, limited_client=495)"
    assert f"pixel endpoint event limits: {expected}" in caplog.text


async def test_two_clients_on_one_token_each_get_their_allowance_up_to_the_token_cap(
    tmp_path: Path, start_pixel: StartPixel, client_ssl_context: ssl.SSLContext
) -> None:
    async with await SqliteStore.open(tmp_path / "full", ip_policy="full") as store:
        await two_clients(store, start_pixel, client_ssl_context)


async def two_clients(
    store: SqliteStore, start_pixel: StartPixel, client_ssl_context: ssl.SSLContext
) -> None:
    await store.record_message(make_record(1))
    await store.record_message(make_record(2))
    limiter = EventLimiter(per_token_per_min=8, per_token_client_per_min=5)
    server = await start_pixel(store=store, limiter=limiter)
    path = f"/o/{token(1)}.gif"
    # distinct TCP peers on loopback: 127.0.0.2 and 127.0.0.3 reach the 127.0.0.1 listener
    first = await get_many(server.base_url, path, 40, client_ssl_context, local="127.0.0.2")
    second = await get_many(server.base_url, path, 40, client_ssl_context, local="127.0.0.3")
    other = await get_many(
        server.base_url, f"/o/{token(2)}.gif", 40, client_ssl_context, local="127.0.0.2"
    )
    assert first + second + other == [(200, TRANSPARENT_GIF)] * 120
    writer = server.app[WRITER_KEY]
    await wait_until(lambda: writer.pending == 0 and writer.recorded == 13, what="the writer")
    opened = await store.find_message(token(1))
    assert opened is not None
    by_client: dict[str | None, int] = {}
    for event in opened.opens:
        by_client[event.ip] = by_client.get(event.ip, 0) + 1
    assert by_client == {"127.0.0.2": 5, "127.0.0.3": 3}  # 5 + 3 = the token's cap, 8
    assert limiter.counters == {"allowed": 13, "limited_token": 37, "limited_client": 70}
    other_opened = await store.find_message(token(2))
    assert other_opened is not None and len(other_opened.opens) == 5
    await server.runner.cleanup()  # before this test's store closes
