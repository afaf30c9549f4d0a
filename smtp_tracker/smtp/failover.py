"""Failover between upstreams: an ordered list, each with its health.

:class:`Upstreams` is the application's list of upstreams (``upstream = [...]``)
and of in-step copies (``[[copies]]``), each with an :class:`UpstreamHealth`.
A transaction goes to the first upstream that is up; one that fails before
it accepted MAIL (refused, timed out, TLS, a 4xx greeting or EHLO reply, AUTH
refused, 421 to MAIL) is marked down and the transaction moves on to the
next, in the same downstream transaction (:class:`FailoverSession`).  A down
upstream is skipped for ``upstream_retry_s``, doubling while it keeps failing
up to :data:`MAX_RETRY_S`; a probe (connect, EHLO, STARTTLS and AUTH as
configured, QUIT) then decides whether it is back.  When every upstream is
down, each is tried anyway, in order: the mail has nowhere else to go.

After MAIL was accepted upstream, a failure is the downstream's ``4xx`` as
before: the client retries, and its retry may go to another upstream.

Connections are taken from the application's :class:`~.pool.ConnectionPool`
at MAIL and given back when the transaction ended cleanly (see :mod:`.pool`).
A kept connection that turns out dead at MAIL (lost, or a 421) is not the
upstream's failure: the transaction is opened on a new connection to the same
upstream, and the client sees nothing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from smtp_tracker.errors import CommandRejected, UpstreamError
from smtp_tracker.smtp import replies
from smtp_tracker.smtp.pool import ConnectionPool
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.transcript import NOTE, Transcript
from smtp_tracker.smtp.upstream import UpstreamSession, UpstreamSettings

__all__ = [
    "MAX_RETRY_S",
    "CopyTarget",
    "FailoverSession",
    "UpstreamHealth",
    "Upstreams",
]

log = logging.getLogger("smtp_tracker.relay")

#: The longest a failing upstream is skipped between probes, in seconds (15 minutes).
MAX_RETRY_S = 900.0

Role = Literal["upstream", "copy"]


@dataclass(slots=True)
class UpstreamHealth:
    """One upstream (or copy) and what is known of its health.

    :ivar settings: how to reach it.
    :ivar role: ``"upstream"`` (in the failover list) or ``"copy"``.
    :ivar up: whether transactions go to it now.
    :ivar failures: failures in a row (0 when up).
    :ivar retry_at: the :func:`time.monotonic` time of the next probe, when down.
    :ivar carried: messages it accepted (2xx to DATA) since start.
    :ivar failed: transactions it failed since start (connection, TLS, AUTH, 421, 4xx).
    """

    settings: UpstreamSettings
    role: Role = "upstream"
    up: bool = True
    failures: int = 0
    retry_at: float = 0.0
    carried: int = 0
    failed: int = 0

    @property
    def label(self) -> str:
        """``host:port``, as in the logs (``relay=``)."""
        return self.settings.label


@dataclass(frozen=True, slots=True)
class CopyTarget:
    """A ``[[copies]]`` destination, relayed to in step with the upstream.

    :ivar health: the copy's settings and health (role ``"copy"``).
    :ivar required: the client hears 2xx only when this copy said 2xx too.
    :ivar untracked: the copy receives the message as received, without the pixel.
    """

    health: UpstreamHealth
    required: bool = False
    untracked: bool = False

    @property
    def label(self) -> str:
        """``host:port`` of the copy."""
        return self.health.label


@dataclass
class Upstreams:
    """The ordered upstream list and the copies, with their health; one per application.

    :param upstreams: in order of preference (at least one).
    :param copies: the in-step copies (each also probed when down).
    :param retry_s: seconds a failed upstream is skipped at first (``upstream_retry_s``);
        doubled at each further failure, up to :data:`MAX_RETRY_S`.
    :param pool_size: connections kept per upstream and copy between transactions
        (``upstream_pool_size``); 0: none, each downstream session opens its own.
    :param idle_timeout_s: seconds a kept connection may stay unused
        (``upstream_idle_timeout_s``).
    :param clock: seconds, monotonic (tests may give their own).
    :raises ValueError: when ``upstreams`` is empty, ``retry_s`` or ``idle_timeout_s``
        is not positive, or ``pool_size`` is negative.
    """

    upstreams: Sequence[UpstreamSettings]
    copies: Sequence[tuple[UpstreamSettings, bool, bool]] = ()
    retry_s: float = 60.0
    pool_size: int = 0
    idle_timeout_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    health: list[UpstreamHealth] = field(init=False)
    copy_targets: list[CopyTarget] = field(init=False)
    #: the connections kept between transactions, shared by every downstream session
    pool: ConnectionPool = field(init=False)
    _probes: dict[int, asyncio.Task[None]] = field(init=False, default_factory=dict)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("at least one upstream is needed")
        if not self.retry_s > 0:
            raise ValueError(f"retry_s must be positive, got {self.retry_s}")
        self.pool = ConnectionPool(self.pool_size, self.idle_timeout_s)
        self.health = [UpstreamHealth(s) for s in self.upstreams]
        self.copy_targets = [
            CopyTarget(UpstreamHealth(s, role="copy"), required=required, untracked=untracked)
            for s, required, untracked in self.copies
        ]

    @property
    def first(self) -> UpstreamHealth:
        """The first upstream of the list."""
        return self.health[0]

    def all_health(self) -> list[UpstreamHealth]:
        """Every upstream, then every copy (for metrics and logs)."""
        return [*self.health, *(c.health for c in self.copy_targets)]

    def candidates(self) -> list[UpstreamHealth]:
        """The upstreams to try for a transaction, in order.

        Those up, in the configured order; when none is up, every one, in order
        (the mail has nowhere else to go, and a success marks it up again).
        """
        up = [h for h in self.health if h.up]
        return up or list(self.health)

    def backoff_s(self, failures: int) -> float:
        """Seconds skipped after ``failures`` failures in a row: ``retry_s`` doubling, capped."""
        return float(min(self.retry_s * 2 ** max(failures - 1, 0), MAX_RETRY_S))

    def mark_failed(self, health: UpstreamHealth, why: str) -> None:
        """``health`` failed a transaction: down, skipped for ``retry_s``, then probed.

        Failures of one already down (other sessions that were using it, or a
        last-resort attempt with every upstream down) are counted but do not
        lengthen the wait: only its probe's failures do, so a burst of sessions
        failing at once does not skip it for 15 minutes.

        :param why: a short reason for the log (a reply line of ours, never exception text).
        """
        health.failed += 1
        if not health.up:
            return
        health.up = False
        health.failures = 1
        delay = self.backoff_s(health.failures)
        health.retry_at = self.clock() + delay
        log.warning("%s %s is down (%s); skipped for %g s", health.role, health.label, why, delay)
        self._schedule_probe(health)

    def mark_ok(self, health: UpstreamHealth) -> None:
        """``health`` answered as it should: up again."""
        if not health.up:
            log.info("%s %s is up again", health.role, health.label)
        health.up = True
        health.failures = 0

    def _schedule_probe(self, health: UpstreamHealth) -> None:
        if self._closed:
            return
        key = id(health)
        task = self._probes.get(key)
        if task is not None and not task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test): the next candidates() decide
            return
        self._probes[key] = loop.create_task(self._probe_loop(health))

    async def _probe_loop(self, health: UpstreamHealth) -> None:
        """Probe ``health`` at its ``retry_at`` until it answers (connect, EHLO, ..., QUIT)."""
        while not health.up and not self._closed:
            await asyncio.sleep(max(health.retry_at - self.clock(), 0.0))
            if health.up:
                return
            session = UpstreamSession(health.settings)
            try:
                await session.ensure_open()
            except UpstreamError as exc:
                health.failures += 1
                delay = self.backoff_s(health.failures)
                health.retry_at = self.clock() + delay
                log.info(
                    "%s %s: probe failed (%s); next probe in %g s",
                    health.role,
                    health.label,
                    exc.reply,
                    delay,
                )
                continue
            finally:
                await session.close()
            self.mark_ok(health)

    async def close(self) -> None:
        """Stop the probes and close the kept connections with QUIT (at shutdown); never raises."""
        self._closed = True
        tasks = [t for t in self._probes.values() if not t.done()]
        self._probes.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pool.close()


def _failover_worthy(reply: Reply) -> bool:
    """A MAIL reply that says the upstream, not the sender, is the trouble: 4xx.

    421 (closing) and any other 4xx: another upstream may take it now.  A 5xx
    is the upstream's verdict on the sender, passed on as it is.
    """
    return reply.code // 100 == 4


class _Stale(enum.Enum):
    """:meth:`FailoverSession._try`'s answer for a kept connection found dead at MAIL."""

    STALE = "stale"


