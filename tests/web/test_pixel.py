"""The pixel endpoint over real HTTPS: responses, recording, proxies, limits, drops."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import struct
from collections.abc import Mapping, Sequence

import aiohttp
import pytest

from smtp_tracker.store import OpenEvent, SqliteStore
from smtp_tracker.web import TRANSPARENT_GIF, WRITER_KEY
from tests.support.stores import OpensOnlyStore

from .web_helpers import (
    PixelServer,
    StartPixel,
    get,
    make_record,
    raw_request,
    token,
    wait_until,
)

CACHE_CONTROL = "no-store, no-cache, must-revalidate, private"


def check_pixel_headers(headers: Mapping[str, str]) -> None:
    h = dict(headers)
    assert h["Content-Type"] == "image/gif"
    assert h["Cache-Control"] == CACHE_CONTROL
    assert h["Pragma"] == "no-cache"
    assert h["Expires"] == "0"
    assert h["Content-Length"] == "43"
    assert h["Server"] == "smtp-tracker"
    assert "Last-Modified" not in h and "ETag" not in h and "Set-Cookie" not in h


def test_gif_is_a_43_byte_transparent_1x1_gif89a() -> None:
    gif = TRANSPARENT_GIF
    assert len(gif) == 43
    assert gif[:6] == b"GIF89a"
    width, height, flags = struct.unpack("<HHB", gif[6:11])
    assert (width, height) == (1, 1)
    assert flags & 0x80  # global colour table present
    table_size = 3 * 2 ** ((flags & 0x07) + 1)
    pos = 13 + table_size
    assert gif[pos : pos + 3] == b"\x21\xf9\x04"  # graphic control extension
    assert gif[pos + 3] & 0x01  # transparent colour flag
    pos += 8
    assert gif[pos] == 0x2C  # image descriptor
    assert struct.unpack("<HHHH", gif[pos + 1 : pos + 9]) == (0, 0, 1, 1)
    assert gif[-1:] == b"\x3b"  # trailer


async def test_known_token_is_recorded_with_capped_user_agent(
    store: SqliteStore, start_pixel: StartPixel, client: aiohttp.ClientSession
) -> None:
    await store.record_message(make_record(1))
    server = await start_pixel(store=store)
    ua = "Mozilla/5.0 " + "x" * 1500
    async with client.get(f"{server.base_url}/o/{token(1)}.gif", headers={"User-Agent": ua}) as r:
        assert r.status == 200
        check_pixel_headers(r.headers)
        assert await r.read() == TRANSPARENT_GIF

    async def recorded() -> bool:
        found = await store.find_message(token(1))
        return found is not None and len(found.opens) == 1

    await wait_until(recorded, what="the open to be recorded")
    found = await store.find_message(token(1))
    assert found is not None
    [opened] = found.opens
    assert opened.user_agent == ua[:512]
    assert opened.ip == "127.0.0.0/24"  # the default ip_policy, truncate
    assert server.app[WRITER_KEY].recorded == 1


async def test_unknown_and_malformed_tokens_get_the_gif_and_record_nothing(
    store: SqliteStore, start_pixel: StartPixel, client: aiohttp.ClientSession
) -> None:
    await store.record_message(make_record(1))
    server = await start_pixel(store=store)
    paths = [f"/o/{token(2)}.gif", "/o/x.gif", "/o/%2e%2e.gif", f"/o/{token(1)}A.gif"]
    for path in paths:
        async with client.get(server.base_url + path) as r:
            assert r.status == 200, path
            check_pixel_headers(r.headers)
            assert await r.read() == TRANSPARENT_GIF
    writer = server.app[WRITER_KEY]
    await wait_until(lambda: writer.pending == 0 and writer.unknown == 1, what="the writer")
    assert writer.offered == 1  # only the well-formed token reached the writer
    assert writer.recorded == 0
    assert [len(m.opens) for m in await store.list_messages()] == [0]


async def test_head_has_the_headers_and_no_body_and_records_nothing(
    store: SqliteStore,
    start_pixel: StartPixel,
    client: aiohttp.ClientSession,
    client_ssl_context: ssl.SSLContext,
) -> None:
    await store.record_message(make_record(1))
    server = await start_pixel(store=store)
    async with client.head(f"{server.base_url}/o/{token(1)}.gif") as r:
        assert r.status == 200
        check_pixel_headers(r.headers)
        assert await r.read() == b""
    request = get(f"/o/{token(1)}.gif").replace(b"GET ", b"HEAD ", 1)
    status, headers, body = await raw_request(server.port, request, ssl_context=client_ssl_context)
    assert (status, headers["content-length"], body) == (200, "43", b"")
    assert server.app[WRITER_KEY].offered == 0


async def test_healthz(
    store: SqliteStore, start_pixel: StartPixel, client: aiohttp.ClientSession
) -> None:
    server = await start_pixel(store=store)
    async with client.get(f"{server.base_url}/healthz") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        assert await r.text() == "ok"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/o/",
        "/o",
        "/o/../x",
        "/o/%2e%2e/x",
        "/o/%2e%2e/%2e%2e/etc/passwd",
        "/o/..%2f..%2fetc%2fpasswd",
        "/o/a/b.gif",
        "/o/.gif",
        f"/o/{token(1)}.GIF",
        f"/o/{token(1)}.gif/",
        f"/o/{token(1)}.png",
        "//o/x.gif",
        "/healthz/",
        "/static/",
        "/index.html",
        "/.git/config",
    ],
)
async def test_everything_else_is_404(
    store: SqliteStore, start_pixel: StartPixel, client_ssl_context: ssl.SSLContext, path: str
) -> None:
    server = await start_pixel(store=store)
    status, headers, _ = await raw_request(server.port, get(path), ssl_context=client_ssl_context)
    assert status == 404, path
    assert "location" not in headers
    assert headers["server"] == "smtp-tracker"
    assert server.app[WRITER_KEY].offered == 0


async def test_other_methods_on_the_pixel_are_refused(
    store: SqliteStore, start_pixel: StartPixel, client: aiohttp.ClientSession
) -> None:
    server = await start_pixel(store=store)
    async with client.post(f"{server.base_url}/o/{token(1)}.gif", data=b"x") as r:
        assert r.status == 405
    assert server.app[WRITER_KEY].offered == 0


async def test_oversized_request_line_and_headers_are_refused(
    store: SqliteStore, start_pixel: StartPixel, client_ssl_context: ssl.SSLContext
) -> None:
    server = await start_pixel(store=store)
    long_path = "/o/" + "a" * 9000 + ".gif"
    status, _, _ = await raw_request(server.port, get(long_path), ssl_context=client_ssl_context)
    assert status in (400, 414)
    big_header = "X-Junk: " + "b" * 9000
    status, _, _ = await raw_request(
        server.port, get("/healthz", big_header), ssl_context=client_ssl_context
    )
    assert status in (400, 431)


async def fetch_as(
    client: aiohttp.ClientSession, server: PixelServer, i: int, forwarded_for: str
) -> None:
    url = f"{server.base_url}/o/{token(i)}.gif"
    async with client.get(url, headers={"X-Forwarded-For": forwarded_for}) as r:
        assert r.status == 200
        await r.read()


async def opens_ips(store: SqliteStore, i: int, n: int) -> list[str | None]:
    async def done() -> bool:
        found = await store.find_message(token(i))
        return found is not None and len(found.opens) == n

    await wait_until(done, what=f"{n} opens")
    found = await store.find_message(token(i))
    assert found is not None
    return [o.ip for o in found.opens]


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    start_pixel: StartPixel, client: aiohttp.ClientSession, store: SqliteStore
) -> None:
    await store.record_message(make_record(1))
    server = await start_pixel(store=store, trusted_proxies=[ipaddress.ip_network("10.0.0.0/8")])
    await fetch_as(client, server, 1, "203.0.113.9")
    assert await opens_ips(store, 1, 1) == ["127.0.0.0/24"]


async def test_forwarded_for_from_a_trusted_proxy_is_used(
    start_pixel: StartPixel, client: aiohttp.ClientSession, store: SqliteStore
) -> None:
    await store.record_message(make_record(1))
    server = await start_pixel(
        store=store,
        trusted_proxies=[
            ipaddress.ip_network("127.0.0.0/8"),
            ipaddress.ip_network("10.0.0.0/8"),
        ],
    )
    # forged left-most entry, then the real client, then a trusted inner proxy
    await fetch_as(client, server, 1, "198.51.100.1, 203.0.113.9, 10.1.2.3")
    assert await opens_ips(store, 1, 1) == ["203.0.113.0/24"]


class GatedStore(OpensOnlyStore):
    """A store whose record_opens waits on :attr:`gate`; counts what it was given."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.received = 0

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        self.entered.set()
        await self.gate.wait()
        self.received += len(hits)
        return len(hits)


