"""The reports listener against hostile and careless clients, over raw TLS sockets.

Issue 12, items 4, 5 and 11 (the HTTP part): bytes that are not UTF-8 in
``Authorization`` or in a cookie get 401/303/403/400 (never a 500, never a
traceback); a request whose headers or body trickle in is cut off after the
listener's timeouts; one connection over the cap gets 503; a client that goes
away mid-request is one debug line; HTTP/0.9 gets 400 before authentication.

The timeouts here are small (0.5 s) and every wait is on a condition (the
server closed the connection) with a generous bound: nothing depends on how
fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from smtp_tracker.store import SqliteStore
from smtp_tracker.web.reports.app import MIDDLEWARE_ORDER
from smtp_tracker.web.reports.auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE
from smtp_tracker.web.site import CONNECTIONS_KEY

from .dashboard_support import (
    API_TOKEN,
    PASSWORD,
    USER,
    ReportsServer,
    browser,
    form_token,
    login,
    reports,
    runners,
    start_reports,
    store,
)
from .web_helpers import wait_until

__all__ = ["browser", "reports", "runners", "store"]  # fixtures

#: A generous bound on waiting for the server to act; never reached when it works.
PATIENCE_S = 20.0
#: The small timeouts the listener is started with here.
TIMEOUT_S = 0.5
BAD_BYTES = b"\xff\xfe\xc3("  # not UTF-8


@pytest.fixture
def quiet_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record of the test: none at warning level or above, no traceback."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    for record in caplog.records:
        text = record.getMessage()
        assert record.levelno < logging.WARNING, f"{record.name}: {text}"
        assert record.exc_info is None, f"{record.name} logged a traceback: {text}"


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


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded by PATIENCE_S)."""
    received = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        async with asyncio.timeout(PATIENCE_S):
            while chunk := await reader.read(65536):
                received += chunk
    return received


async def exchange(port: int, request: bytes, context: ssl.SSLContext) -> bytes:
    reader, writer = await open_tls(port, context)
    try:
        writer.write(request)
        await writer.drain()
        return await read_to_close(reader)
    finally:
        await close(writer)


def status_of(response: bytes) -> int:
    assert response, "no response"
    return int(response.split(b" ", 2)[1])


def request(method: str, path: str, *headers: bytes, body: bytes = b"") -> bytes:
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: localhost", *headers]
    if body:
        head.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join([*head, b"Connection: close", b"", b""]) + body


# -- one factory, one order -------------------------------------------------------------


async def test_the_tests_and_serve_build_the_same_app_with_the_same_middleware_order(
    reports: ReportsServer,
) -> None:
    names = tuple(getattr(m, "__name__", "") for m in reports.app.middlewares)
    assert names == MIDDLEWARE_ORDER