_STALE = _Stale.STALE


class FailoverSession:
    """The upstream side of one downstream session, over the :class:`Upstreams` list.

    At MAIL it takes a connection from the pool (or opens one) to the first
    upstream that is up, and moves to the next when one fails before it
    accepted MAIL; afterwards every command goes to the upstream that accepted
    MAIL.  The connection is given back to the pool when the transaction ended
    cleanly (the final reply to the message, or RSET answered 250), and closed
    otherwise.

    :param upstreams: the application's list.
    :param transcript: where the conversation is copied (capture), or None.
    :param pool: where connections come from and go back to (default: the
        application's, ``upstreams.pool``).
    """

    def __init__(
        self,
        upstreams: Upstreams,
        transcript: Transcript | None = None,
        pool: ConnectionPool | None = None,
    ) -> None:
        self._upstreams = upstreams
        self._transcript = transcript
        self._pool = pool if pool is not None else upstreams.pool
        #: the connection of the transaction in progress (None between transactions)
        self._session: UpstreamSession | None = None
        self._health: UpstreamHealth | None = None
        #: the reply of the last upstream passed over, given when none takes the mail
        self._last_reply: Reply | None = None
        #: upstreams that failed (connection, TLS, AUTH, 421) during the last :meth:`mail`
        self.failed_attempts = 0

    @property
    def health(self) -> UpstreamHealth:
        """The upstream in use, or the first of the list before any was used."""
        return self._health or self._upstreams.first

    @property
    def label(self) -> str:
        """``host:port`` of the upstream in use (``relay=`` in the log)."""
        return self.health.label

    def _note(self, text: str) -> None:
        if self._transcript is not None:
            self._transcript.add(NOTE, text)

    async def mail(self, reverse_path: str, parameters: Sequence[str], *, smtputf8: bool) -> Reply:
        """MAIL FROM on the first upstream that takes it; the reply to give.

        :param reverse_path: the address without angle brackets (``""`` for ``<>``).
        :param parameters: the MAIL parameters as the client sent them.
        :param smtputf8: the transaction needs SMTPUTF8 (RFC 6531): an upstream
            without it is passed over (451 4.6.7 when none has it).
        :raises CommandRejected: an argument the upstream client cannot send.
        """
        self.failed_attempts = 0
        # a connection left by a transaction that did not end cleanly: never reused
        self.abort()
        last: Reply | None = None
        for number, health in enumerate(self._upstreams.candidates()):
            if number:
                self._note(f"failing over to {health.label}")
            reply = await self._mail_on(health, reverse_path, parameters, smtputf8)
            if reply is not None:
                return reply
            last = last or self._last_reply
        return last or replies.R451_UPSTREAM_UNAVAILABLE

    async def _mail_on(
        self, health: UpstreamHealth, reverse_path: str, parameters: Sequence[str], smtputf8: bool
    ) -> Reply | None:
        """MAIL on a connection to ``health``: the reply to give, or None to try the next.

        A kept connection found dead at MAIL is replaced by a new one, once.
        """
        fresh = False
        while True:
            self._last_reply = None
            try:
                session, reused = await self._pool.acquire(
                    health.settings, self._transcript, fresh=fresh
                )
            except UpstreamError as exc:
                self.failed_attempts += 1
                self._upstreams.mark_failed(health, str(exc.reply))
                self._last_reply = Reply.of(exc.reply)
                return None
            reply = await self._try(health, session, reverse_path, parameters, smtputf8, reused)
            if not isinstance(reply, _Stale):
                return reply
            self._note(f"the kept connection to {health.label} is gone; opening a new one")
            fresh = True

    async def _try(
        self,
        health: UpstreamHealth,
        session: UpstreamSession,
        reverse_path: str,
        parameters: Sequence[str],
        smtputf8: bool,
        reused: bool,
    ) -> Reply | _Stale | None:
        """MAIL on an open ``session``: the reply to give, None to try the next
        upstream, or :data:`_STALE` when ``session`` was kept and is found dead.

        :param reused: the connection is an earlier transaction's: its loss or a
            421 on it does not mark the upstream down (a new one is opened).
        """
        if smtputf8 and "smtputf8" not in session.extensions:
            self._last_reply = replies.R451_UPSTREAM_SMTPUTF8_UNSUPPORTED
            self._pool.release(session, reset=False)  # nothing was sent on it
            return None
        try:
            reply = await session.mail(reverse_path, parameters)
        except UpstreamError as exc:
            session.abort()
            if reused:
                return _STALE
            self.failed_attempts += 1
            self._upstreams.mark_failed(health, str(exc.reply))
            self._last_reply = Reply.of(exc.reply)
            return None
        except CommandRejected:
            self._pool.release(session, reset=False)  # nothing was sent on it
            self._health = health
            raise
        except BaseException:  # cancelled (the client is gone, shutdown): state unknown
            session.abort()
            raise
        self._health = health
        if reply.code == 421:  # it is closing the connection
            session.abort()
            if reused:
                return _STALE
            self.failed_attempts += 1
            self._upstreams.mark_failed(health, str(reply))
            self._last_reply = reply.as_transient()
            return None
        if _failover_worthy(reply):  # another upstream may take it now
            self._last_reply = reply.as_transient()
            await session.close()
            return None
        if not reply.is_positive:  # the sender's verdict: no transaction was opened
            self._pool.release(session, reset=True)
            return reply
        self._upstreams.mark_ok(health)
        self._session = session
        return reply

    def _open(self) -> UpstreamSession:
        session = self._session
        if session is None:
            raise UpstreamError(replies.R451_UPSTREAM_LOST)
        return session

    @property
    def extensions(self) -> dict[str, str]:
        """The EHLO keywords of the upstream in use (empty when none is open)."""
        return self._session.extensions if self._session is not None else {}

    async def rcpt(self, forward_path: str, parameters: Sequence[str]) -> Reply:
        """RCPT TO on the upstream that accepted MAIL.

        :raises UpstreamError: the connection was lost or timed out (4xx).
        """
        return await self._open().rcpt(forward_path, parameters)

    async def data(self, content: bytes, *, head: bytes = b"") -> Reply:
        """The message (``head`` then ``content``) to the upstream that accepted MAIL;
        counts it as carried on 2xx.

        The final reply ends the transaction: the connection goes back to the
        pool (closed instead after a 421, or when it was lost).

        :raises UpstreamError: the connection was lost or timed out (4xx).
        """
        session = self._open()
        try:
            reply = await session.data(content, head=head)
        except BaseException:  # lost, timed out, cancelled: its state is unknown
            if self._session is session:
                self._session = None
                session.abort()
            raise
        if self._session is session:  # else closed meanwhile (the client is gone)
            self._session = None
            self._pool.release(session, reset=True)
        if reply.is_positive and self._health is not None:
            self._health.carried += 1
        return reply

    async def rset(self) -> None:
        """Abort the upstream transaction (RFC 5321 §4.1.1.5); the connection goes
        back to the pool when the upstream answered 250, else it is closed."""
        session, self._session = self._session, None
        if session is not None:
            await self._pool.reset(session)

    async def close(self) -> None:
        """QUIT and close the connection of a transaction in progress; never raises."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def abort(self) -> None:
        """Close the connection of a transaction in progress at once, without QUIT; never raises."""
        session, self._session = self._session, None
        if session is not None:
            session.abort()
