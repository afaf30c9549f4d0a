"""Hostile input on the pixel endpoint, over real HTTPS: junk requests, slow clients, non-tokens.

Every malformed request gets a short fixed answer (never the request echoed
back, never aiohttp's version, never a Location), is logged at most as one
debug line without the client's address, records nothing, and the server goes
on serving everyone else.  Anything in the place of a token gets the very same
200 GIF as a known token, and the store does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from smtp_tracker.store import SqliteStore
from smtp_tracker.web import TRANSPARENT_GIF, WRITER_KEY, make_pixel_app, start_site
from smtp_tracker.web.site import LINGER_S

from .web_helpers import PixelServer, StartPixel, make_record, token, wait_until

#: Put into junk requests: it must never come back in a response.
MARKER = "ECHO-MARKER-7f3a"
BAD_REQUEST = b"400: Bad Request"


async def open_tls(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def exchange(port: int, request: bytes, context: ssl.SSLContext) -> bytes:
    """Send *request* verbatim on a new TLS connection; everything read until the server closes."""
    reader, writer = await open_tls(port, context)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        await close(writer)


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def healthy(server: PixelServer, client: aiohttp.ClientSession) -> bool:
    async with asyncio.timeout(5), client.get(f"{server.base_url}/healthz") as r:
        return r.status == 200 and await r.text() == "ok"


def request(
    target: str | bytes, *headers: str | bytes, method: str = "GET", version: str = " HTTP/1.1"
) -> bytes:
    """A raw request that asks the server to close the connection after its response."""

    def raw(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode("latin-1")

    request_line = raw(method) + b" " + raw(target) + raw(version)
    lines = [request_line, b"Host: localhost", *map(raw, headers)]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


# (request, status, body): what a malformed or odd request gets
JUNK = {
    "dot-dot": (request("/../"), 404, b"404: Not Found"),
    "dot-dot-encoded": (request("/o/%2e%2e/%2e%2e/etc/passwd"), 404, b"404: Not Found"),
    "raw-nul": (request(b"/o/\x00.gif"), 400, BAD_REQUEST),
    "encoded-nul": (request("/o/%00.gif"), 200, TRANSPARENT_GIF),
    "path-10-KB": (request("/o/" + "a" * 10240 + ".gif"), 400, BAD_REQUEST),
    "raw-non-utf-8": (request(b"/o/\xff\xfe\xc3" + MARKER.encode() + b".gif"), 400, BAD_REQUEST),
    "encoded-non-utf-8": (request("/o/%ff%fe.gif"), 200, TRANSPARENT_GIF),
    "absolute-form": (request("https://localhost/healthz"), 200, b"ok"),
    "absolute-form-other-host": (request("http://evil.example/o/x.gif"), 200, TRANSPARENT_GIF),
    "options-asterisk": (request("*", method="OPTIONS"), 404, b"404: Not Found"),
    "connect": (request("evil.example:443", method="CONNECT"), 404, b"404: Not Found"),
    "trace": (
        request("/o/x.gif", f"X-Echo: {MARKER}", method="TRACE"),
        405,
        b"405: Method Not Allowed",
    ),
    "header-line-9000-bytes": (request("/healthz", "X-Junk: " + "b" * 9000), 400, BAD_REQUEST),
    "100-header-fields": (
        request("/healthz", *(f"X-{i}: {MARKER}" for i in range(100))),
        400,
        BAD_REQUEST,
    ),
    "header-name-with-space": (request("/healthz", f"X Bad: {MARKER}"), 400, BAD_REQUEST),
    "http-0.9": (b"GET /healthz\r\n\r\n", 400, BAD_REQUEST),
    "http-0.9-pixel": (f"GET /o/{token(1)}.gif\r\n\r\n".encode(), 400, BAD_REQUEST),
    "http-9.9": (request("/healthz", version=" HTTP/9.9"), 400, BAD_REQUEST),
    # aiohttp's own answer quoted the header back, and was a 500 for bytes not UTF-8
    "unknown-expect": (
        request("/healthz", f"Expect: {MARKER}"),
        417,
        b"417: Expectation Failed",
    ),
    "non-utf-8-expect": (request("/healthz", b"Expect: \x80"), 417, b"417: Expectation Failed"),
    "non-utf-8-expect-on-a-pixel": (
        request(f"/o/{token(1)}.gif", b"Expect: \xff" + MARKER.encode()),
        417,
        b"417: Expectation Failed",
    ),
    "garbage-line": (f"HELLO {MARKER}\r\n\r\n".encode(), 400, BAD_REQUEST),
    "tls-inside-tls": (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
        400,
        BAD_REQUEST,
    ),
    "negative-content-length": (request("/healthz", "Content-Length: -1"), 400, BAD_REQUEST),
    "two-content-lengths": (
        request("/healthz", "Content-Length: 1", "Content-Length: 2"),
        400,
        BAD_REQUEST,
    ),
    "content-length-and-chunked": (
        request("/healthz", "Transfer-Encoding: chunked", "Content-Length: 5"),
        400,
        BAD_REQUEST,
    ),
}


@pytest.fixture
def quiet_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record of the test; checked afterwards for noise and addresses."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    for record in caplog.records:
        text = record.getMessage()
        assert record.levelno < logging.WARNING, f"{record.name}: {text}"
        assert record.exc_info is None, f"{record.name} logged a traceback: {text}"
        assert "127.0.0.1" not in text and MARKER not in text, text


@pytest.mark.parametrize("name", list(JUNK))
async def test_junk_requests_get_a_fixed_answer_and_record_nothing(
    name: str,
    store: SqliteStore,
    start_pixel: StartPixel,
    client: aiohttp.ClientSession,
    client_ssl_context: ssl.SSLContext,
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    raw, expected_status, expected_body = JUNK[name]
    await store.record_message(make_record(1))
    server = await start_pixel(store=store)
    response = await exchange(server.port, raw, client_ssl_context)
    status, headers, body = split(response)
    assert (status, body) == (expected_status, expected_body), response[:300]
    assert headers["server"] == "smtp-tracker"
    assert "location" not in headers
    assert b"aiohttp" not in response.lower() and MARKER.encode() not in response
    assert server.app[WRITER_KEY].offered == 0
    assert await healthy(server, client)


async def test_a_huge_content_length_on_get_is_answered_at_once_and_closed_soon(
    store: SqliteStore, start_pixel: StartPixel, client_ssl_context: ssl.SSLContext
) -> None:
    server = await start_pixel(store=store)
    reader, writer = await open_tls(server.port, client_ssl_context)
    try:
        writer.write(
            f"GET /o/{token(1)}.gif HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Length: 99999999999999\r\n\r\nsome body".encode()
        )
        await writer.drain()
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        answered = time.monotonic() - started
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert await asyncio.wait_for(reader.readexactly(43), 5) == TRANSPARENT_GIF
        # the body it announced is never read in full: the connection is closed
        assert await asyncio.wait_for(reader.read(), LINGER_S + 5) == b""
        closed = time.monotonic() - started
    finally:
        await close(writer)
    assert answered < 1.0
    assert closed < LINGER_S + 2.0


async def slowloris(port: int, context: ssl.SSLContext, *, first: bytes) -> tuple[bool, bytes]:
    """Send *first*, then a header one byte every 0.1 s (100 s in all).

    :returns: whether the client was still sending when the server closed the
        connection, and what the server sent.
    """
    reader, writer = await open_tls(port, context)
    try:
        writer.write(first + b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        await writer.drain()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError, ssl.SSLError, RuntimeError):
                for byte in b"X-Slow: " + b"s" * 1000:
                    await asyncio.sleep(0.1)
                    writer.write(bytes([byte]))
                    await writer.drain()

        trickling = asyncio.create_task(trickle())
        received = b""
        try:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                async with asyncio.timeout(60):  # generous: the server closes far sooner
                    while chunk := await reader.read(65536):
                        received += chunk
            still_sending = not trickling.done()
        finally:
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickling
        return still_sending, received
    finally:
        await close(writer)


@pytest.mark.parametrize("first", [b"", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"])
async def test_slowloris_is_cut_off_while_others_are_served(
    first: bytes,
    store: SqliteStore,
    start_pixel: StartPixel,
    client: aiohttp.ClientSession,
    client_ssl_context: ssl.SSLContext,
) -> None:
    server = await start_pixel(store=store, keepalive_timeout_s=0.5)
    slow = asyncio.create_task(slowloris(server.port, client_ssl_context, first=first))
    served = 0
    while not slow.done():
        assert await healthy(server, client)  # not held up by the slow client
        served += 1
        await asyncio.wait([slow], timeout=0.05)
    still_sending, received = await slow
    assert served >= 1
    assert still_sending, "the server waited for the whole trickled header"
    # the complete first request was answered; the trickled one never was
    assert received.count(b"HTTP/1.1 200 OK") == (1 if first else 0)


async def test_a_silent_connection_is_closed_after_the_tls_handshake_timeout(
    store: SqliteStore, server_ssl_context: ssl.SSLContext
) -> None:
    """Closed by the 0.5 s handshake timeout, long before asyncio's 60 s default."""
    runner, port = await start_site(
        make_pixel_app(store=store),
        host="127.0.0.1",
        port=0,
        ssl_context=server_ssl_context,
        tls_handshake_timeout_s=0.5,
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # no ClientHello
        try:
            assert await asyncio.wait_for(reader.read(), 30) == b""
        finally:
            await close(writer)
    finally:
        await runner.cleanup()


def not_tokens() -> dict[str, str]:
    known = token(1)
    return {
        "unknown-well-formed": token(2),
        "known-case-flipped": known.swapcase(),
        "22-characters": known[:-1],
        "24-characters": known + "A",
        "one-character": "x",
        "200-characters": "A" * 200,
        "plus-and-tilde": "+" * 11 + "~" * 12,
        "padding": known[:-1] + "=",
        "percent-encoded-space": known[:11] + "%20" + known[12:],
        "dots": "." * 23,
        "non-ascii": "%C3%A9" * 23,
        "leading-dash": "-" + known[1:],
        "bad-last-character": known[:-1] + "B",
        "sql": "x'%20OR%20'1'='1",
    }


async def test_anything_in_place_of_a_token_gets_the_same_gif_and_changes_nothing(
    store: SqliteStore,
    start_pixel: StartPixel,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    await store.record_message(make_record(1))
    server = await start_pixel(store=store)
    writer = server.app[WRITER_KEY]

    async def fetch(path_token: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        url = f"{server.base_url}/o/{path_token}.gif"
        async with client.get(url, headers={"User-Agent": "probe"}) as r:
            headers = [(k.lower(), v) for k, v in r.raw_headers if k.lower() != b"date"]
            return r.status, headers, await r.read()

    def snapshot() -> list[str]:
        uri = (tmp_path / "data" / "tracker.sqlite3").as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as database:
            return list(database.iterdump())

    before = snapshot()
    responses = {name: await fetch(t) for name, t in not_tokens().items()}
    await wait_until(
        lambda: (
            writer.pending == 0
            and writer.offered == writer.recorded + writer.unknown + writer.dropped + writer.failed
        ),
        what="the writer to finish",
    )
    assert writer.recorded == 0
    assert snapshot() == before

    reference = await fetch(token(1))  # a known token: this one is recorded
    assert reference[0] == 200 and reference[2] == TRANSPARENT_GIF
    for name, response in responses.items():
        assert response == reference, name
    await wait_until(lambda: writer.recorded == 1, what="the known token's open")
    assert snapshot() != before