async def test_serve_builds_the_reports_app_with_the_factory(
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serve`` (the composition root) uses :func:`build_reports_app`, so its middlewares
    are in the order asserted above; and behaves so: HTTP/0.9 gets 400, not 401."""
    from smtp_tracker import app as composition
    from smtp_tracker.config import build_config

    built: list[web.Application] = []
    factory = composition.build_reports_app

    def spy(**kwargs: Any) -> web.Application:
        built.append(factory(**kwargs))
        return built[-1]

    monkeypatch.setattr(composition, "build_reports_app", spy)
    config = build_config(
        {
            "data_dir": str(tmp_path / "data"),
            "hostname": "localhost",
            "tracking": False,
            "pixel": False,
            "reports": True,
            "reports_listen": "127.0.0.1:0",
            "tls_cert": str(cert_pem_path),
            "tls_key": str(key_pem_path),
        },
        {},
        environ={},
    )
    application = composition.Application(config, smtp=False)
    await application.start()
    try:
        assert len(built) == 1
        names = tuple(getattr(m, "__name__", "") for m in built[0].middlewares)
        assert names == MIDDLEWARE_ORDER
        port = application.reports_port
        assert port is not None
        response = await exchange(port, b"GET /api/stats\r\n\r\n", client_ssl_context)
        assert status_of(response) == 400
    finally:
        await application.stop(grace_s=0)


# -- item 4: bytes that are not UTF-8 in credentials ------------------------------------


def login_form_request(csrf_cookie: bytes, csrf_field: bytes = b"x" * 43) -> bytes:
    body = b"csrf_token=" + csrf_field + b"&next=%2F&username=alice&password=secret"
    return request(
        "POST",
        "/login",
        b"Content-Type: application/x-www-form-urlencoded",
        b"Cookie: " + LOGIN_CSRF_COOKIE.encode() + b"=" + csrf_cookie,
        body=body,
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (request("GET", "/api/stats", b"Authorization: Bearer " + BAD_BYTES), 401),
        (request("GET", "/api/stats", b"Authorization: " + BAD_BYTES + b" x"), 401),
        (request("GET", "/api/stats", b"Authorization: Bearer x" + BAD_BYTES * 20), 401),
        (request("GET", "/login", b"Cookie: " + SESSION_COOKIE.encode() + b"=" + BAD_BYTES), 200),
        (request("GET", "/", b"Cookie: " + SESSION_COOKIE.encode() + b"=" + BAD_BYTES), 303),
        (
            request("GET", "/api/stats", b"Cookie: " + SESSION_COOKIE.encode() + b"=" + BAD_BYTES),
            401,
        ),
        (
            request("GET", "/login", b"Cookie: " + LOGIN_CSRF_COOKIE.encode() + b"=" + BAD_BYTES),
            200,
        ),
        (login_form_request(BAD_BYTES), 403),
        (login_form_request(BAD_BYTES, csrf_field=b"%ff%fe"), 403),
        (
            request(
                "POST",
                "/logout",
                b"Cookie: " + SESSION_COOKIE.encode() + b"=" + BAD_BYTES,
                b"Content-Type: application/x-www-form-urlencoded",
                body=b"csrf_token=" + BAD_BYTES,
            ),
            303,
        ),
    ],
    ids=[
        "bearer-token",
        "scheme",
        "long-token",
        "session-on-login",
        "session-on-page",
        "session-on-api",
        "login-cookie-on-login-page",
        "login-cookie-on-post",
        "login-cookie-and-encoded-field",
        "session-on-logout",
    ],
)
async def test_credentials_that_are_not_utf_8_are_refused_without_a_traceback(
    raw: bytes,
    expected: int,
    reports: ReportsServer,
    client_ssl_context: ssl.SSLContext,
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    response = await exchange(reports.port, raw, client_ssl_context)
    assert status_of(response) == expected, response[:300]


async def test_a_login_form_that_is_not_utf_8_is_400(
    reports: ReportsServer,
    browser: aiohttp.ClientSession,
    client_ssl_context: ssl.SSLContext,
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    async with browser.get(reports.base_url + "/login") as response:
        token = form_token(await response.text())
    cookie = LOGIN_CSRF_COOKIE.encode() + b"=" + token.encode()
    for body, content_type in [
        (b"csrf_token=" + token.encode() + b"&username=" + BAD_BYTES, b""),
        (b"csrf_token=" + token.encode(), b"; charset=no-such-charset"),
    ]:
        raw = request(
            "POST",
            "/login",
            b"Content-Type: application/x-www-form-urlencoded" + content_type,
            b"Cookie: " + cookie,
            body=body,
        )
        response = await exchange(reports.port, raw, client_ssl_context)
        assert status_of(response) == 400, response[:300]
    assert any("cannot be decoded" in r.getMessage() for r in quiet_logs.records)


async def test_a_wrong_bearer_token_is_logged_at_debug_level(
    reports: ReportsServer,
    client_ssl_context: ssl.SSLContext,
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    raw = request("GET", "/api/stats", b"Authorization: Bearer " + BAD_BYTES)
    assert status_of(await exchange(reports.port, raw, client_ssl_context)) == 401
    debug = [r for r in quiet_logs.records if "wrong bearer token" in r.getMessage()]
    assert [r.levelno for r in debug] == [logging.DEBUG]
    # and the right token still works
    raw = request("GET", "/api/stats", f"Authorization: Bearer {API_TOKEN}".encode())
    assert status_of(await exchange(reports.port, raw, client_ssl_context)) == 200


# -- item 11: HTTP/0.9 before authentication ----------------------------------------------


@pytest.mark.parametrize("path", ["/", "/api/stats", "/login", "/messages", "/static/style.css"])
async def test_http_0_9_is_refused_before_authentication(
    path: str,
    reports: ReportsServer,
    client_ssl_context: ssl.SSLContext,
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    response = await exchange(reports.port, f"GET {path}\r\n\r\n".encode(), client_ssl_context)
    head, _, body = response.partition(b"\r\n\r\n")
    assert status_of(response) == 400, response[:300]
    assert body == b"400: Bad Request"
    assert b"location" not in head.lower() and b"www-authenticate" not in head.lower()


# -- item 5: time limits, a connection cap, clients that go away ---------------------------


@pytest.fixture
async def limited(
    store: SqliteStore,
    tmp_path: Path,
    server_ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
) -> ReportsServer:
    """The reports listener with 0.5 s header and body timeouts, at most 3 connections."""
    return await start_reports(
        store,
        tmp_path / "users.json",
        server_ssl_context,
        runners,
        header_timeout_s=TIMEOUT_S,
        body_timeout_s=TIMEOUT_S,
        max_connections=3,
    )


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send *data* one byte at a time, a tenth of a second apart, until the peer closes."""
    with contextlib.suppress(ConnectionError, ssl.SSLError, RuntimeError):
        for byte in data:
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
            await writer.drain()


async def test_a_login_body_that_trickles_in_gets_408_and_is_closed(
    limited: ReportsServer,
    client_ssl_context: ssl.SSLContext,
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    reader, writer = await open_tls(limited.port, client_ssl_context)
    body = b"csrf_token=" + b"x" * 400  # 40 s at one byte per 0.1 s
    sending = asyncio.create_task(trickle(writer, body))
    try:
        writer.write(
            b"POST /login HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        response = await read_to_close(reader)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        await close(writer)
    assert status_of(response) == 408, response[:300]
    assert response.endswith(b"408: Request Timeout")
    assert not sending.done() or sending.cancelled()  # cut off, not finished sending


async def test_headers_that_trickle_in_are_cut_off(
    limited: ReportsServer,
    client_ssl_context: ssl.SSLContext,
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    reader, writer = await open_tls(limited.port, client_ssl_context)
    sending = asyncio.create_task(
        trickle(writer, b"GET /login HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"s" * 400)
    )
    try:
        response = await read_to_close(reader)
        assert not sending.done()  # closed by the server while the client still sent
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        await close(writer)
    assert response == b""  # never a complete request: nothing to answer


async def test_one_connection_over_the_cap_gets_503_and_others_are_served_after(
    limited: ReportsServer,
    client_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cap = limited.app[CONNECTIONS_KEY]
    held = [await open_tls(limited.port, client_ssl_context) for _ in range(3)]
    try:
        await wait_until(lambda: cap.active == 3, timeout_s=PATIENCE_S, what="3 connections")
        response = await exchange(limited.port, request("GET", "/login"), client_ssl_context)
        assert status_of(response) == 503, response[:300]
        assert b"\r\nRetry-After: 1\r\n" in response
        assert cap.refused == 1
        assert [r.levelname for r in caplog.records if "refusing HTTP" in r.getMessage()] == [
            "WARNING"
        ]
    finally:
        for _, writer in held:
            await close(writer)
    await wait_until(lambda: cap.active == 0, timeout_s=PATIENCE_S, what="the connections closed")
    response = await exchange(limited.port, request("GET", "/login"), client_ssl_context)
    assert status_of(response) == 200


async def test_held_connections_are_closed_by_the_header_timeout(
    limited: ReportsServer,
    client_ssl_context: ssl.SSLContext,
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    """A hundred clients that connect and say nothing do not keep the listener full."""
    cap = limited.app[CONNECTIONS_KEY]
    held = [await open_tls(limited.port, client_ssl_context) for _ in range(3)]
    try:
        for reader, _ in held:
            assert await read_to_close(reader) == b""  # closed by the server
        await wait_until(lambda: cap.active == 0, timeout_s=PATIENCE_S, what="all closed")
    finally:
        for _, writer in held:
            await close(writer)
    response = await exchange(limited.port, request("GET", "/login"), client_ssl_context)
    assert status_of(response) == 200


async def test_a_client_that_goes_away_mid_body_is_one_debug_line(
    reports: ReportsServer,
    client_ssl_context: ssl.SSLContext,
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    cap = reports.app[CONNECTIONS_KEY]
    _, writer = await open_tls(reports.port, client_ssl_context)
    writer.write(
        b"POST /login HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 100\r\n\r\ncsrf_token="
    )
    await writer.drain()
    await wait_until(lambda: cap.active == 1, timeout_s=PATIENCE_S, what="the connection")
    writer.transport.abort()  # gone, without a TLS goodbye
    await wait_until(
        lambda: any("closed the connection" in r.getMessage() for r in quiet_logs.records),
        timeout_s=PATIENCE_S,
        what="the server to notice",
    )
    await wait_until(lambda: cap.active == 0, timeout_s=PATIENCE_S, what="the place given back")


async def test_a_body_over_the_size_cap_is_413(
    store: SqliteStore,
    tmp_path: Path,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
    quiet_logs: pytest.LogCaptureFixture,
) -> None:
    server = await start_reports(
        store, tmp_path / "users.json", server_ssl_context, runners, client_max_bytes=1000
    )
    body = b"csrf_token=" + b"x" * 2000
    raw = request("POST", "/login", b"Content-Type: application/x-www-form-urlencoded", body=body)
    assert status_of(await exchange(server.port, raw, client_ssl_context)) == 413


async def test_a_normal_login_still_works_with_the_limits(
    limited: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    assert (await login(browser, limited)).status == 303


async def test_a_multipart_login_form_is_read_within_the_deadline(
    limited: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    """The body deadline leaves the body to the handler: a multipart form still logs in."""
    async with browser.get(limited.base_url + "/login") as response:
        token = form_token(await response.text())
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in {"csrf_token": token, "next": "/", "username": USER}.items():
        form.add_field(name, value)
    form.add_field("password", PASSWORD)
    async with browser.post(
        limited.base_url + "/login", data=form(), allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/"
