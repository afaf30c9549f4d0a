"""start_site: port 0 read back, plain HTTP, address in use."""

from __future__ import annotations

import socket
import ssl

import aiohttp
import pytest

from smtp_tracker.errors import StartupError
from smtp_tracker.store import SqliteStore
from smtp_tracker.web import make_pixel_app, start_site


async def test_port_zero_is_read_back_and_served(
    store: SqliteStore, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    runner, port = await start_site(
        make_pixel_app(store=store), host="127.0.0.1", port=0, ssl_context=server_ssl_context
    )
    try:
        assert port > 0
        [(_, bound, *_)] = runner.addresses
        assert bound == port
        connector = aiohttp.TCPConnector(ssl=client_ssl_context)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"https://localhost:{port}/healthz") as r,
        ):
            assert await r.text() == "ok"
    finally:
        await runner.cleanup()


async def test_plain_http(store: SqliteStore) -> None:
    runner, port = await start_site(
        make_pixel_app(store=store), host="127.0.0.1", port=0, ssl_context=None
    )
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as r,
        ):
            assert r.status == 200
    finally:
        await runner.cleanup()


async def test_address_in_use_is_a_startup_error(store: SqliteStore) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"127.0.0.1:{port}"):
            await start_site(
                make_pixel_app(store=store), host="127.0.0.1", port=port, ssl_context=None
            )
