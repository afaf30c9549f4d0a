"""The HTTPS pixel endpoint (aiohttp).

Routes
    ``GET`` and ``HEAD`` ``/o/{token}.gif``: 200, the 43-byte transparent GIF
    (:mod:`.gif`), for every token, known, unknown or malformed, so the
    endpoint reveals nothing about which tokens exist.  A ``GET`` with a
    well-formed token offers an open to the :class:`~smtp_tracker.store.writer.EventWriter`
    (never waiting), within the event limits (:mod:`.limits`: per token, and
    per token and client; the GIF is served either way); the store records it
    only if the token is known.  ``HEAD`` records nothing: it does not fetch
    the image (link checkers, prefetchers).

    ``GET /healthz``: 200 ``ok`` (text/plain), or 200 ``degraded: store``
    when the tracking store is suspended or not keeping what it is given
    (:attr:`~smtp_tracker.store.sqlite.SqliteStore.degraded`): still 200,
    because the GIFs are still served and a load balancer must not take the
    endpoint out for it; alert on the body (or the logs) instead.

    ``GET`` and ``HEAD`` ``/c/{token}``: the click endpoint (:mod:`.click`),
    302 to the destination stored for a known link token, else 404.

    ``GET``, ``HEAD`` and ``POST`` ``/optout/{token}``: the objection page
    (:mod:`.optout`), when given.

    Anything else: 404 (other methods on the pixel path: 405).  No static
    files, no directory listings, no path normalisation, no redirect but to
    a stored link.

Caching
    ``Cache-Control: no-store, no-cache, must-revalidate, private`` (RFC 9111
    §5.2.2, formerly RFC 7234 §5.2), plus ``Pragma: no-cache`` (RFC 9111
    §5.4, for HTTP/1.0 caches) and ``Expires: 0`` (an invalid date, which
    RFC 9111 §5.3 says means already expired), so every display refetches.

Limits
    Request line and header fields at most 8190 bytes each, at most 64 header
    fields, request body at most 1 KiB; a connection must send its request
    within ``keepalive_timeout_s`` (aiohttp's keep-alive timer also bounds the
    first request's headers; 15 s by default); no body is ever read (one sent
    is drained for 2 s after the response); at most
    :data:`~smtp_tracker.web.site.MAX_CONNECTIONS` connections at once
    (:func:`~smtp_tracker.web.site.start_site`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from smtp_tracker.store.base import Store, store_degraded
from smtp_tracker.store.records import USER_AGENT_MAX_CHARS, OpenEvent
from smtp_tracker.store.writer import EventWriter
from smtp_tracker.tokens import PIXEL_PATH_PREFIX, is_well_formed_token
from smtp_tracker.web.client_address import IPNetwork, request_client_address
from smtp_tracker.web.public.click import add_click_route
from smtp_tracker.web.public.gif import GIF_CONTENT_TYPE, TRANSPARENT_GIF
from smtp_tracker.web.public.limits import EventLimiter
from smtp_tracker.web.public.optout import OptoutPage, add_optout_routes
from smtp_tracker.web.site import (
    HEADER_TIMEOUT_S,
    SERVER_HEADER,
    handler_args,
)

__all__ = [
    "LIMITER_KEY",
    "PIXEL_HEADERS",
    "STORE_KEY",
    "WRITER_KEY",
    "make_pixel_app",
]

logger = logging.getLogger(__name__)

#: The app's store.
STORE_KEY: Final = web.AppKey("store", Store)
#: The app's event writer; read its counters (``dropped``, ``recorded``, ...).
WRITER_KEY: Final = web.AppKey("writer", EventWriter)
_TRUSTED_KEY: Final[web.AppKey[tuple[IPNetwork, ...]]] = web.AppKey("trusted_proxies")
#: The app's rate limiter of recorded events, or ``None`` (no limit); the click
#: endpoint uses the same one: ``app[LIMITER_KEY].allow(token, client)``.
LIMITER_KEY: Final[web.AppKey[EventLimiter | None]] = web.AppKey("limiter")

#: Headers of every pixel response (besides Content-Length, Date, Server).
PIXEL_HEADERS: Final = CIMultiDictProxy(
    CIMultiDict(
        {
            hdrs.CONTENT_TYPE: GIF_CONTENT_TYPE,
            hdrs.CACHE_CONTROL: "no-store, no-cache, must-revalidate, private",
            hdrs.PRAGMA: "no-cache",
            hdrs.EXPIRES: "0",
        }
    )
)

_CLIENT_MAX_BYTES = 1024


def make_pixel_app(
    *,
    store: Store,
    trusted_proxies: Sequence[IPNetwork] = (),
    limiter: EventLimiter | None = None,
    queue_size: int = 10_000,
    batch_max: int = 500,
    keepalive_timeout_s: float = HEADER_TIMEOUT_S,
    flush_timeout_s: float = 10.0,
    optout: OptoutPage | None = None,
) -> web.Application:
    """The pixel endpoint as an aiohttp application.

    The event writer task starts with the app and, at cleanup (after the
    server stopped taking requests), writes what is queued; the store itself
    is the caller's to open and close.

    :param store: where opens are recorded; it applies its ``ip_policy``.
    :param trusted_proxies: networks whose ``X-Forwarded-For`` is believed
        (see :mod:`smtp_tracker.web.client_address`).
    :param limiter: limits the opens offered to the writer per token and per
        token and client (:mod:`.limits`); the GIF is served either way.
        ``None``: no limit.
    :param queue_size: bound of the event queue, in events; beyond it opens
        are dropped and counted (``app[WRITER_KEY].dropped``).
    :param batch_max: most opens per store transaction.
    :param keepalive_timeout_s: idle and first-request timeout per connection, in seconds.
    :param flush_timeout_s: how long shutdown waits for queued opens, in seconds.
    :param optout: the objection page (``/optout/{token}``, :mod:`.optout`), or None.
    """
    app = web.Application(
        client_max_size=_CLIENT_MAX_BYTES,
        handler_args=handler_args(keepalive_timeout_s),
    )
    app[STORE_KEY] = store
    app[WRITER_KEY] = EventWriter(
        store, queue_size=queue_size, batch_max=batch_max, flush_timeout_s=flush_timeout_s
    )
    app[_TRUSTED_KEY] = tuple(trusted_proxies)
    app[LIMITER_KEY] = limiter
    app.router.add_get(PIXEL_PATH_PREFIX + "{token}.gif", _pixel)  # also HEAD
    add_click_route(  # GET/HEAD /c/{token}: 302 to a stored link (click tracking)
        app, store=store, writer=app[WRITER_KEY], limiter=limiter, trusted_proxies=trusted_proxies
    )
    app.router.add_get("/healthz", _healthz, allow_head=True)
    if optout is not None:
        add_optout_routes(app, optout)
    app.cleanup_ctx.append(_writer_lifecycle)
    app.on_response_prepare.append(_set_server_header)
    return app


async def _writer_lifecycle(app: web.Application) -> AsyncIterator[None]:
    writer = app[WRITER_KEY]
    await writer.start()
    yield
    await writer.stop()
    logger.info("pixel endpoint stopped: %r", writer)
    if app[LIMITER_KEY] is not None:
        logger.info("pixel endpoint event limits: %r", app[LIMITER_KEY])


async def _pixel(request: web.Request) -> web.Response:
    if request.method == hdrs.METH_GET:
        token = request.match_info["token"]
        if is_well_formed_token(token):
            app = request.app
            trusted: tuple[IPNetwork, ...] = app[_TRUSTED_KEY]
            user_agent = request.headers.get(hdrs.USER_AGENT)
            if user_agent is not None:
                user_agent = user_agent[:USER_AGENT_MAX_CHARS]
            client = request_client_address(request, trusted)
            limiter = app[LIMITER_KEY]
            if limiter is None or limiter.allow(token, client):
                app[WRITER_KEY].offer(
                    OpenEvent(
                        tracking_id=token,
                        at=datetime.now(UTC),
                        ip=client,
                        user_agent=user_agent,
                    )
                )
    return web.Response(body=TRANSPARENT_GIF, headers=PIXEL_HEADERS)


async def _healthz(request: web.Request) -> web.Response:
    # 200 either way: the GIFs are served whatever the store does, so a load
    # balancer must keep sending opens here; monitoring reads the body.
    degraded = store_degraded(request.app[STORE_KEY])
    text = "ok" if degraded is None else "degraded: store"
    return web.Response(text=text, content_type="text/plain")


async def _set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[hdrs.SERVER] = SERVER_HEADER
