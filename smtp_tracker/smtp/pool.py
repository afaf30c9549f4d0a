"""Upstream connections kept between transactions and lent to the next (issue 15).

Opening a connection to the upstream costs a TCP handshake, the greeting,
EHLO, STARTTLS and its TLS handshake, EHLO again and AUTH: several round
trips and most of the relay's per-message CPU when Postfix opens a session
per message.  :class:`ConnectionPool` keeps connections that ended a
transaction cleanly and lends them to the next transaction for the same
upstream, identified by :class:`PoolKey` (host, port, TLS mode, the TLS
server name, the AUTH identity and our EHLO name: a connection authenticated
as one user is never lent to a transaction configured for another).

The rules, each kept here or by the callers (:mod:`.failover`, :mod:`.fanout`):

- A connection is lent at MAIL (:meth:`ConnectionPool.acquire`) to one
  transaction and to no other until it is given back: never two
  transactions at once on one connection.
- It is given back (:meth:`ConnectionPool.release`) only after its
  transaction ended cleanly: the final reply to the message, or RSET
  answered 250.  After the final reply to the message the pool sends RSET
  first (RFC 5321 §4.1.1.5), in the background, and keeps the connection
  only if the upstream answered 250.  Anything else (a 421, a timeout, a
  lost connection, a reply that leaves the state unclear, the client gone
  mid-transaction) closes the connection instead.
- A connection idle for longer than :data:`CHECK_AFTER_S` is checked with
  RSET before it is lent, and closed if the check fails; the transaction then
  gets another connection, or a new one, and the client sees nothing of it.
- At most ``size`` connections per upstream are kept; one given back to a
  full pool is closed with QUIT.  A kept connection idle for
  ``idle_timeout_s`` is closed with QUIT, and so is every kept one at
  :meth:`ConnectionPool.close` (shutdown).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from smtp_tracker.smtp.transcript import NOTE, Transcript
from smtp_tracker.smtp.upstream import UpstreamSession, UpstreamSettings

__all__ = ["CHECK_AFTER_S", "CHECK_TIMEOUT_S", "ConnectionPool", "PoolKey", "PoolStats"]

log = logging.getLogger("smtp_tracker.relay")

#: A kept connection idle longer than this (seconds) is checked with RSET before it is lent.
CHECK_AFTER_S = 2.0
#: The longest the check (RSET, before a connection is kept or lent) may take, in seconds.
CHECK_TIMEOUT_S = 10.0
#: The longest :meth:`ConnectionPool.acquire` waits for a connection being given back
#: (its RSET in flight) before it opens a new one, in seconds.
RETURN_WAIT_S = 1.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    """What makes two connections interchangeable: the same upstream, reached the same way.

    :ivar server_name: the name the upstream's certificate is checked against
        (the host as configured, also when connecting to an address).
    :ivar user: the AUTH identity (None: no AUTH).
    :ivar helo_name: our EHLO name.
    """

    host: str
    port: int
    tls: str
    server_name: str
    user: str | None
    helo_name: str

    @classmethod
    def of(cls, settings: UpstreamSettings) -> PoolKey:
        """The key of connections made with ``settings``."""
        return cls(
            host=settings.host,
            port=settings.port,
            tls=settings.tls,
            server_name=settings.host,
            user=settings.user,
            helo_name=settings.helo_name,
        )


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One upstream's pool, for metrics.

    :ivar idle: connections kept now, waiting for a transaction.
    :ivar reuses: transactions that got a kept connection instead of a new one, since start.
    """

    idle: int
    reuses: int


@dataclass(slots=True)
class _Kept:
    session: UpstreamSession
    since: float  # clock() when it was last known good


@dataclass(slots=True)
class _Slot:
    """The connections of one :class:`PoolKey`."""

    idle: collections.deque[_Kept] = field(default_factory=collections.deque)
    #: connections being given back: RSET sent, reply awaited
    returning: set[asyncio.Task[None]] = field(default_factory=set)
    reuses: int = 0
    reaper: asyncio.Task[None] | None = None


