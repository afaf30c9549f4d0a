"""Running an aiohttp app on a TCP site beside other servers in the same loop.

Malformed requests (a bad request line, a header line over the limit, too
many header fields, a bad ``Content-Length``) are answered by aiohttp before
any app sees them.  Its stock answer echoes the offending request text back
and names the aiohttp version, and its log line carries a traceback and the
client's full address; :class:`_RequestHandler` answers with the status and
its reason phrase only, under our ``Server`` name, and logs one debug line
without the address or the request.

An ``Expect`` other than ``100-continue`` gets a fixed ``417`` (aiohttp's
quotes the header back).  Also refused with 400, before any middleware of the app (authentication
included): HTTP/0.9 requests (no version in the request line), which aiohttp
would otherwise serve.  A request body no handler read is drained for at most
:data:`LINGER_S` seconds after the response, then the connection is closed
(aiohttp's default is 10 s).

Limits every listener has (slowloris and connection floods):

* the headers of a request must arrive within the app's keep-alive timeout
  (:data:`HEADER_TIMEOUT_S` by default; aiohttp's keep-alive timer also runs
  while the first request's headers come in, and closes a connection whose
  request is incomplete when it fires);
* a request body the app reads must arrive within :data:`BODY_TIMEOUT_S`
  (:func:`body_deadline`, for apps that read bodies), else ``408`` and the
  connection is closed; its size is bounded by the app's ``client_max_size``
  (``413`` beyond);
* at most *max_connections* connections at once (:data:`MAX_CONNECTIONS` by
  default): one more gets ``503`` with ``Retry-After`` and is closed, counted
  and logged at most once per :data:`_REFUSED_LOG_INTERVAL_S` seconds;
* a client that goes away mid-request is one debug line, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware

from smtp_tracker.errors import StartupError

__all__ = [
    "BODY_TIMEOUT_S",
    "CONNECTIONS_KEY",
    "HEADER_TIMEOUT_S",
    "LINGER_S",
    "MAX_CONNECTIONS",
    "MAX_FIELD_BYTES",
    "MAX_HEADERS",
    "MAX_LINE_BYTES",
    "SERVER_HEADER",
    "TLS_HANDSHAKE_TIMEOUT_S",
    "ConnectionCap",
    "body_deadline",
    "handler_args",
    "start_site",
]

log = logging.getLogger(__name__)

#: The ``Server`` header on every response (instead of aiohttp's version string).
SERVER_HEADER: Final = "smtp-tracker"
#: Seconds a client has to complete the TLS handshake.
TLS_HANDSHAKE_TIMEOUT_S: Final = 10.0
#: Seconds an unread request body is drained after the response before closing.
LINGER_S: Final = 2.0
#: Seconds a connection has to send a request's headers, and may stay idle between
#: requests (the apps' default keep-alive timeout).
HEADER_TIMEOUT_S: Final = 15.0
#: Seconds a request body that the app reads has to arrive (:func:`body_deadline`).
BODY_TIMEOUT_S: Final = 15.0
#: Connections a listener serves at once unless its app says otherwise
#: (``app[CONNECTIONS_KEY]``); more are refused with 503.
MAX_CONNECTIONS: Final = 1024
#: Longest request line and header field, in bytes (aiohttp's parser refuses longer: 400).
MAX_LINE_BYTES: Final = 8190
MAX_FIELD_BYTES: Final = 8190
#: Most header fields in a request (more: 400).
MAX_HEADERS: Final = 64

_REFUSED_LOG_INTERVAL_S: Final = 10.0
_TOO_MANY_CONNECTIONS: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Server: " + SERVER_HEADER.encode() + b"\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 24\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"503: Service Unavailable"
)


def handler_args(keepalive_timeout_s: float) -> dict[str, Any]:
    """An app's ``handler_args``: the request line and header bounds, and the keep-alive."""
    return {
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_FIELD_BYTES,
        "max_headers": MAX_HEADERS,
        "keepalive_timeout": keepalive_timeout_s,
    }


def _bad_request() -> web.Response:
    return _status_response(HTTPStatus.BAD_REQUEST)


