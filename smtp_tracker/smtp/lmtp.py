"""The LMTP listener: one delivery from Postfix, one copy, pixel and record per recipient.

LMTP (RFC 2033) is SMTP with ``LHLO`` for ``EHLO`` and, after the end of data,
one reply per accepted recipient, in the order of the RCPT commands (§4.2).
Postfix's ``lmtp`` client delivers a message to many recipients in one
transaction and bounces, defers or completes each recipient by its own reply.

:class:`LmtpSMTP` is :class:`~.server.RelaySMTP` speaking LMTP.
:class:`LmtpHandler` answers MAIL and each RCPT itself (after the syntax and
limit checks of :mod:`.server`: no upstream is asked before DATA), then, for
each recipient, makes a transaction of its own: a new queue id, the rewrite
with its own tracking id (so its own pixel and link tokens), the relay to the
upstream (with failover and copies, :class:`~.fanout.Fanout`) as MAIL, that
one RCPT with its own DSN parameters (NOTIFY, ORCPT), DATA, and the record.
Its LMTP reply is its upstream's reply: a 5xx is bounced by Postfix for that
recipient alone, a 4xx deferred and retried for it alone; a recipient already
accepted upstream is never sent again.  Up to ``lmtp_parallel_copies``
recipients are relayed at once, each on a connection of its own, kept for the
session's next delivery; the replies are written as soon as they are known,
in RCPT order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiosmtpd.smtp import Envelope, syntax

from smtp_tracker.errors import CommandRejected, SMTPReply, UpstreamError
from smtp_tracker.smtp import replies
from smtp_tracker.smtp.capture import CaptureWriter
from smtp_tracker.smtp.failover import Upstreams
from smtp_tracker.smtp.fanout import Fanout
from smtp_tracker.smtp.handler import (
    DeliveryRecorder,
    MessagePreparer,
    RelayHandler,
    tracking_text,
)
from smtp_tracker.smtp.parameters import MailParameters
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.server import RelaySMTP
from smtp_tracker.smtp.session import Recipient, RelaySession, Transaction

__all__ = ["LmtpHandler", "LmtpSMTP"]

log = logging.getLogger("smtp_tracker.relay")


class LmtpSMTP(RelaySMTP):
    """:class:`~.server.RelaySMTP` speaking LMTP: ``LHLO``; ``EHLO`` and ``HELO`` refused.

    RFC 2033 §4.1: LHLO replaces EHLO, and the server must not accept HELO or EHLO.
    """

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        """RFC 2033 §4.1: the LMTP greeting, answered as EHLO is."""
        await super().smtp_EHLO(arg)

    async def smtp_EHLO(self, arg: str) -> None:
        """Not an LMTP command (RFC 2033 §4.1)."""
        await self.push(replies.R500_UNRECOGNIZED)

    async def smtp_HELO(self, arg: str) -> None:
        """Not an LMTP command (RFC 2033 §4.1)."""
        await self.push(replies.R500_UNRECOGNIZED)


class LmtpHandler(RelayHandler):
    """The LMTP listener's handler: local MAIL and RCPT, then one transaction per recipient.

    :param parallel: recipients of one delivery relayed at once (``lmtp_parallel_copies``).

    The other parameters are :class:`~.handler.RelayHandler`'s.
    """

    def __init__(
        self,
        *,
        upstream: Upstreams,
        hostname: str,
        parallel: int = 4,
        max_recipients: int = 1000,
        add_received_header: bool = True,
        preparer: MessagePreparer | None = None,
        recorder: DeliveryRecorder | None = None,
        capture: CaptureWriter | None = None,
    ) -> None:
        super().__init__(
            upstream=upstream,
            hostname=hostname,
            max_recipients=max_recipients,
            add_received_header=add_received_header,
            preparer=preparer,
            recorder=recorder,
            capture=capture,
        )
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self._parallel = parallel
        self.counters["recipients"] = 0

    async def mail(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        reverse_path: str,
        parameters: MailParameters,
    ) -> SMTPReply:
        """MAIL FROM, accepted here: the upstream is asked per recipient after DATA."""
        transaction = Transaction(reverse_path, parameters.raw, parameters.smtputf8)
        envelope.mail_from = reverse_path
        envelope.mail_options = list(parameters.raw)
        session.transaction = transaction
        self._begin()
        return replies.R250_SENDER_OK

    async def rcpt(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        forward_path: str,
        parameters: tuple[str, ...],
    ) -> SMTPReply:
        """RCPT TO, accepted here after the limit check (RFC 2033 §4.2: its real
        reply comes after DATA)."""
        transaction = session.transaction
        if transaction is None:
            return replies.R503_NEED_MAIL
        if len(transaction.accepted) >= self._max_recipients:
            return replies.R452_TOO_MANY_RECIPIENTS
        transaction.accepted.append(Recipient(forward_path, parameters, replies.R250_RECIPIENT_OK))
        envelope.rcpt_tos.append(forward_path)
        envelope.rcpt_options.extend(parameters)
        return replies.R250_RECIPIENT_OK

    async def handle_DATA(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope
    ) -> str:
        """One transaction upstream per recipient; one reply per recipient, in RCPT order.

        All replies but the last are written here as soon as they and those
        before them are known; the last is returned for aiosmtpd to write.
        """
        transaction = session.transaction
        content = envelope.original_content
        if transaction is None or not transaction.accepted or content is None:
            return str(replies.R503_NEED_RCPT)
        message = self._with_crlf(content, transaction)
        recipients = list(transaction.accepted)
        settings = self._settings
        rounds = -(-len(recipients) // self._parallel)
        per_copy = self._failover_s() + settings.command_timeout_s + settings.data_timeout_s
        server.extend_timeout(per_copy * rounds + 30)
        loop = asyncio.get_running_loop()
        results: list[asyncio.Future[Reply]] = [loop.create_future() for _ in recipients]
        workers = [
            loop.create_task(
                self._worker(
                    server, session, transaction, recipients, message, len(content), number, results
                )
            )
            for number in range(min(self._parallel, len(recipients)))
        ]
        try:
            for future in results[:-1]:
                # shielded: the client hanging up cancels this task, which must
                # not cancel the recipients' results (their workers go on)
                await server.push(await asyncio.shield(future))
            last = await asyncio.shield(results[-1])
            await asyncio.gather(*workers)
        except asyncio.CancelledError:
            # The client is gone: recipients not begun are not relayed (their
            # replies could not reach it), those in flight finish; drain() waits.
            for worker in workers:
                if not worker.done():
                    self._disconnects.add(worker)
                    worker.add_done_callback(self._disconnects.discard)
            raise
        self._finish_delivery(session, transaction, [f.result() for f in results if f.done()])
        return str(last)

    async def _worker(
        self,
        server: RelaySMTP,
        session: RelaySession,
        transaction: Transaction,
        recipients: Sequence[Recipient],
        message: bytes,
        size_bytes: int,
        number: int,
        results: list[asyncio.Future[Reply]],
    ) -> None:
        """Relay recipients ``number``, ``number + parallel``, ... on connection ``number``."""
        while len(session.pool) <= number:
            transcript = session.transcript if not session.pool else None
            session.pool.append(Fanout(self.upstreams, transcript))
        fanout = session.pool[number]
        for index in range(number, len(recipients), self._parallel):
            transport = server.transport
            if transport is None or transport.is_closing():  # its reply could not be given
                results[index].set_result(replies.R421_SHUTTING_DOWN)
                continue
            try:
                reply = await self._relay_one(
                    server, session, transaction, recipients[index], message, size_bytes, fanout
                )
            except Exception:  # never leave a recipient without a reply
                log.exception(
                    "%s: relaying to <%s> failed", transaction.queue_id, recipients[index].address
                )
                await fanout.close()
                reply = replies.R451_INTERNAL_ERROR
            results[index].set_result(reply)

    async def _relay_one(
        self,
        server: RelaySMTP,
        session: RelaySession,
        parent: Transaction,
        recipient: Recipient,
        message: bytes,
        size_bytes: int,
        fanout: Fanout,
    ) -> Reply:
        """One recipient's copy: rewrite (own tracking id), MAIL, RCPT, DATA, record."""
        copy = Transaction(parent.reverse_path, parent.parameters, parent.smtputf8)
        copy.received_at = parent.received_at
        copy.accepted.append(recipient)
        prepared = await self._preparer.prepare(message, copy)
        data = prepared.data
        trace = self._received(server, session, copy) if self._add_received else b""
        reply: Reply
        try:
            reply = await fanout.mail(
                copy.reverse_path, copy.parameters, smtputf8=copy.smtputf8, queue_id=copy.queue_id
            )
            self.counters["upstream_failures"] += fanout.primary.failed_attempts
            if reply.is_positive:
                reply = await fanout.rcpt(recipient.address, recipient.parameters)
                if reply.is_positive:
                    reply = await fanout.data(data, message, head=trace)
                else:
                    await fanout.rset()
        except UpstreamError as exc:
            self.counters["upstream_failures"] += 1
            reply = Reply.of(exc.reply)
        except CommandRejected as exc:
            await fanout.rset()
            reply = Reply.of(exc.reply)
        if reply.is_positive and self._recorder is not None:
            await self._recorder.record(copy, prepared, reply, size_bytes)
        status = {2: "sent", 4: "deferred"}.get(reply.code // 100, "bounced")
        self.counters[{"sent": "relayed", "deferred": "deferred"}.get(status, "rejected")] += 1
        self.counters["recipients"] += 1
        tracking = tracking_text(prepared)
        log.info(
            "%s: lmtp=%s, from=<%s>, to=<%s>, size=%d, relay=%s, delay=%.2f%s, status=%s (%s)",
            copy.queue_id,
            parent.queue_id,
            copy.reverse_path,
            recipient.address,
            size_bytes,
            fanout.label,
            parent.delay_s,
            tracking,
            status,
            reply,
        )
        return reply

    def _finish_delivery(
        self, session: RelaySession, transaction: Transaction, results: Sequence[Reply]
    ) -> None:
        """End the LMTP transaction (its recipients were counted one by one)."""
        if session.transaction is transaction:
            session.transaction = None
        if self._end(transaction):
            session.transactions += 1
        worst = max(results, key=lambda r: (r.code // 100 != 2, r.code), default=None)
        self._maybe_capture(session, transaction, worst, None, None)

    async def close_session(self, session: RelaySession, *, quit_upstream: bool = True) -> None:
        """End the transaction, if any, and close every upstream connection of the session."""
        pool, session.pool = session.pool, []
        await super().close_session(session, quit_upstream=quit_upstream)
        await _close_all(pool, quit_upstream=quit_upstream)

    async def handle_QUIT(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope
    ) -> str:
        pool, session.pool = session.pool, []
        await _close_all(pool, quit_upstream=True)
        return await super().handle_QUIT(server, session, envelope)


async def _close_all(pool: Sequence[Fanout], *, quit_upstream: bool) -> None:
    """Close each connection of ``pool`` (QUIT first when ``quit_upstream``), in this
    task: those not closed when it is cancelled are closed without QUIT."""
    try:
        if quit_upstream:
            for fanout in pool:
                await fanout.close()
    finally:
        for fanout in pool:
            fanout.abort()