class ConnectionPool:
    """Connections to upstreams kept between transactions; one per application.

    Every method runs on the event loop.

    :param size: connections kept per upstream at most; 0 keeps none (every
        connection given back is closed).
    :param idle_timeout_s: a kept connection unused this long is closed with
        QUIT; None: kept until :meth:`close`.
    :param check_after_s: a kept connection idle longer than this is checked
        with RSET before it is lent.
    :param reset_on_return: RSET a connection given back after the final reply to
        its message before keeping it (False: kept as it is, the final reply having
        ended the transaction, RFC 5321 §4.1.1.4; a session's own pool when pooling
        is off, as before pooling).
    :param clock: seconds, monotonic (tests may give their own).
    :raises ValueError: ``size`` negative, or a duration not positive.
    """

    def __init__(
        self,
        size: int,
        idle_timeout_s: float | None = None,
        *,
        check_after_s: float = CHECK_AFTER_S,
        reset_on_return: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 0:
            raise ValueError(f"pool size must be 0 or more, got {size}")
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be positive, got {idle_timeout_s}")
        if not check_after_s >= 0:
            raise ValueError(f"check_after_s must be 0 or more, got {check_after_s}")
        self.size = size
        self.idle_timeout_s = idle_timeout_s
        self.check_after_s = check_after_s
        self.reset_on_return = reset_on_return
        self._clock = clock
        self._slots: dict[PoolKey, _Slot] = {}
        #: connections lent now (to catch a second lending of one: a bug)
        self._lent: weakref.WeakSet[UpstreamSession] = weakref.WeakSet()
        #: QUITs in flight
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def enabled(self) -> bool:
        """Whether connections are kept at all (``size`` > 0)."""
        return self.size > 0

    def stats(self, settings: UpstreamSettings) -> PoolStats:
        """The pool of ``settings``'s upstream now."""
        slot = self._slots.get(PoolKey.of(settings))
        if slot is None:
            return PoolStats(idle=0, reuses=0)
        return PoolStats(idle=len(slot.idle), reuses=slot.reuses)

    def _slot(self, key: PoolKey) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        return slot

    # -- lending --------------------------------------------------------------------------

    async def acquire(
        self,
        settings: UpstreamSettings,
        transcript: Transcript | None = None,
        *,
        fresh: bool = False,
    ) -> tuple[UpstreamSession, bool]:
        """A connection to ``settings``'s upstream for one transaction, open and ready for MAIL.

        A kept connection if there is one that passes its check (see the module
        docstring), else a new one (connect, EHLO, STARTTLS, AUTH as configured).

        :param transcript: the downstream session's transcript, given to the connection.
        :param fresh: open a new connection, whatever is kept (after a kept one failed).
        :returns: the connection, lent until :meth:`release` or until it is closed,
            and whether it was kept (True) or opened now (False).
        :raises UpstreamError: a new connection could not be opened (4xx; see
            :meth:`UpstreamSession.ensure_open`).
        """
        if self.enabled and not fresh and not self._closed:
            kept = await self._take(self._slot(PoolKey.of(settings)), transcript)
            if kept is not None:
                return kept, True
        session = UpstreamSession(settings, transcript)
        await session.ensure_open()
        self._lend(session)
        return session, False

    async def _take(self, slot: _Slot, transcript: Transcript | None) -> UpstreamSession | None:
        """A kept connection of ``slot`` that passed its check, or None."""
        waited = False
        while True:
            while slot.idle:
                kept = slot.idle.pop()  # the most recently used: the others may time out
                session = kept.session
                if not session.reusable:
                    session.abort()
                    continue
                if self._clock() - kept.since > self.check_after_s:
                    self._lend(session)
                    try:
                        ok = await session.rset(CHECK_TIMEOUT_S)
                    except BaseException:  # cancelled: its state is unknown
                        self._lent.discard(session)
                        session.abort()
                        raise
                    if not ok:
                        self._lent.discard(session)
                        log.info(
                            "upstream %s: a kept connection failed its check; closed",
                            session.settings.label,
                        )
                        session.abort()
                        continue
                else:
                    self._lend(session)
                slot.reuses += 1
                session.transcript = transcript
                if transcript is not None:
                    transcript.add(NOTE, f"reusing a connection to {session.settings.label}")
                return session
            if waited or not slot.returning:
                return None
            # a connection is being given back (its RSET in flight, well under a
            # millisecond on a LAN): waiting for it is cheaper than a new one
            waited = True
            await asyncio.wait(
                set(slot.returning), timeout=RETURN_WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )

    def _lend(self, session: UpstreamSession) -> None:
        if session in self._lent:  # pragma: no cover - a bug, never the upstream's doing
            raise RuntimeError("an upstream connection was lent twice")
        self._lent.add(session)

    # -- giving back ----------------------------------------------------------------------

    def release(self, session: UpstreamSession, *, reset: bool) -> None:
        """Give back ``session``, whose transaction ended cleanly; never raises nor waits.

        :param reset: RSET it first, in the background (after the final reply to
            the message, or a reply that leaves the upstream's state to be made
            sure of); False when it has just answered RSET with 250.  It is kept
            only if that RSET is answered 250.

        A connection the pool cannot keep (closed, 421 seen, the pool full or
        closed, pooling off) is closed with QUIT in the background.
        """
        self._lent.discard(session)
        session.transcript = None
        if not session.reusable or self._closed:
            session.abort()
            return
        slot = self._slot(PoolKey.of(session.settings))
        if len(slot.idle) + len(slot.returning) >= self.size:
            self._quit_later(session)
            return
        if not reset or not self.reset_on_return:
            self._keep(slot, session)
            return
        task = asyncio.get_running_loop().create_task(self._reset_and_keep(slot, session))
        slot.returning.add(task)
        task.add_done_callback(slot.returning.discard)

    async def reset(self, session: UpstreamSession) -> None:
        """Abort ``session``'s transaction with RSET (RFC 5321 §4.1.1.5), in the caller's
        time: the connection comes back to the pool when the upstream answered 250,
        and is closed otherwise; cancelled, it is closed (its state is unknown) and
        the cancellation goes on.  Never raises but for cancellation."""
        try:
            ok = await session.rset()
        except BaseException:
            session.abort()
            raise
        if ok:
            self.release(session, reset=False)
        else:
            session.abort()

    async def _reset_and_keep(self, slot: _Slot, session: UpstreamSession) -> None:
        try:
            ok = await session.rset(CHECK_TIMEOUT_S)
        except BaseException:
            session.abort()
            raise
        if not ok or self._closed:
            session.abort()
            return
        self._keep(slot, session)

    def _keep(self, slot: _Slot, session: UpstreamSession) -> None:
        slot.idle.append(_Kept(session, self._clock()))
        if self.idle_timeout_s is not None and (slot.reaper is None or slot.reaper.done()):
            slot.reaper = asyncio.get_running_loop().create_task(self._reap(slot))

    async def _reap(self, slot: _Slot) -> None:
        """Close the connections of ``slot`` kept longer than ``idle_timeout_s``, with QUIT."""
        timeout = self.idle_timeout_s
        assert timeout is not None
        while slot.idle and not self._closed:
            oldest = slot.idle[0]
            wait = oldest.since + timeout - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            slot.idle.popleft()
            await oldest.session.close()

    def _quit_later(self, session: UpstreamSession) -> None:
        task = asyncio.get_running_loop().create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- the end ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every kept connection with QUIT, at once (shutdown); never raises.

        Connections being given back (RSET in flight) are waited for, up to
        :data:`CHECK_TIMEOUT_S`, and closed with the others.  Connections lent
        now are closed by their transactions; one given back later is closed.
        """
        returning = [task for slot in self._slots.values() for task in slot.returning]
        if returning:
            await asyncio.wait(returning, timeout=CHECK_TIMEOUT_S)
        self._closed = True
        tasks: list[asyncio.Task[None]] = []
        sessions: list[UpstreamSession] = []
        for slot in self._slots.values():
            if slot.reaper is not None:
                tasks.append(slot.reaper)
            tasks.extend(slot.returning)
            sessions.extend(kept.session for kept in slot.idle)
            slot.idle.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        finally:
            # cancelled (a client gone right after its QUIT): a QUIT not started yet
            # never runs its own clean-up, so each connection not closed by now is
            # closed at once, without QUIT (a no-op for those already closed)
            for session in sessions:
                session.abort()
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def abort(self) -> None:
        """Close every kept connection at once, without QUIT; never raises."""
        self._closed = True
        for slot in self._slots.values():
            if slot.reaper is not None:
                slot.reaper.cancel()
            for task in slot.returning:
                task.cancel()
            while slot.idle:
                slot.idle.pop().session.abort()
        for task in list(self._closing):
            task.cancel()
