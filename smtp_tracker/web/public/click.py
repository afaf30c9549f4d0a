"""The click endpoint, on the pixel listener: ``GET /c/{token}`` redirects to a stored URL.

Routes
    ``GET /c/{token}``: when *token* is the token of a link the relay wrapped
    (:mod:`smtp_tracker.mime.links`), ``302 Found`` with ``Location:`` the
    destination stored with the message, exactly (characters outside
    printable ASCII percent-encoded, RFC 3986 §2.1), and a click is offered to
    the event writer (within the event limits, :mod:`.limits`); the store
    classifies it.  ``HEAD``: the same answer, nothing recorded (link
    checkers, prefetchers).

    Unknown, malformed or altered tokens: ``404`` with a fixed small body.
    The destination only ever comes from the store, never from the request,
    so the endpoint is not an open redirect (the token holds over 128 random
    bits: it cannot be guessed or forged).  A store that cannot be read:
    ``503`` with a fixed body.

Headers
    ``Cache-Control: no-store`` (RFC 9111 §5.2.2.5: every click reaches us),
    ``Referrer-Policy: no-referrer`` (the destination does not learn our
    click URL).

Positive lookups are cached in a bounded LRU for a few minutes (a link's
destination never changes; the time limit lets a pruned or forgotten link stop
redirecting soon); unknown tokens are not cached.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from smtp_tracker.errors import StoreError
from smtp_tracker.store.base import Store
from smtp_tracker.store.records import USER_AGENT_MAX_CHARS, ClickEvent
from smtp_tracker.store.writer import EventWriter
from smtp_tracker.tokens import CLICK_PATH_PREFIX, URL_SAFE, is_well_formed_token
from smtp_tracker.web.client_address import IPNetwork, request_client_address
from smtp_tracker.web.public.limits import EventLimiter

__all__ = [
    "CLICK_KEY",
    "DEFAULT_CACHE_ENTRIES",
    "DEFAULT_CACHE_TTL_S",
    "ClickEndpoint",
    "LinkCache",
    "add_click_route",
    "location",
]

logger = logging.getLogger(__name__)

#: Destinations cached by default.
DEFAULT_CACHE_ENTRIES: Final = 10_000
#: Seconds a destination stays cached.
DEFAULT_CACHE_TTL_S: Final = 300.0

_REDIRECT_HEADERS: Final = {
    hdrs.CACHE_CONTROL: "no-store",
    "Referrer-Policy": "no-referrer",
}
_NOT_FOUND_HEADERS: Final = CIMultiDictProxy(
    CIMultiDict(
        {
            hdrs.CONTENT_TYPE: "text/plain; charset=utf-8",
            hdrs.CACHE_CONTROL: "no-store",
            "Referrer-Policy": "no-referrer",
        }
    )
)
_NOT_FOUND_BODY: Final = b"not found\n"
_UNAVAILABLE_BODY: Final = b"temporarily unavailable\n"


class LinkCache:
    """Destinations by link token: at most *max_entries*, least recently used out,
    each for *ttl_s* seconds.

    :param max_entries: bound (>= 1).
    :param ttl_s: seconds an entry is kept (> 0).
    :param clock: monotonic seconds (tests pass their own).
    :raises ValueError: when *max_entries* < 1 or *ttl_s* <= 0.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        *,
        ttl_s: float = DEFAULT_CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not ttl_s > 0:
            raise ValueError("ttl_s must be a positive number of seconds")
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str) -> str | None:
        """The cached destination of *token*, or None (never cached, or expired)."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        url, expires = entry
        if self._clock() >= expires:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return url

    def put(self, token: str, url: str) -> None:
        """Remember *token* → *url*, evicting the least recently used beyond the bound."""
        self._entries[token] = (url, self._clock() + self._ttl_s)
        self._entries.move_to_end(token)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


def location(url: str) -> str:
    """The ``Location`` value for a stored destination: the URL, with characters
    outside printable ASCII percent-encoded as UTF-8 (``%`` kept as it is)."""
    if url.isascii() and url.isprintable() and " " not in url:
        return url
    return urllib.parse.quote(url, safe=URL_SAFE, encoding="utf-8", errors="strict")


class ClickEndpoint:
    """Handles ``/c/{token}``; counters: :attr:`redirects`, :attr:`not_found`,
    :attr:`recorded_offers` (clicks offered to the writer), :attr:`limited`,
    :attr:`store_errors`, :attr:`cache_hits`.

    :param store: where links are looked up (``find_link``).
    :param writer: where clicks are offered (shared with the pixel).
    :param limiter: event limits per token and per token and client, or None.
    :param trusted_proxies: networks whose ``X-Forwarded-For`` is believed.
    :param cache_entries: destinations cached.
    """

    def __init__(
        self,
        *,
        store: Store,
        writer: EventWriter,
        limiter: EventLimiter | None = None,
        trusted_proxies: Sequence[IPNetwork] = (),
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
    ) -> None:
        self._store = store
        self._writer = writer
        self._limiter = limiter
        self._trusted = tuple(trusted_proxies)
        self.cache = LinkCache(cache_entries)
        self.redirects = 0
        self.not_found = 0
        self.recorded_offers = 0
        self.limited = 0
        self.store_errors = 0
        self.cache_hits = 0

    def __repr__(self) -> str:
        return (
            f"ClickEndpoint(redirects={self.redirects}, not_found={self.not_found},"
            f" offered={self.recorded_offers}, limited={self.limited},"
            f" store_errors={self.store_errors}, cache_hits={self.cache_hits})"
        )

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one ``GET``/``HEAD /c/{token}``."""
        token = request.match_info["token"]
        if not is_well_formed_token(token):
            return self._not_found()
        url = self.cache.get(token)
        if url is not None:
            self.cache_hits += 1
        else:
            try:
                found = await self._store.find_link(token)
            except StoreError as exc:
                self.store_errors += 1
                logger.warning("click endpoint: cannot look a link up: %s", exc)
                return web.Response(
                    status=503,
                    body=_UNAVAILABLE_BODY,
                    headers={**_NOT_FOUND_HEADERS, hdrs.RETRY_AFTER: "5"},
                )
            if found is None:
                return self._not_found()
            url = found[0].url
            self.cache.put(token, url)
        if request.method == hdrs.METH_GET:
            self._offer(request, token)
        self.redirects += 1
        return web.Response(status=302, headers={hdrs.LOCATION: location(url), **_REDIRECT_HEADERS})

    def _offer(self, request: web.Request, token: str) -> None:
        user_agent = request.headers.get(hdrs.USER_AGENT)
        if user_agent is not None:
            user_agent = user_agent[:USER_AGENT_MAX_CHARS]
        client = request_client_address(request, self._trusted)
        if self._limiter is not None and not self._limiter.allow(token, client):
            self.limited += 1
            return
        self.recorded_offers += 1
        self._writer.offer(
            ClickEvent(
                link_token=token,
                at=datetime.now(UTC),
                ip=client,
                user_agent=user_agent,
            )
        )

    def _not_found(self) -> web.Response:
        self.not_found += 1
        return web.Response(status=404, body=_NOT_FOUND_BODY, headers=_NOT_FOUND_HEADERS)


#: The app's click endpoint; read its counters.
CLICK_KEY: Final = web.AppKey("click_endpoint", ClickEndpoint)


def add_click_route(
    app: web.Application,
    *,
    store: Store,
    writer: EventWriter,
    limiter: EventLimiter | None = None,
    trusted_proxies: Sequence[IPNetwork] = (),
    cache_entries: int = DEFAULT_CACHE_ENTRIES,
) -> ClickEndpoint:
    """Add ``GET``/``HEAD /c/{token}`` to the pixel app; the endpoint is ``app[CLICK_KEY]``."""
    endpoint = ClickEndpoint(
        store=store,
        writer=writer,
        limiter=limiter,
        trusted_proxies=trusted_proxies,
        cache_entries=cache_entries,
    )
    app[CLICK_KEY] = endpoint
    app.router.add_get(CLICK_PATH_PREFIX + "{token}", endpoint.handle)  # also HEAD
    return endpoint