def _status_response(status: HTTPStatus) -> web.Response:
    """``STATUS: Phrase`` as text, under our ``Server`` name; the connection is closed after it."""
    response = web.Response(
        status=status, text=f"{status.value}: {status.phrase}", headers={hdrs.SERVER: SERVER_HEADER}
    )
    response.force_close()
    return response


@web.middleware
async def _http_1_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse HTTP/0.9 (RFC 9112 §2.3: a request line without a version)."""
    if request.version < (1, 0):
        return _bad_request()
    return await handler(request)


class _BodyTimeout(Exception):
    """Set on a request body that did not arrive in time (raised where the handler reads it)."""


def body_deadline(timeout_s: float = BODY_TIMEOUT_S) -> Middleware:
    """A middleware that gives a request's body *timeout_s* seconds to arrive.

    When the body is still incomplete that long after the handler started (a
    client that trickles it, one byte every few seconds), reading it fails in
    the handler, and the request gets ``408 Request Timeout`` (RFC 9110
    §15.5.9) and the connection is closed; it cannot hold a connection and a
    handler.  The body is not read here, so the handler reads it as it likes
    (``request.post()`` for a form, multipart included).  A body over the
    app's ``client_max_size`` gets ``413``.

    :param timeout_s: seconds from the start of handling (the end of the
        headers) to the end of the body.
    """

    @web.middleware
    async def read_body_in_time(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        payload = request.content

        def expire() -> None:
            if not payload.is_eof():
                payload.set_exception(_BodyTimeout())

        timer = asyncio.get_running_loop().call_later(timeout_s, expire)
        try:
            return await handler(request)
        except _BodyTimeout:
            log.debug("closed a request whose body took longer than %s s", timeout_s)
            return _status_response(HTTPStatus.REQUEST_TIMEOUT)
        finally:
            timer.cancel()

    return read_body_in_time


def _known_expectations_only(
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """*handler*, behind a fixed ``417`` for an ``Expect`` other than ``100-continue``.

    aiohttp's own answer (before any middleware) quotes the header back, and
    fails with a 500 when its bytes are not UTF-8.  RFC 9110 §10.1.1 allows the 417.
    """

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get(hdrs.EXPECT)
        if expect is not None and expect.lower() != "100-continue":
            log.debug("refused a request with an unknown expectation")
            return _status_response(HTTPStatus.EXPECTATION_FAILED)
        return await handler(request)

    return handle


class ConnectionCap:
    """How many connections a listener holds, and how many it refused.

    :param max_connections: connections served at once (>= 1).
    :raises ValueError: when *max_connections* < 1.
    """

    __slots__ = ("_last_logged", "active", "max_connections", "refused")

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        #: connections open now (after their TLS handshake).
        self.active = 0
        #: connections refused with 503 since the start.
        self.refused = 0
        self._last_logged = -_REFUSED_LOG_INTERVAL_S

    def __repr__(self) -> str:
        return (
            f"ConnectionCap(max_connections={self.max_connections}, active={self.active},"
            f" refused={self.refused})"
        )

    def take(self) -> bool:
        """Count one more connection; ``False`` (and counted as refused) when full."""
        if self.active >= self.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._last_logged >= _REFUSED_LOG_INTERVAL_S:
                self._last_logged = now
                log.warning(
                    "refusing HTTP connections: %d open, the most allowed (%d refused so far)",
                    self.active,
                    self.refused,
                )
            return False
        self.active += 1
        return True

    def give_back(self) -> None:
        """Count one connection fewer."""
        self.active -= 1


#: The listener's connection cap and counters (an app factory may set it; else
#: :func:`start_site` does).
CONNECTIONS_KEY: Final = web.AppKey("connections", ConnectionCap)


class _RequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with a fixed answer to malformed requests,
    quiet about clients that go away, and within the listener's connection cap."""

    __slots__ = ("_cap", "_counted")

    def __init__(self, manager: web.Server, *, cap: ConnectionCap, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._cap = cap
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Serve the connection, or answer 503 and close it when the listener is full."""
        if not self._cap.take():
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            self._manager = None  # never registered: connection_lost has nothing to do
            self.force_close()
            return
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Give the connection's place back, then let aiohttp clean up."""
        if self._counted:
            self._counted = False
            self._cap.give_back()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The response to a request that could not be parsed or handled.

        :param status: 400 for a request the parser refused, 500 for an
            exception raised by a handler.
        :param message: aiohttp's text for the client, which may quote the
            request: never sent.
        :raises ConnectionError: when part of a response was already sent.
        """
        if isinstance(exc, HttpProcessingError):
            log.debug("refused a malformed HTTP request: %d (%s)", status, type(exc).__name__)
        elif isinstance(exc, ConnectionError):  # the client went away mid-request
            log.debug("the client closed the connection before its request was read")
            raise ConnectionError("client gone") from None
        else:
            log.error("unexpected error handling an HTTP request", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        if status == HTTPStatus.BAD_REQUEST:
            return _bad_request()
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        response = web.Response(
            status=status,
            text=f"{status}: {phrase}" if phrase else str(status),
            headers={hdrs.SERVER: SERVER_HEADER},
        )
        response.force_close()
        return response


class _TCPSite(web.TCPSite):
    """:class:`aiohttp.web.TCPSite` with a bounded TLS handshake time and our request handler.

    aiohttp's own site leaves asyncio's 60 s handshake default; a handshake that
    trickles would hold a connection that long.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        tls_handshake_timeout_s: float,
        cap: ConnectionCap,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None)
        self._tls_handshake_timeout_s = tls_handshake_timeout_s
        self._cap = cap

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # the app's handler_args (limits, timeouts) win over our lingering time
        handler_args = {"lingering_time": LINGER_S, **server._kwargs}
        server.request_handler = _known_expectations_only(server.request_handler)
        cap = self._cap

        def protocol() -> web.RequestHandler:
            return _RequestHandler(server, cap=cap, loop=loop, **handler_args)

        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._tls_handshake_timeout_s if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = int(sockets[0].getsockname()[1]) if sockets else self._port


