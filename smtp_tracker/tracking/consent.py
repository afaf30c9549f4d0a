"""The relay's consent check: is this transaction's mail tracked, given its recipients' say?

Issue 20.  :class:`ConsentCheck` asks the registry
(:class:`~smtp_tracker.store.consent.ConsentRegistry`) once per transaction,
before the rewrite:

* a recipient in state ``denied`` → relayed untracked, reason
  ``consent-denied`` (no pixel, no wrapped links, no disclosure);
* with ``tracking_requires_consent``, a recipient not ``granted`` → untracked,
  reason ``consent-missing``;
* the registry cannot be read in :data:`LOOKUP_TIMEOUT_S` (a damaged or locked
  store, a defect) → untracked, reason ``consent-unavailable``.

The last rule is the lawful default: not knowing whether someone objected
must not track someone who did, so a failed look-up relays the mail
untracked, never later and never refused.  Opting out never blocks or delays
mail beyond that time limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = [
    "LOOKUP_TIMEOUT_S",
    "REASON_DENIED",
    "REASON_MISSING",
    "REASON_UNAVAILABLE",
    "ConsentCheck",
    "ConsentLookup",
]

log = logging.getLogger("smtp_tracker.consent")

#: Seconds the relay waits for the registry before relaying untracked.
LOOKUP_TIMEOUT_S: Final = 2.0
REASON_DENIED: Final = "consent-denied"
REASON_MISSING: Final = "consent-missing"
REASON_UNAVAILABLE: Final = "consent-unavailable"
#: Seconds between two warnings about an unreadable registry.
_WARN_EVERY_S: Final = 60.0


class ConsentLookup(Protocol):
    """What the check reads: the state of each address that has one."""

    async def states(self, addresses: Sequence[str]) -> Mapping[str, str]:
        """``{address: "denied" | "granted"}`` for the addresses the registry knows.

        :raises Exception: any failure; the check treats it as unavailable.
        """
        ...


@dataclass(slots=True)
class ConsentCounters:
    """Look-ups, and transactions left untracked by each rule."""

    lookups: int = 0
    denied: int = 0
    missing: int = 0
    unavailable: int = 0


class ConsentCheck:
    """The consent rules of the relay.

    :param lookup: the registry; None: no registry could be had (every
        transaction is ``consent-unavailable``).
    :param requires_consent: ``tracking_requires_consent``: track only when
        every recipient is ``granted``.
    :param timeout_s: seconds to wait for the registry.
    """

    def __init__(
        self,
        lookup: ConsentLookup | None,
        *,
        requires_consent: bool = False,
        timeout_s: float = LOOKUP_TIMEOUT_S,
    ) -> None:
        self._lookup = lookup
        self.requires_consent = requires_consent
        self._timeout_s = timeout_s
        self.counters = ConsentCounters()
        self._warned_at = -_WARN_EVERY_S

    async def not_tracked_reason(self, recipients: Sequence[str]) -> str | None:
        """None when the mail to *recipients* may be tracked, else the reason; never raises."""
        if not recipients:
            return None
        self.counters.lookups += 1
        try:
            if self._lookup is None:
                raise LookupError("no consent registry")
            async with asyncio.timeout(self._timeout_s):
                states = await self._lookup.states(recipients)
        except Exception as exc:  # lawful by default: unknown is not tracked
            self.counters.unavailable += 1
            now = time.monotonic()
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                log.warning(
                    "consent registry unavailable (%s); relaying untracked (%s) until it is back",
                    type(exc).__name__ if not str(exc) else exc,
                    REASON_UNAVAILABLE,
                )
            return REASON_UNAVAILABLE
        if any(states.get(address) == "denied" for address in recipients):
            self.counters.denied += 1
            return REASON_DENIED
        if self.requires_consent and not all(
            states.get(address) == "granted" for address in recipients
        ):
            self.counters.missing += 1
            return REASON_MISSING
        return None
