"""Running an aiohttp app on a TCP site beside other servers in the same loop.

Malformed requests (a bad request line, a header line over the limit, too
many header fields, a bad ``Content-Length``) are answered by aiohttp before
any app sees them.  Its stock answer echoes the offending request text back
and names the aiohttp version, and its log line carries a traceback and the
client's full address; :class:`_RequestHandler` answers with the status and
its reason phrase only, under our ``Server`` name, and logs one debug line
without the address or the request.

Also refused with 400: HTTP/0.9 requests (no version in the request line),
which aiohttp would otherwise serve.  A request body no handler read is
drained for at most :data:`LINGER_S` seconds after the response, then the
connection is closed (aiohttp's default is 10 s).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from http import HTTPStatus

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from smtp_tracker.errors import StartupError
from smtp_tracker.web.public.pixel import SERVER_HEADER

__all__ = ["LINGER_S", "TLS_HANDSHAKE_TIMEOUT_S", "start_site"]

log = logging.getLogger(__name__)

#: Seconds a client has to complete the TLS handshake.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
#: Seconds an unread request body is drained after the response before closing.
LINGER_S = 2.0


def _bad_request() -> web.Response:
    response = web.Response(
        status=HTTPStatus.BAD_REQUEST,
        text=f"400: {HTTPStatus.BAD_REQUEST.phrase}",
        headers={hdrs.SERVER: SERVER_HEADER},
    )
    response.force_close()
    return response


@web.middleware
async def _http_1_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse HTTP/0.9 (RFC 9112 §2.3: a request line without a version)."""
    if request.version < (1, 0):
        return _bad_request()
    return await handler(request)


class _RequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with a fixed answer to malformed requests."""

    __slots__ = ()

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
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._tls_handshake_timeout_s = tls_handshake_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # the app's handler_args (limits, timeouts) win over our lingering time
        handler_args = {"lingering_time": LINGER_S, **server._kwargs}

        def protocol() -> web.RequestHandler:
            return _RequestHandler(server, loop=loop, **handler_args)

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
) -> tuple[web.AppRunner, int]:
    """Start *app* on ``host:port`` in the running loop.

    The access log is off: it would hold full client addresses, which the
    store's ``ip_policy`` may forbid keeping.  HTTP/0.9 requests are refused
    (a middleware added to *app*, which must not be frozen yet).  Stop with
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
    :returns: the runner and the port actually bound.
    :raises StartupError: when the address cannot be bound.
    """
    app.middlewares.append(_http_1_only)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout_s
    )
    await runner.setup()
    site = _TCPSite(
        runner, host, port, ssl_context=ssl_context, tls_handshake_timeout_s=tls_handshake_timeout_s
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen for the pixel endpoint on {host}:{port}: {exc.strerror}"
        ) from exc
    return runner, site.port