async def test_full_queue_drops_and_counts_but_still_serves(
    start_pixel: StartPixel, client: aiohttp.ClientSession
) -> None:
    gated = GatedStore()
    server = await start_pixel(store=gated, queue_size=2, batch_max=1)
    writer = server.app[WRITER_KEY]
    url = f"{server.base_url}/o/{token(1)}.gif"

    async def fetch() -> int:
        async with asyncio.timeout(10), client.get(url) as r:
            assert await r.read() == TRANSPARENT_GIF
            return r.status

    assert await fetch() == 200
    await asyncio.wait_for(gated.entered.wait(), 10)  # the writer is stuck on hit 1
    statuses = await asyncio.gather(*(fetch() for _ in range(20)))
    assert statuses == [200] * 20
    assert (writer.offered, writer.dropped, writer.pending) == (21, 18, 2)
    gated.gate.set()
    await wait_until(lambda: writer.recorded == 3, what="the queued opens")
    assert gated.received == 3


async def test_a_request_that_never_finishes_its_headers_is_cut_off(
    store: SqliteStore, start_pixel: StartPixel, client_ssl_context: ssl.SSLContext
) -> None:
    server = await start_pixel(store=store, keepalive_timeout_s=0.5)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=client_ssl_context, server_hostname="localhost"
    )
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without a response
        assert loop.time() - started < 5
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
