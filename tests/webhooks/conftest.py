"""A real webhook receiver (aiohttp over HTTPS with the session's trustme certificate),
and smtp-tracker started in the test's loop with webhooks pointed at it.

The receiver's behaviour is scripted per test (:attr:`Receiver.mode`): ``ok``
(204), ``500``, ``410``, ``hang`` (no answer until the mode changes), or
down (:meth:`Receiver.down`: nothing listens, connections are refused).

``store_keys`` runs a test on both backends: the store (and its outbox) in
SQLite in the data directory, or in a fresh database of the session's private
PostgreSQL cluster (:mod:`tests.support.postgres`; skipped with the reason
when PostgreSQL is not installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from smtp_tracker.app import Application
from smtp_tracker.store import SqliteDatabase
from smtp_tracker.webhooks import outbox
from smtp_tracker.webhooks.signing import write_secret
from tests.support.postgres import pg_cluster, pg_dsn
from tests.support.relay import RelayFactory, relay_factory, tracking_over_tls

__all__ = ["pg_cluster", "pg_dsn", "relay_factory"]

PIXEL = re.compile(rb"https://localhost:\d+/o/[A-Za-z0-9_-]{23}\.gif")

HTML_MESSAGE = (
    "From: News <news@example.org>\r\n"
    "To: bob@example.net\r\n"
    "Subject: news {n}\r\n"
    "Message-ID: <news-{n}@example.org>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "\r\n"
    '<html><body><p>News {n}: <a href="https://shop.example.com/sale">sale</a></p>'
    "</body></html>\r\n"
)

#: A User-Agent the classifier counts (Gmail's image proxy): ``counted`` opens.
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)


@dataclass(frozen=True)
class Delivery:
    """One POST the receiver got: its path, headers and body."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document


class Receiver:
    """The receiving end of the webhooks; every POST is kept, whatever the answer."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl = ssl_context
        self.mode = "ok"
        #: with N > 0, every Nth attempt is answered 500 whatever the mode
        self.fail_every = 0
        self.attempts = 0
        self.deliveries: list[Delivery] = []  # answered 2xx
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self._changed.set()
        self._changed = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.attempts += 1
        body = await request.read()
        while self.mode == "hang":
            await self._changed.wait()
        if self.mode == "500" or (self.fail_every and self.attempts % self.fail_every == 0):
            return web.Response(status=500)
        if self.mode == "410":
            return web.Response(status=410)
        self.deliveries.append(Delivery(request.path, dict(request.headers), body))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await self.up()

    async def up(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(
            self._runner, "127.0.0.1", self.port, ssl_context=self._ssl, reuse_address=True
        )
        await self._site.start()
        server = self._site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        """Nothing listens on the port: connections are refused."""
        assert self._site is not None
        await self._site.stop()
        self._site = None

    async def close(self) -> None:
        self.set_mode("ok")
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str = "hook") -> str:
        return f"https://localhost:{self.port}/{path}"

    def events(self, path: str = "/hook") -> list[dict[str, Any]]:
        """The events delivered to *path*, first delivery of each id, in arrival order."""
        seen: dict[str, dict[str, Any]] = {}
        for delivery in self.deliveries:
            if delivery.path == path:
                seen.setdefault(delivery.event["id"], delivery.event)
        return list(seen.values())


@pytest.fixture
async def receiver(server_ssl_context: ssl.SSLContext) -> AsyncIterator[Receiver]:
    served = Receiver(server_ssl_context)
    await served.start()
    yield served
    await served.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_keys(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The keys putting the store, and its outbox, on the test's backend: none (SQLite
    in ``data_dir``) or ``store`` (a fresh PostgreSQL database)."""
    if request.param == "sqlite":
        return {}
    return {"store": request.getfixturevalue("pg_dsn")}


@contextlib.contextmanager
def outbox_connection(store_keys: dict[str, Any], data_dir: Path) -> Iterator[outbox.Conn]:
    """A connection to the outbox of *store_keys* (the store made if missing), closed after."""
    if "store" in store_keys:
        conn = outbox.connect_postgresql(store_keys["store"])
        try:
            yield conn
        finally:
            conn.raw.close()
        return
    SqliteDatabase.open(data_dir).close()
    sqlite_conn: sqlite3.Connection = outbox.connect(data_dir)
    try:
        yield sqlite_conn
    finally:
        sqlite_conn.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.secret"
    write_secret(path)
    return path


def verifier(secret_file: Path) -> Webhook:
    """The ``standardwebhooks`` library's verifier for the secret in *secret_file*."""
    return Webhook(secret_file.read_text().strip())


def hook(receiver: Receiver, secret_file: Path, ca_pem_path: Path, **table: Any) -> dict[str, Any]:
    """A ``[[webhooks]]`` table for *receiver*."""
    path = table.pop("path", "hook")
    return {
        "url": receiver.url(path),
        "secret_file": str(secret_file),
        "ca_file": str(ca_pem_path),
        **table,
    }


#: Small backoff and timeouts: failures are retried within a fraction of a second.
FAST = {
    "webhook_backoff_base_s": 0.05,
    "webhook_backoff_max_s": 0.4,
    "webhook_timeout_s": 1.0,
}


Tracked = Callable[..., Awaitable[Application]]


@pytest.fixture
def tracked_relay(relay_factory: RelayFactory, cert_pem_path: Path, key_pem_path: Path) -> Tracked:
    """``await tracked_relay(webhooks=[...], **keys)``: tracking, pixel, fast retries."""

    async def make(**overrides: Any) -> Application:
        values = {
            **tracking_over_tls(cert_pem_path, key_pem_path),
            "max_events_per_token_per_min": 0,
            "max_events_per_token_client_per_min": 0,
            **FAST,
            **overrides,
        }
        return await relay_factory(**values)

    return make


async def send(app: Application, count: int, *, start: int = 0, sessions: int = 4) -> None:
    """Relay *count* HTML messages over *sessions* connections."""
    host, port = app.smtp_address
    numbers = list(range(start, start + count))

    async def session(part: list[int]) -> None:
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as smtp:
            for n in part:
                await smtp.sendmail(
                    "news@example.org", ["bob@example.net"], HTML_MESSAGE.format(n=n).encode()
                )

    await asyncio.gather(
        *(session(numbers[i::sessions]) for i in range(sessions) if numbers[i::sessions])
    )


def pixels(upstream: Any) -> list[str]:
    """The pixel URL of each message the upstream received, in order."""
    urls = []
    for transaction in upstream.transactions:
        found = PIXEL.search(transaction.data)
        assert found is not None, transaction.data[:500]
        urls.append(found.group().decode())
    return urls


async def fetch(
    urls: list[str], ca: ssl.SSLContext, *, user_agent: str | None = None, status: int = 200
) -> None:
    """GET each URL (a pixel; a click with *status* 302), at most 20 at once."""
    headers = {"User-Agent": user_agent} if user_agent else {}
    gate = asyncio.Semaphore(20)
    async with aiohttp.ClientSession(headers=headers, skip_auto_headers=["User-Agent"]) as client:

        async def one(url: str) -> None:
            async with gate, client.get(url, ssl=ca, allow_redirects=False) as response:
                assert response.status == status, url

        await asyncio.gather(*(one(url) for url in urls))