async def start_site(
    app: web.Application,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    shutdown_timeout_s: float = 5.0,
    tls_handshake_timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S,
    max_connections: int | None = None,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, int]:
    """Start *app* on ``host:port`` in the running loop.

    The access log is off: it would hold full client addresses, which the
    store's ``ip_policy`` may forbid keeping.  HTTP/0.9 requests are refused
    (a middleware put first in *app*'s, which must not be frozen yet, so that
    it runs before authentication).  The connection cap is the app's
    ``app[CONNECTIONS_KEY]`` (:class:`ConnectionCap`, set by its factory) or
    else one of :data:`MAX_CONNECTIONS`; read its counters there.  Stop with
    ``await runner.cleanup()``, which stops listening, lets requests finish (up
    to *shutdown_timeout_s* seconds) and then runs the app's cleanup (the
    event writer's flush).

    :param host: address or name to listen on; a name that resolves to several
        addresses gets one socket each.
    :param port: TCP port, 0 for any free one (give *host* as one literal
        address then: each socket of a multi-address name would get its own
        free port, and only the first is returned).
    :param ssl_context: server context for HTTPS, ``None`` for plain HTTP.
    :param tls_handshake_timeout_s: seconds a client has to finish the TLS
        handshake before the connection is closed.
    :param max_connections: connections served at once (one more gets ``503``
        and is closed); ``None``: the app's cap, else :data:`MAX_CONNECTIONS`.
    :param reuse_port: bind with ``SO_REUSEPORT``, beside the other workers
        (:mod:`smtp_tracker.workers`).
    :returns: the runner and the port actually bound.
    :raises StartupError: when the address cannot be bound.
    :raises ValueError: when *max_connections* < 1.
    """
    if max_connections is not None or CONNECTIONS_KEY not in app:
        app[CONNECTIONS_KEY] = ConnectionCap(max_connections or MAX_CONNECTIONS)
    cap = app[CONNECTIONS_KEY]
    app.middlewares.insert(0, _http_1_only)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout_s
    )
    await runner.setup()
    site = _TCPSite(
        runner,
        host,
        port,
        ssl_context=ssl_context,
        tls_handshake_timeout_s=tls_handshake_timeout_s,
        cap=cap,
        reuse_port=reuse_port,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen for the pixel endpoint on {host}:{port}: {exc.strerror}"
        ) from exc
    return runner, site.port
