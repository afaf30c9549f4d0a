"""Rate limits on RECORDED events, so a replayed pixel or click URL cannot inflate counts.

The endpoints always answer (the pixel GIF, the click's redirect); the
:class:`EventLimiter` only decides whether an event is offered to the store.
Two limits, both per minute:

* per token (``max_events_per_token_per_min``): however many clients fetch it;
* per token and client address (``max_events_per_token_client_per_min``):
  one client replaying one URL.

There is deliberately NO limit per client address alone: one mail provider's
proxy (Gmail's GoogleImageProxy, Yahoo's, Apple's relays) fetches pixels for
many recipients from few addresses, and a per-address limit would throw away
their real opens.

Each limit is a fixed window per key, starting at the key's first event: up
to N events are allowed until 60 s after that, then the window restarts.
(So a steady replayer gets at most 2N in any 60 s spanning a window boundary.)
Memory is bounded: each table keeps at most ``max_keys`` keys, least recently
used first out; evicting a key forgets its count, which can only let a few
more events be recorded, never drop any.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Final

__all__ = [
    "DEFAULT_MAX_KEYS",
    "DEFAULT_PER_TOKEN_CLIENT_PER_MIN",
    "DEFAULT_PER_TOKEN_PER_MIN",
    "EventLimiter",
]

#: Defaults of ``max_events_per_token_per_min`` and ``max_events_per_token_client_per_min``.
DEFAULT_PER_TOKEN_PER_MIN: Final = 30
DEFAULT_PER_TOKEN_CLIENT_PER_MIN: Final = 5
#: Keys kept per table (tokens; token and client pairs).
DEFAULT_MAX_KEYS: Final = 100_000

_WINDOW_MS: Final = 60_000


class _Windows:
    """Fixed one-minute windows per key, at most *max_keys* keys (LRU eviction).

    Each value is one int, ``window start in ms << 32 | events counted``
    (about 90 bytes less per key than a list of two floats).
    """

    __slots__ = ("_entries", "_max_keys")

    def __init__(self, max_keys: int) -> None:
        self._entries: OrderedDict[Hashable, int] = OrderedDict()
        self._max_keys = max_keys

    def __len__(self) -> int:
        return len(self._entries)

    def has_room(self, key: Hashable, limit: int, now_ms: int) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return True
        self._entries.move_to_end(key)  # a refused key is in use too: keep it
        return now_ms - (entry >> 32) >= _WINDOW_MS or entry & 0xFFFFFFFF < limit

    def count(self, key: Hashable, now_ms: int) -> None:
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            entries[key] = now_ms << 32 | 1
            if len(entries) > self._max_keys:
                entries.popitem(last=False)
            return
        entries.move_to_end(key)
        if now_ms - (entry >> 32) >= _WINDOW_MS:
            entries[key] = now_ms << 32 | 1
        else:
            entries[key] = entry + 1


class EventLimiter:
    """Decides whether an open or click event is recorded; bounded memory.

    Shared by the pixel endpoint and the click endpoint (one object per app,
    ``app[LIMITER_KEY]`` in :mod:`smtp_tracker.web.public.pixel`): call
    ``limiter.allow(token, client)`` before offering the event to the writer,
    and offer it only when that returns ``True``; answer the request the same
    either way.  Not thread-safe: call it from the event loop only.

    Counters (plain ints, logged at shutdown): :attr:`allowed`,
    :attr:`limited_token` (over the per-token limit), :attr:`limited_client`
    (over the per-token-and-client limit).

    :param per_token_per_min: events recorded per token per minute; 0 for no limit.
    :param per_token_client_per_min: events recorded per token and client
        address per minute; 0 for no limit.
    :param max_keys: most keys kept in each table (>= 1).
    :param clock: monotonic seconds (tests pass their own).
    :raises ValueError: when a limit is negative or *max_keys* < 1.
    """

    def __init__(
        self,
        *,
        per_token_per_min: int = DEFAULT_PER_TOKEN_PER_MIN,
        per_token_client_per_min: int = DEFAULT_PER_TOKEN_CLIENT_PER_MIN,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_token_per_min < 0 or per_token_client_per_min < 0:
            raise ValueError("event limits must be 0 (no limit) or more")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.per_token_per_min = per_token_per_min
        self.per_token_client_per_min = per_token_client_per_min
        self._clock = clock
        self._tokens = _Windows(max_keys)
        self._pairs = _Windows(max_keys)
        self.allowed = 0
        self.limited_token = 0
        self.limited_client = 0

    def __repr__(self) -> str:
        return (
            f"EventLimiter(allowed={self.allowed}, limited_token={self.limited_token},"
            f" limited_client={self.limited_client})"
        )

    @property
    def counters(self) -> dict[str, int]:
        """``allowed``, ``limited_token`` and ``limited_client``, for logs."""
        return {
            "allowed": self.allowed,
            "limited_token": self.limited_token,
            "limited_client": self.limited_client,
        }

    @property
    def keys(self) -> int:
        """Keys held now, both tables together."""
        return len(self._tokens) + len(self._pairs)

    def allow(self, token: str, client: str | None) -> bool:
        """Whether to record one event for *token* from *client*; counts it if so.

        :param token: the pixel's tracking id or the click's link token.
        :param client: the client address as text (after trusted-proxy
            resolution), or ``None`` when unknown (all unknown clients share one
            allowance per token).
        :returns: ``True`` when both limits allow it (then it is counted
            against both); ``False`` when either is reached (nothing counted).
        """
        now = int(self._clock() * 1000)
        pair = (token, client or "")
        per_client = self.per_token_client_per_min
        if per_client and not self._pairs.has_room(pair, per_client, now):
            self.limited_client += 1
            return False
        per_token = self.per_token_per_min
        if per_token and not self._tokens.has_room(token, per_token, now):
            self.limited_token += 1
            return False
        if per_client:
            self._pairs.count(pair, now)
        if per_token:
            self._tokens.count(token, now)
        self.allowed += 1
        return True
