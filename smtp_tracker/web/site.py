"""Running the pixel app on a TCP site beside other servers in the same loop."""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

from smtp_tracker.errors import StartupError

__all__ = ["TLS_HANDSHAKE_TIMEOUT_S", "start_site"]

#: Seconds a client has to complete the TLS handshake.
TLS_HANDSHAKE_TIMEOUT_S = 10.0


class _TCPSite(web.TCPSite):
    """:class:`aiohttp.web.TCPSite` with a bounded TLS handshake time.

    aiohttp's own site leaves asyncio's 60 s default; a handshake that trickles
    would hold a connection that long.
    """

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if self._ssl_context else None,
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
) -> tuple[web.AppRunner, int]:
    """Start *app* on ``host:port`` in the running loop.

    The access log is off: it would hold full client addresses, which the
    store's ``ip_policy`` may forbid keeping.  Stop with ``await runner.cleanup()``,
    which stops listening, lets requests finish (up to *shutdown_timeout_s*
    seconds) and then runs the app's cleanup (the event writer's flush).

    :param host: address or name to listen on; a name that resolves to several
        addresses gets one socket each.
    :param port: TCP port, 0 for any free one (give *host* as one literal
        address then: each socket of a multi-address name would get its own
        free port, and only the first is returned).
    :param ssl_context: server context for HTTPS, ``None`` for plain HTTP.
    :returns: the runner and the port actually bound.
    :raises StartupError: when the address cannot be bound.
    """
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout_s
    )
    await runner.setup()
    site = _TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen for the pixel endpoint on {host}:{port}: {exc.strerror}"
        ) from exc
    return runner, site.port
