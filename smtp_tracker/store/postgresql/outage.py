"""A PostgreSQL server that does not answer: an outage, logged once, failed fast.

Faults
    A call fails with :class:`~smtp_tracker.errors.StoreError` within
    *timeout_s* when the server is down or slow (the pool's wait and libpq's
    ``connect_timeout``); callers fail open (the relay relays, the pixel
    endpoint serves its GIF, counting the drop).  The first failure of an
    outage is logged as an error, the recovery as a warning, nothing in
    between (:class:`Outage`); :attr:`~.store.PostgresStore.degraded` says
    why while it lasts.  Broken connections are dropped by the pool and new
    ones made when the server is back: writing resumes by itself.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from smtp_tracker.errors import StoreError
from smtp_tracker.store.integrity import StoreSuspendedError

__all__ = ["RETRY_INTERVAL_S", "Outage", "PgCounters", "StoreUnavailableError", "is_outage"]

log = logging.getLogger("smtp_tracker.store")

#: Seconds between two tries of the server during an outage (calls between fail at once).
RETRY_INTERVAL_S = 1.0


class StoreUnavailableError(StoreSuspendedError):
    """The PostgreSQL server does not answer: an outage, logged once by the store.

    A :class:`~.integrity.StoreSuspendedError`, so callers count it without a
    line of their own (the relay relays, the event writer drops the opens).
    """


@dataclass
class PgCounters:
    """What the store counts about its own health.

    :ivar failures: calls that failed because the server was down, slow or refused.
    :ivar outages: outages seen (a failure after a success).
    """

    failures: int = 0
    outages: int = 0
    health_checks: int = 0
    suspended_calls: int = 0
    health_failures: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Outage:
    """Whether the server is away, as the store's calls found it (thread-safe).

    :ivar reason: ``"store: PostgreSQL unavailable (...)"`` while an outage
        lasts, else None.
    """

    def __init__(self, counters: PgCounters) -> None:
        self._counters = counters
        self.reason: str | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def failed(self, reason: str) -> None:
        """Count a call that failed for *reason* (one line); the first of an outage
        starts it (logged once), and calls fail fast for :data:`RETRY_INTERVAL_S`."""
        with self._lock:
            self._counters.failures += 1
            self._retry_at = time.monotonic() + RETRY_INTERVAL_S
            if self.reason is None:
                self._counters.outages += 1
                self.reason = f"store: PostgreSQL unavailable ({reason})"
                log.error(
                    "TRACKING STORE UNAVAILABLE: %s; mail is relayed but not recorded and "
                    "opens are dropped (counted) until it is back (logged once per outage)",
                    self.reason,
                )

    def succeeded(self) -> None:
        """A call succeeded: an outage under way ends (logged)."""
        if self.reason is None:
            return
        with self._lock:
            if self.reason is not None:
                log.warning(
                    "tracking store back after an outage: recording again (%d calls failed)",
                    self._counters.failures,
                )
                self.reason = None

    def refuse_early(self) -> None:
        """Fail fast while the server is away: one call tries it again each interval.

        :raises StoreUnavailableError: during an outage, before its retry time (counted).
        """
        if self.reason is not None and time.monotonic() < self._retry_at:
            with self._lock:
                self._counters.failures += 1
            raise StoreUnavailableError(self.reason)


def is_outage(exc: StoreError) -> bool:
    """Whether *exc* came from the server being away (not from a bad record)."""
    import psycopg

    cause = exc.__cause__
    return isinstance(cause, psycopg.OperationalError | psycopg.errors.AdminShutdown)
