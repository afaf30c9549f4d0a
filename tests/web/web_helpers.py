"""Helpers for the pixel endpoint tests: tokens, records, raw requests, condition waits."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from smtp_tracker.store import MessageRecord

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@dataclass
class PixelServer:
    """A pixel app started by the ``start_pixel`` fixture on 127.0.0.1 over HTTPS."""

    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"


StartPixel = Callable[..., Awaitable[PixelServer]]


def token(i: int) -> str:
    """A well-formed, deterministic tracking id for test message *i*."""
    return base64.urlsafe_b64encode(i.to_bytes(17, "big")).rstrip(b"=").decode()


def make_record(i: int, **overrides: Any) -> MessageRecord:
    fields: dict[str, Any] = {
        "tracking_id": token(i),
        "queue_id": f"Q{i:06d}",
        "message_id": f"<m{i}@example.com>",
        "sender": "alice@example.com",
        "recipients": ["bob@example.net"],
        "size_bytes": 500,
        "received_at": T0,
        "relayed_at": T0,
        "upstream_reply": "250 2.0.0 Ok",
        "tracked": True,
    }
    fields.update(overrides)
    return MessageRecord(**fields)


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout_s: float = 10.0, what: str = ""
) -> None:
    """Poll *condition* until it holds; fail after *timeout_s* seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        await asyncio.sleep(0.01)


async def raw_request(
    port: int, request: bytes, *, ssl_context: ssl.SSLContext | None
) -> tuple[int, dict[str, str], bytes]:
    """Send *request* verbatim over one connection; the status, headers and body."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
    )
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def get(path: str, *extra: str) -> bytes:
    """A raw HTTP/1.1 GET request for *path* that closes the connection."""
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: close", *extra, "", ""]
    return "\r\n".join(lines).encode("latin-1")
