"""aiosmtpd handler hooks that relay each command to the upstream, in step.

The hooks are thin: they keep the transaction's state on the session and
delegate to :class:`~smtp_tracker.smtp.fanout.Fanout` (the upstream
conversation, with failover over the upstream list and the in-step copies),
a :class:`MessagePreparer` (the rewrite stage) and a
:class:`DeliveryRecorder` (the tracking store).  The rule they keep: the
downstream never hears 2xx for MAIL, RCPT or DATA unless the upstream (and
every required copy) said 2xx to the same command first (RFC 5321 §6.1: a
2xx to DATA takes responsibility for the message).

Bare CR and bare LF in a payload are rewritten to CRLF (:func:`.payload.normalize_line_endings`)
before the rewrite stage and the upstream see it, so that no upstream can read
one of them as the end of the data (SMTP smuggling; see :mod:`.server`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from aiosmtpd.smtp import Envelope

from smtp_tracker.errors import CommandRejected, SMTPReply, UpstreamError
from smtp_tracker.smtp import replies
from smtp_tracker.smtp.capture import Capture, CaptureWriter
from smtp_tracker.smtp.failover import Upstreams
from smtp_tracker.smtp.fanout import Fanout
from smtp_tracker.smtp.parameters import MailParameters
from smtp_tracker.smtp.payload import normalize_line_endings
from smtp_tracker.smtp.received import received_header
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.server import RelaySMTP
from smtp_tracker.smtp.session import Recipient, RelaySession, Transaction
from smtp_tracker.smtp.upstream import UpstreamSettings

__all__ = [
    "DeliveryRecorder",
    "MessagePreparer",
    "Prepared",
    "RefusalRecorder",
    "RelayHandler",
    "tracking_text",
]

log = logging.getLogger("smtp_tracker.relay")


def tracking_text(prepared: Prepared | None) -> str:
    """The log line's tracking part: ``, tracked=yes`` or ``, tracked=no (REASON)``,
    then ``, dkim=OUTCOME`` when the message was signed; empty when the stage did
    not look at the message (no tracking id)."""
    if prepared is None or prepared.tracking_id is None:
        return ""
    text = ", tracked=yes" if prepared.tracked else f", tracked=no ({prepared.reason or 'unknown'})"
    if prepared.dkim is not None:
        text += f", dkim={prepared.dkim}"
    return text


@dataclass(frozen=True, slots=True)
class Prepared:
    """The message as it will be sent upstream, and what the rewrite stage decided.

    :ivar data: the bytes to send (without our trace header, which the handler adds).
    :ivar tracking_id: the id the store will know this message by.
    :ivar tracked: whether a pixel was added.
    :ivar reason: why not, when not tracked (e.g. ``"multipart-signed"``).
    :ivar dkim: what became of its DKIM signatures (``"resigned"``, or why it was
        relayed as received, e.g. ``"dkim-foreign"``); None when none was looked at.
    """

    data: bytes
    tracking_id: str | None = None
    tracked: bool = False
    reason: str | None = None
    dkim: str | None = None


class MessagePreparer(Protocol):
    """The rewrite stage between DATA received and DATA sent."""

    async def prepare(self, content: bytes, transaction: Transaction) -> Prepared:
        """Return what to send upstream. Must not raise: fail open to ``content``."""
        ...


class DeliveryRecorder(Protocol):
    """Where a transaction the upstream accepted is recorded."""

    async def record(
        self, transaction: Transaction, prepared: Prepared, reply: Reply, size_bytes: int
    ) -> None:
        """Record a relayed message. Must not raise: the mail is already accepted.

        :param size_bytes: the message as received from the client, in bytes.
        """
        ...


class RefusalRecorder(Protocol):
    """Told of each message refused at the end of data, 4xx or 5xx (the webhook events)."""

    def refused(self, transaction: Transaction, reply: SMTPReply, sent: bytes) -> None:
        """Note the refusal; must neither raise nor wait: the reply is on its way.

        :param sent: the message as it was sent upstream.
        """
        ...


class _Identity:
    async def prepare(self, content: bytes, transaction: Transaction) -> Prepared:
        return Prepared(content, reason="tracking-off")


class RelayHandler:
    """The aiosmtpd handler: one instance serves every downstream session.

    :param upstream: how to reach the smarthost: one, or the ordered list with its
        health and copies (:class:`~smtp_tracker.smtp.failover.Upstreams`).
    :param hostname: our name, for the trace header.
    :param max_recipients: RCPTs accepted per transaction (RFC 5321 §4.5.3.1.8 says
        at least 100 must be allowed).
    :param add_received_header: prepend a ``Received:`` field (RFC 5321 §4.4).
    :param preparer: the rewrite stage (identity when None).
    :param recorder: the store for relayed messages (none when None).
    :param capture: the debug capture writer.
    """

    #: told of messages refused at the end of data (none: nobody)
    refusals: RefusalRecorder | None = None

    def __init__(
        self,
        *,
        upstream: UpstreamSettings | Upstreams,
        hostname: str,
        max_recipients: int = 1000,
        add_received_header: bool = True,
        preparer: MessagePreparer | None = None,
        recorder: DeliveryRecorder | None = None,
        capture: CaptureWriter | None = None,
    ) -> None:
        #: the upstream list, its copies and their health
        self.upstreams = upstream if isinstance(upstream, Upstreams) else Upstreams([upstream])
        self._settings = self.upstreams.first.settings
        self._hostname = hostname
        self._max_recipients = max_recipients
        self._add_received = add_received_header
        self._preparer: MessagePreparer = preparer or _Identity()
        self._recorder = recorder
        self._capture = capture
        self._disconnects: set[asyncio.Task[None]] = set()
        self._records: set[asyncio.Task[None]] = set()
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.counters: dict[str, int] = {
            "relayed": 0,
            "deferred": 0,
            "rejected": 0,
            "aborted": 0,
            "upstream_failures": 0,
            "bare_line_endings": 0,
        }

    @property
    def active_transactions(self) -> int:
        """Transactions between an accepted MAIL and their end (DATA reply, RSET, drop),
        and records of relayed messages still being written."""
        return self._active

    def _begin(self) -> None:
        self._active += 1
        self._idle.clear()

    def _release(self) -> None:
        """Undo one :meth:`_begin`; the last one out sets the idle event."""
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    def _end(self, transaction: Transaction) -> bool:
        """Count ``transaction`` as ended; False, and nothing counted, if it was already.

        At shutdown ``close_session`` may end a transaction whose DATA hook is
        still waiting on the upstream and ends it again when that wait fails.
        """
        if transaction.ended:
            return False
        transaction.ended = True
        self._release()
        return True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no transaction is in flight; False if ``timeout_s`` passed first."""
        if self._idle.is_set():  # wait_for(..., 0) would time out even then
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # -- hooks that aiosmtpd calls by name ------------------------------------------

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Advertise what we relay: PIPELINING, ENHANCEDSTATUSCODES, DSN; never AUTH."""
        session.host_name = hostname
        await self.abort_transaction(session, reason="EHLO")
        kept = [r for r in responses[:-1] if not r[4:].upper().startswith("AUTH")]
        kept += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN", responses[-1]]
        return kept

    async def handle_HELO(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        await self.abort_transaction(session, reason="HELO")
        return f"250 {server.hostname}"

    async def handle_NOOP(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope, arg: str
    ) -> str:
        return str(replies.R250_OK)

    async def handle_RSET(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope
    ) -> str:
        await self.abort_transaction(session, reason="RSET")
        return str(replies.R250_OK)

    async def handle_QUIT(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope
    ) -> str:
        await self.abort_transaction(session, reason="QUIT")
        await self._close_upstream(session)
        return str(replies.R221_BYE)

    async def handle_DATA(
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope
    ) -> str:
        transaction = session.transaction
        content = envelope.original_content
        if transaction is None or not transaction.accepted or content is None:
            return str(replies.R503_NEED_RCPT)
        if transaction.broken is not None:
            self._finish(session, transaction, transaction.broken.reply, content, None)
            return str(transaction.broken.reply)
        received = content
        content = self._with_crlf(received, transaction)
        upstream = self._upstream(session)
        server.extend_timeout(self._settings.data_timeout_s + 30)
        prepared = await self._preparer.prepare(content, transaction)
        data = prepared.data
        # sent as a head, not joined: trace + data would be a whole copy (issue 15)
        trace = self._received(server, session, transaction) if self._add_received else b""
        try:
            reply = await upstream.data(data, content, head=trace)
        except UpstreamError as exc:
            self.counters["upstream_failures"] += 1
            self._finish(session, transaction, exc.reply, received, data, head=trace)
            return str(exc.reply)
        if reply.is_positive and self._recorder is not None:
            # Written after the reply, not before: the upstream has the message, and
            # a record that fails fails open.  The session's next command waits for
            # it (see settle), so a client that saw its QUIT or next MAIL answered
            # finds the message in the store; the shutdown waits for it (drain).
            session.recording = self._start_record(
                self._recorder.record(transaction, prepared, reply, len(received))
            )
        self._finish(session, transaction, reply, received, data, prepared=prepared, head=trace)
        return str(reply)

    def _start_record(self, record: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``record`` in a task counted as in flight until it ends (wait_idle)."""
        self._begin()
        task = asyncio.get_running_loop().create_task(record)
        self._records.add(task)
        task.add_done_callback(self._record_done)
        return task

    def _record_done(self, task: asyncio.Task[None]) -> None:
        self._records.discard(task)
        self._release()
        if not task.cancelled() and task.exception() is not None:  # record() must not raise
            log.error("recording a relayed message failed", exc_info=task.exception())

    async def settle(self, session: RelaySession) -> None:
        """Wait for the record of the session's last message (before its next command).

        Shielded: a client that goes away while waiting does not cancel the record.
        """
        recording, session.recording = session.recording, None
        if recording is not None and not recording.done():
            await asyncio.shield(recording)

    def _with_crlf(self, content: bytes, transaction: Transaction) -> bytes:
        """``content`` with bare CR and LF made CRLF (counted and logged), else ``content``."""
        normalized = normalize_line_endings(content)
        if normalized is None:
            return content
        self.counters["bare_line_endings"] += 1
        log.warning(
            "%s: bare CR or LF in the message; relayed with CRLF line ends (RFC 5321 §2.3.8)",
            transaction.queue_id,
        )
        return normalized

    # -- MAIL and RCPT, called by RelaySMTP with parsed parameters ------------------

    async def mail(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        reverse_path: str,
        parameters: MailParameters,
    ) -> SMTPReply:
        """Open the upstream if needed and forward MAIL FROM; return the reply to give."""
        transaction = Transaction(reverse_path, parameters.raw, parameters.smtputf8)
        upstream = self._upstream(session)
        server.extend_timeout(self._failover_s() + 30)
        reply: SMTPReply
        try:
            reply = await upstream.mail(
                reverse_path,
                parameters.raw,
                smtputf8=parameters.smtputf8,
                queue_id=transaction.queue_id,
            )
        except UpstreamError as exc:
            reply = exc.reply
        except CommandRejected as exc:  # an argument the upstream client cannot send
            reply = exc.reply
        self.counters["upstream_failures"] += upstream.primary.failed_attempts
        if not reply.is_positive:
            self._log_rejected(transaction, None, reply, upstream.label)
            self._maybe_capture(session, transaction, reply, None, None)
            return reply
        envelope.mail_from = reverse_path
        envelope.mail_options = list(parameters.raw)
        session.transaction = transaction
        self._begin()
        return reply

    async def rcpt(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        forward_path: str,
        parameters: tuple[str, ...],
    ) -> SMTPReply:
        """Forward RCPT TO; only a recipient the upstream accepted joins the envelope."""
        transaction = session.transaction
        if transaction is None:
            return replies.R503_NEED_MAIL
        if transaction.broken is not None:
            return transaction.broken.reply
        if len(transaction.accepted) >= self._max_recipients:
            return replies.R452_TOO_MANY_RECIPIENTS
        server.extend_timeout(self._settings.command_timeout_s + 30)
        try:
            reply = await self._upstream(session).rcpt(forward_path, parameters)
        except UpstreamError as exc:
            self.counters["upstream_failures"] += 1
            transaction.broken = exc
            return exc.reply
        except CommandRejected as exc:  # this recipient alone; the transaction goes on
            return exc.reply
        recipient = Recipient(forward_path, parameters, reply)
        if reply.is_positive:
            transaction.accepted.append(recipient)
            envelope.rcpt_tos.append(forward_path)
            envelope.rcpt_options.extend(parameters)
        else:
            transaction.refused.append(recipient)
            self._log_rejected(transaction, forward_path, reply, self._upstream(session).label)
        return reply

    # -- session life -----------------------------------------------------------------

    async def abort_transaction(
        self, session: RelaySession, *, reason: str, reset_upstream: bool = True
    ) -> None:
        """End an unfinished transaction (RSET, EHLO, QUIT, drop): RSET the upstream too.

        :param reset_upstream: False when the upstream connection is about to be
            closed anyway (the client dropped, perhaps mid-DATA, where an RSET
            could be read as the reply to an unfinished command).
        """
        transaction, session.transaction = session.transaction, None
        if transaction is None or not self._end(transaction):
            return
        self.counters["aborted"] += 1
        if reset_upstream and session.upstream is not None and transaction.broken is None:
            await session.upstream.rset()
        log.info(
            "%s: aborted by %s: from=<%s>, nrcpt=%d",
            transaction.queue_id,
            reason,
            transaction.reverse_path,
            len(transaction.accepted),
        )
        self._maybe_capture(session, transaction, None, None, None)

    def schedule_disconnect(self, session: RelaySession) -> None:
        """Called when the client's connection is lost: clean up in a task."""
        task = asyncio.get_running_loop().create_task(self._disconnected(session))
        self._disconnects.add(task)
        task.add_done_callback(self._disconnects.discard)

    async def _disconnected(self, session: RelaySession) -> None:
        await self.close_session(session)

    async def close_session(self, session: RelaySession, *, quit_upstream: bool = True) -> None:
        """End the session's transaction, if any, and close its upstream connection.

        :param quit_upstream: say QUIT to the upstream first; False closes at once
            (see :meth:`UpstreamSession.abort`).
        """
        await self.abort_transaction(session, reason="disconnect", reset_upstream=False)
        if quit_upstream:
            await self._close_upstream(session)
        else:
            upstream, session.upstream = session.upstream, None
            if upstream is not None:
                upstream.abort()

    async def drain(self) -> None:
        """Wait for disconnect clean-ups and records still running (shutdown, tests)."""
        while self._disconnects or self._records:
            await asyncio.gather(*self._disconnects, *self._records, return_exceptions=True)

    async def _close_upstream(self, session: RelaySession) -> None:
        upstream, session.upstream = session.upstream, None
        if upstream is not None:
            await upstream.close()

    def _upstream(self, session: RelaySession) -> Fanout:
        if session.upstream is None:
            session.upstream = Fanout(self.upstreams, session.transcript)
        return session.upstream

    def _failover_s(self) -> float:
        """How long opening and MAIL may take upstream: each upstream of the list tried in turn."""
        settings = self._settings
        tries = len(self.upstreams.health)
        return (settings.connect_timeout_s * 2 + settings.command_timeout_s) * tries

    # -- trace, logs, capture ------------------------------------------------------------

    def _received(
        self, server: RelaySMTP, session: RelaySession, transaction: Transaction
    ) -> bytes:
        peer: Any = session.peer
        return received_header(
            helo=session.host_name,
            client_ip=str(peer[0]) if peer else "unknown",
            hostname=self._hostname,
            queue_id=transaction.queue_id,
            esmtp=bool(session.extended_smtp),
            tls=session.ssl is not None,
            smtputf8=transaction.smtputf8,
            recipients=[r.address for r in transaction.accepted],
            at=transaction.received_at.timestamp(),
        )

    def _finish(
        self,
        session: RelaySession,
        transaction: Transaction,
        reply: SMTPReply,
        received: bytes | None,
        sent: bytes | None,
        *,
        prepared: Prepared | None = None,
        head: bytes = b"",
    ) -> None:
        """Count, log and capture a transaction's end.

        :param sent: the message sent upstream after ``head`` (our trace field);
            the two are joined only for a refusal or a capture.
        """
        if session.transaction is transaction:
            session.transaction = None
        status = {2: "sent", 4: "deferred"}.get(reply.code // 100, "bounced")
        if self._end(transaction):  # else counted already, as aborted (shutdown)
            session.transactions += 1
            self.counters[{"sent": "relayed", "deferred": "deferred"}.get(status, "rejected")] += 1
        if status != "sent" and sent is not None and self.refusals is not None:
            self.refusals.refused(transaction, reply, head + sent)
        tracking = tracking_text(prepared)
        log.info(
            "%s: from=<%s>, to=%s, size=%d, relay=%s, delay=%.2f%s, status=%s (%s)",
            transaction.queue_id,
            transaction.reverse_path,
            ",".join(f"<{r.address}>" for r in transaction.accepted),
            len(received or b""),
            session.upstream.label if session.upstream is not None else self._settings.label,
            transaction.delay_s,
            tracking,
            status,
            reply,
        )
        self._maybe_capture(session, transaction, reply, received, sent, head=head)

    def _log_rejected(
        self, transaction: Transaction, forward_path: str | None, reply: SMTPReply, label: str
    ) -> None:
        who = (
            f"to=<{forward_path}>"
            if forward_path is not None
            else (f"from=<{transaction.reverse_path}>")
        )
        status = "deferred" if reply.code // 100 == 4 else "rejected"
        log.info(
            "%s: %s, relay=%s, status=%s (%s)",
            transaction.queue_id,
            who,
            label,
            status,
            reply,
        )

    def _maybe_capture(
        self,
        session: RelaySession,
        transaction: Transaction,
        reply: SMTPReply | None,
        received: bytes | None,
        sent: bytes | None,
        *,
        head: bytes = b"",
    ) -> None:
        capture = self._capture
        if capture is None or session.transcript is None:
            return
        lines = session.transcript.take()
        ended_positive = reply is not None and reply.is_positive
        if capture.wanted(ended_positive=ended_positive):
            capture.submit(
                Capture(
                    transaction.queue_id,
                    transaction.received_at,
                    lines,
                    received,
                    None if sent is None else head + sent,
                )
            )
