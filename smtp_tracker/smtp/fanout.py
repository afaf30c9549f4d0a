"""One downstream transaction relayed in step to the upstream and to each ``[[copies]]``.

:class:`Fanout` is what a downstream session holds: the upstream side
(:class:`~.failover.FailoverSession`, over the ordered upstream list) and one
connection per copy.  MAIL, each RCPT and DATA go to all of them at once
(each on a task of its own, all awaited), and the reply the client hears is:

- the upstream's, when the upstream did not say 2xx;
- ``451 4.4.1`` / ``451 4.4.0`` when the upstream said 2xx but a *required*
  copy did not (or could not be reached): the client keeps the message and
  retries, and nothing is lost to either side.  The upstream may then hold a
  message the client will send again: duplicates are possible on retry, never
  a loss;
- the upstream's, when only an *optional* copy failed: that copy is dropped
  from the transaction, the failure logged and counted (``UpstreamHealth.failed``).

A copy that is down (see :class:`~.failover.Upstreams`) is not tried until
its probe says it is back: a required one defers at once, an optional one is
skipped and counted.  A copy may receive a recipient the upstream refused
(the commands go out together); it never receives a message the upstream
refused at MAIL.  An ``untracked`` copy receives the message as received
(with our ``Received:``), not the rewritten one.

Copies take their connections from the pool at MAIL and give them back as
the upstream's are (:mod:`.pool`); with pooling off (``upstream_pool_size =
0``) each downstream session keeps its own connections between its
transactions and closes them at its end, as before pooling.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from smtp_tracker.errors import CommandRejected, SMTPReply, UpstreamError
from smtp_tracker.smtp import replies
from smtp_tracker.smtp.failover import CopyTarget, FailoverSession, Upstreams
from smtp_tracker.smtp.pool import ConnectionPool
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.transcript import Transcript
from smtp_tracker.smtp.upstream import UpstreamSession

__all__ = ["Fanout"]

log = logging.getLogger("smtp_tracker.relay")

_T = TypeVar("_T")
_U = TypeVar("_U")


async def _together(first: Awaitable[_T], others: Iterable[Awaitable[_U]]) -> tuple[_T, list[_U]]:
    """Run ``first`` and ``others`` at once and wait for all of them.

    Every one runs to its end before an exception is raised (the first's before
    the others'), so no connection is left in the middle of a command.  Without
    others, ``first`` runs in the caller's task, as if awaited alone.
    """
    pending = list(others)
    if not pending:
        return await first, []
    head = asyncio.ensure_future(first)
    tail = [asyncio.ensure_future(other) for other in pending]
    try:
        await asyncio.wait([head, *tail])
    finally:
        for task in (head, *tail):
            if not task.done():
                task.cancel()
    for task in tail:
        if task.exception() is not None and head.exception() is None:
            raise task.exception()  # type: ignore[misc]
    return head.result(), [task.result() for task in tail]


@dataclass(slots=True)
class _Copy:
    """A copy's part in the transaction in progress, and its connection while it lasts."""

    target: CopyTarget
    session: UpstreamSession | None = None
    active: bool = False
    recipients: int = 0

    def take(self) -> UpstreamSession | None:
        """The connection, no longer the copy's; the copy is out of the transaction."""
        session, self.session = self.session, None
        self.active = False
        return session


class Fanout:
    """The upstream (with failover) and the copies of one downstream session.

    Not safe for concurrent use: one downstream session drives it, one command at a time.

    :param upstreams: the application's upstream list and copies.
    :param transcript: the session's transcript (capture), for the upstream side.
    """

    def __init__(self, upstreams: Upstreams, transcript: Transcript | None = None) -> None:
        self._upstreams = upstreams
        #: the session's own pool when pooling is off: its connections, kept for its
        #: next transaction as before pooling, and closed with it
        self._own_pool: ConnectionPool | None = None
        self._pool = upstreams.pool
        if not self._pool.enabled:
            self._pool = self._own_pool = ConnectionPool(
                1, None, check_after_s=math.inf, reset_on_return=False
            )
        self.primary = FailoverSession(upstreams, transcript, self._pool)
        self._copies = [_Copy(target) for target in upstreams.copy_targets]
        self._queue_id = "-"

    @property
    def label(self) -> str:
        """``host:port`` of the upstream in use (``relay=``)."""
        return self.primary.label

    @property
    def extensions(self) -> dict[str, str]:
        """The EHLO keywords of the upstream in use."""
        return self.primary.extensions

    def _copy_failed(self, copy: _Copy, stage: str, reply: SMTPReply, *, down: bool) -> None:
        copy.active = False
        health = copy.target.health
        if down:
            self._upstreams.mark_failed(health, str(reply))
        else:
            health.failed += 1
        log.warning(
            "%s: %s copy %s: %s failed (%s)%s",
            self._queue_id,
            "required" if copy.target.required else "optional",
            copy.target.label,
            stage,
            reply,
            "" if copy.target.required else "; relayed without this copy",
        )

    # -- MAIL -----------------------------------------------------------------------

    async def _copy_mail(
        self, copy: _Copy, reverse_path: str, parameters: Sequence[str], smtputf8: bool
    ) -> None:
        health = copy.target.health
        self._end_copy(copy)  # left by a transaction that did not end cleanly
        copy.recipients = 0
        if not health.up:
            self._copy_failed(copy, "MAIL", replies.R451_COPY_UNAVAILABLE, down=False)
            return
        fresh = False
        while True:
            try:
                session, reused = await self._pool.acquire(health.settings, fresh=fresh)
            except UpstreamError as exc:
                self._copy_failed(copy, "MAIL", exc.reply, down=True)
                return
            if smtputf8 and "smtputf8" not in session.extensions:
                self._pool.release(session, reset=False)
                self._copy_failed(
                    copy, "MAIL", replies.R451_UPSTREAM_SMTPUTF8_UNSUPPORTED, down=False
                )
                return
            try:
                reply = await session.mail(reverse_path, parameters)
            except UpstreamError as exc:
                session.abort()
                if reused:  # a kept connection found dead: a new one, once
                    fresh = True
                    continue
                self._copy_failed(copy, "MAIL", exc.reply, down=True)
                return
            except CommandRejected as exc:
                self._pool.release(session, reset=False)
                self._copy_failed(copy, "MAIL", exc.reply, down=False)
                return
            except BaseException:
                session.abort()
                raise
            if reply.code == 421:
                session.abort()
                if reused:
                    fresh = True
                    continue
            break
        if not reply.is_positive:
            if reply.code != 421:
                self._pool.release(session, reset=True)
            self._copy_failed(copy, "MAIL", reply, down=reply.code == 421)
            return
        self._upstreams.mark_ok(health)
        copy.session = session
        copy.active = True

    def _end_copy(self, copy: _Copy) -> None:
        """Close the copy's connection, if it holds one: its transaction did not end cleanly."""
        session = copy.take()
        if session is not None:
            session.abort()

    async def _reset_copy(self, copy: _Copy) -> None:
        """RSET the copy's transaction; its connection goes back to the pool on 250."""
        session = copy.take()
        if session is not None:
            await self._pool.reset(session)

    async def mail(
        self, reverse_path: str, parameters: Sequence[str], *, smtputf8: bool, queue_id: str = "-"
    ) -> Reply:
        """MAIL FROM to the upstream (with failover) and to every copy, at once.

        :param queue_id: the transaction's id, for the log.
        :returns: the reply to give the client (see the module docstring).
        :raises CommandRejected: an argument the upstream client cannot send.
        """
        self._queue_id = queue_id
        try:
            primary, _ = await _together(
                self.primary.mail(reverse_path, parameters, smtputf8=smtputf8),
                (self._copy_mail(c, reverse_path, parameters, smtputf8) for c in self._copies),
            )
        except CommandRejected:
            await self._reset_copies()
            raise
        if not primary.is_positive:
            await self._reset_copies()
            return primary
        if any(c.target.required and not c.active for c in self._copies):
            await self.rset()
            return replies.R451_COPY_UNAVAILABLE
        return primary

    # -- RCPT -----------------------------------------------------------------------

    async def _copy_rcpt(self, copy: _Copy, forward_path: str, parameters: Sequence[str]) -> bool:
        """RCPT on one copy; whether the copy accepted the recipient."""
        if not copy.active or copy.session is None:
            return False
        try:
            reply = await copy.session.rcpt(forward_path, parameters)
        except UpstreamError as exc:
            self._end_copy(copy)
            self._copy_failed(copy, "RCPT", exc.reply, down=True)
            return False
        except CommandRejected:  # nothing was sent: this recipient alone, as upstream
            return False
        if reply.is_positive:
            copy.recipients += 1
            return True
        if copy.target.required:
            log.warning(
                "%s: required copy %s refused <%s> (%s)",
                self._queue_id,
                copy.target.label,
                forward_path,
                reply,
            )
        return False

    async def rcpt(self, forward_path: str, parameters: Sequence[str]) -> Reply:
        """RCPT TO to the upstream and every copy in the transaction, at once.

        :returns: the upstream's reply, or ``451 4.4.0`` when a required copy did
            not accept a recipient the upstream accepted (or was lost).
        :raises UpstreamError: the upstream connection was lost (4xx).
        :raises CommandRejected: an argument the upstream client cannot send.
        """
        active = [c for c in self._copies if c.active]
        try:
            primary, accepted_by = await _together(
                self.primary.rcpt(forward_path, parameters),
                (self._copy_rcpt(c, forward_path, parameters) for c in active),
            )
        except UpstreamError:
            # the upstream's connection is lost: the transaction is over for the
            # copies too, so that their next MAIL is not a nested one
            await self._reset_copies()
            raise
        if any(c.target.required and not c.active for c in self._copies):
            # a required copy lost its connection: the transaction cannot be had
            # by it any more; end it everywhere, and every later command gets 4xx
            await self.rset()
            raise UpstreamError(replies.R451_COPY_FAILED)
        if not primary.is_positive:
            return primary
        for copy, accepted in zip(active, accepted_by, strict=True):
            if copy.target.required and not accepted:
                return replies.R451_COPY_FAILED
        return primary

    # -- DATA -----------------------------------------------------------------------

    async def _copy_data(self, copy: _Copy, content: bytes, head: bytes) -> bool:
        """DATA on one copy; whether it said 2xx.  Its transaction ends either way."""
        session = copy.session
        if not copy.active or session is None:
            return False
        if copy.recipients == 0:  # it refused every recipient: nothing to send it
            await self._reset_copy(copy)
            self._copy_failed(copy, "RCPT", replies.R451_COPY_FAILED, down=False)
            return False
        try:
            reply = await session.data(content, head=head)
        except UpstreamError as exc:
            self._end_copy(copy)
            self._copy_failed(copy, "DATA", exc.reply, down=True)
            return False
        except BaseException:
            self._end_copy(copy)
            raise
        if copy.take() is session:
            self._pool.release(session, reset=True)
        if not reply.is_positive:
            self._copy_failed(copy, "DATA", reply, down=False)
            return False
        copy.target.health.carried += 1
        return True

    async def data(self, content: bytes, received: bytes, *, head: bytes = b"") -> Reply:
        """The message to the upstream and every copy in the transaction, at once.

        :param content: the message as the upstream receives it (rewritten).
        :param received: the message as received, for ``untracked`` copies.
        :param head: header fields sent before either (our trace field).
        :returns: the upstream's reply, or ``451 4.4.0`` when the upstream said 2xx
            but a required copy did not (the upstream has the message: a retry
            may deliver it twice there).
        :raises UpstreamError: the upstream connection was lost (4xx).
        """
        active = [c for c in self._copies if c.active]
        primary, delivered_by = await _together(
            self.primary.data(content, head=head),
            (self._copy_data(c, received if c.target.untracked else content, head) for c in active),
        )
        if not primary.is_positive:
            return primary
        for copy, delivered in zip(active, delivered_by, strict=True):
            if copy.target.required and not delivered:
                log.warning(
                    "%s: the upstream accepted the message but required copy %s did not: "
                    "deferring; the client's retry may deliver it twice upstream",
                    self._queue_id,
                    copy.target.label,
                )
                return replies.R451_COPY_FAILED
        return primary

    # -- ends -----------------------------------------------------------------------

    async def _reset_copies(self) -> None:
        active = [c for c in self._copies if c.session is not None]
        await asyncio.gather(*(self._reset_copy(c) for c in active))

    async def rset(self) -> None:
        """Abort the transaction on the upstream and on every copy (RFC 5321 §4.1.1.5)."""
        await asyncio.gather(self.primary.rset(), self._reset_copies())

    async def close(self) -> None:
        """QUIT and close every connection of a transaction in progress, one after the
        other, and the session's own kept ones (pooling off); never raises.

        In the caller's task: a client that hangs up right after its QUIT cancels
        it, and each connection not closed by then is closed without QUIT.
        """
        try:
            await self.primary.close()
            for copy in self._copies:
                session = copy.take()
                if session is not None:
                    await session.close()
            if self._own_pool is not None:
                await self._own_pool.close()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close every connection at once, without QUIT; never raises."""
        self.primary.abort()
        for copy in self._copies:
            self._end_copy(copy)
        if self._own_pool is not None:
            self._own_pool.abort()
