"""Fixtures for the pixel endpoint tests: servers and clients.

The certificates are the session's (``tests/conftest.py``: one trustme CA for
the whole run, so session-scoped fixtures built on it agree in every folder).
Chain: ``server_ssl_context`` / ``client_ssl_context`` ->
``start_pixel`` (a factory starting the pixel app on 127.0.0.1 port 0 over
HTTPS) -> ``client`` (an aiohttp session trusting the CA).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from smtp_tracker.store import SqliteStore
from smtp_tracker.store.base import Store
from smtp_tracker.web import make_pixel_app, start_site

from .web_helpers import PixelServer, StartPixel


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with await SqliteStore.open(tmp_path / "data") as opened:
        yield opened


@pytest.fixture
async def start_pixel(
    server_ssl_context: ssl.SSLContext,
    store: SqliteStore,  # set up first so that it is closed after the servers stop
) -> AsyncIterator[StartPixel]:
    """``await start_pixel(store=..., **make_pixel_app_options)``; stopped after the test."""
    runners: list[web.AppRunner] = []

    async def start(*, store: Store, **options: Any) -> PixelServer:
        app = make_pixel_app(store=store, **options)
        runner, port = await start_site(
            app, host="127.0.0.1", port=0, ssl_context=server_ssl_context
        )
        runners.append(runner)
        return PixelServer(app=app, runner=runner, port=port)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def client(client_ssl_context: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=client_ssl_context, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session
