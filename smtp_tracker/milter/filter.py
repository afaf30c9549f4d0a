"""The milter callbacks: collect a message from the MTA, rewrite it with the tracking stage.

:class:`MilterFilter` is pymilter's per-connection object (libmilter runs each
MTA connection in a thread of its own); it adapts the milter protocol to
plain calls and holds no policy.  At end of message it hands the collected
octets to the same tracking stage ``serve`` uses
(:class:`~smtp_tracker.tracking.stage.Tracker`), in the event loop, and waits
for it in its own thread, so the loop is never blocked.  Then it asks the MTA
for the changes (Sendmail milter protocol: ``SMFIR_CHGHEADER`` to remove the
control header, ``SMFIR_INSHEADER`` for the disclosure, ``SMFIR_REPLBODY`` for
the body) and records the message under the MTA's queue id (macro ``{i}``).

Fail open: whatever goes wrong on our side (an exception, the stage taking
longer than ``milter_timeout_s``, a message over ``max_message_bytes``), the
reply is ``SMFIS_ACCEPT`` or ``SMFIS_CONTINUE`` with no change requested: the
message goes on as it came; the problem is logged with the queue id and
counted.  Nothing here ever answers ``TEMPFAIL``, ``REJECT`` or ``DISCARD``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import Milter  # type: ignore[import-untyped]

from smtp_tracker.milter.message import MilterEdits, MilterMessage, edits_for
from smtp_tracker.smtp.capture import Capture, CaptureWriter
from smtp_tracker.smtp.handler import Prepared
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.session import Recipient, Transaction, new_queue_id

__all__ = ["MilterContext", "MilterCounters", "MilterFilter", "TrackingStage"]

log = logging.getLogger("smtp_tracker.milter")

T = TypeVar("T")

#: ``smfi_replacebody`` takes the new body in pieces; libmilter caps one at 64 KiB.
_BODY_CHUNK_BYTES = 65_535
#: The milter replies we use (``SMFIS_*``): go on, or accept the message as it is.
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
#: What the record says the MTA answered: the milter never sees the final reply.
_ACCEPTED_TEXT = "accepted by the milter (the MTA queued it under this queue id)"


class TrackingStage(Protocol):
    """What the milter calls: :class:`~smtp_tracker.tracking.stage.Tracker` is one."""

    async def prepare(self, content: bytes, transaction: Transaction) -> Prepared:
        """The message to pass on; never raises (fail open)."""
        ...

    async def record(
        self, transaction: Transaction, prepared: Prepared, reply: Reply, size_bytes: int
    ) -> None:
        """Record the message; never raises."""
        ...


@dataclass(slots=True)
class MilterCounters:
    """What the milter counts; logged at shutdown.

    :ivar messages: messages that reached end of message (or were cut short as oversized).
    :ivar changed: messages whose header or body we asked the MTA to change.
    :ivar unchanged: messages passed on as they came (not tracked, or failed open).
    :ivar oversized: messages over ``max_message_bytes``, passed on unchanged.
    :ivar timeouts: messages the stage did not finish within ``milter_timeout_s``.
    :ivar failures: our own errors (an exception in a callback), failed open.
    :ivar aborted: transactions the MTA abandoned before end of message.
    """

    messages: int = 0
    changed: int = 0
    unchanged: int = 0
    oversized: int = 0
    timeouts: int = 0
    failures: int = 0
    aborted: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


class MilterContext:
    """What every milter connection shares: the event loop, the stage, limits, counters.

    :param loop: the event loop the stage and the store run in.
    :param stage: the tracking stage (none: messages are passed on unchanged).
    :param max_message_bytes: larger messages are passed on unchanged (counted).
    :param timeout_s: seconds from end of message the stage may take before the
        message is passed on unchanged.
    :param capture: the debug capture writer (the milter's view of a message).
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        stage: TrackingStage | None,
        max_message_bytes: int,
        timeout_s: float,
        capture: CaptureWriter | None = None,
    ) -> None:
        self.loop = loop
        self.stage = stage
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s
        self.capture = capture
        self.counters = MilterCounters()
        self._lock = threading.Condition()
        self._busy = 0  # transactions between MAIL and end of message
        self._connections = 0

    def count(self, name: str) -> None:
        """Add one to a counter (from any thread)."""
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + 1)

    def transaction_started(self) -> None:
        """A MAIL FROM: drain waits for it to end."""
        with self._lock:
            self._busy += 1

    def transaction_ended(self) -> None:
        """End of message or abort."""
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()

    @property
    def busy(self) -> int:
        """Transactions between MAIL FROM and their end now."""
        with self._lock:
            return self._busy

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no transaction is in progress, up to ``timeout_s``; whether it is so."""
        with self._lock:
            return self._lock.wait_for(lambda: self._busy == 0, timeout=timeout_s)

    def run(self, coroutine: Coroutine[Any, Any, T], deadline: float) -> T:
        """Run ``coroutine`` in the event loop; wait for it until ``deadline`` (monotonic).

        :raises TimeoutError: not done by then (it is cancelled).
        :raises RuntimeError: the event loop is closed.
        """
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError from None

    def submit_capture(self, capture: Capture, *, failed: bool) -> None:
        """Hand a capture to the writer in the event loop (``capture`` mode permitting)."""
        writer = self.capture
        if writer is None or not writer.wanted(ended_positive=not failed):
            return
        self.loop.call_soon_threadsafe(writer.submit, capture)


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def _octets(value: bytes | str, encoding: str) -> bytes:
    if isinstance(value, str):
        return value.encode(encoding, "surrogateescape")
    return value


def _address(path: str) -> str:
    """``<a@b>`` → ``a@b`` (Postfix passes the brackets; a bare address stays as it is)."""
    path = path.strip()
    if path.startswith("<") and path.endswith(">"):
        return path[1:-1]
    return path


# SMFIP_HDR_LEADSPC: header values with their leading space, so that the octets are as written
@Milter.header_leading_space
class MilterFilter(Milter.Base):  # type: ignore[misc]
    """One MTA connection (pymilter creates one per connection, in libmilter's thread).

    Negotiated protocol steps: MAIL, RCPT, header fields, body, end of message,
    abort and close; no replies to MAIL, RCPT and header fields (``SMFIP_NR_*``);
    connect, HELO, DATA, end of header and unknown commands skipped (``SMFIP_NO*``);
    header values with their leading space (``SMFIP_HDR_LEADSPC``).
    """

    def __init__(self, context: MilterContext) -> None:
        self.context = context
        self.message: MilterMessage | None = None
        self.started_at = datetime.now(UTC)
        #: whether changes were asked for at this end of message (then it is not "unchanged")
        self.applied = False

    # -- callbacks: each one fails open -------------------------------------------------

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envfrom(self, mailfrom: str, *parameters: str) -> int:
        try:
            if self.message is not None:  # a transaction the MTA ended without abort
                self.context.transaction_ended()
            self.message = MilterMessage(sender=_address(_text(mailfrom)))
            self.started_at = datetime.now(UTC)
            self.context.transaction_started()
            self.message.auth_authen = self.getsymval("{auth_authen}")
            log.debug("milter: MAIL FROM:<%s>", self.message.sender)
        except Exception:
            self._failed("MAIL FROM")
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envrcpt(self, recipient: str, *parameters: str) -> int:
        try:
            if self.message is not None:
                self.message.recipients.append(_address(_text(recipient)))
        except Exception:
            self._failed("RCPT TO", count=False)
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    @Milter.decode("bytes")  # type: ignore[untyped-decorator]
    def header(self, name: bytes | str, value: bytes | str) -> int:
        try:
            message = self.message
            if message is not None:
                raw_name = (
                    name.encode("ascii", "surrogateescape") if isinstance(name, str) else name
                )
                raw_value = _octets(value, "utf-8")
                message.add_field(raw_name, raw_value, max_bytes=self.context.max_message_bytes)
        except Exception:
            self._failed("header", count=False)
        return CONTINUE

    def body(self, chunk: bytes) -> int:
        try:
            message = self.message
            if message is None:
                return CONTINUE
            message.add_body(chunk, max_bytes=self.context.max_message_bytes)
            if message.oversized:  # the rest is not ours to see: accept it as it is
                self._oversized(message)
                return ACCEPT
        except Exception:
            self._failed("body")
            self._end()
            return ACCEPT
        return CONTINUE

    def eom(self) -> int:
        message = self.message
        if message is None:
            return CONTINUE
        self.applied = False
        try:
            if message.oversized:
                self._oversized(message)
            elif message.incomplete:
                self.context.count("messages")
                self.context.count("failures")
                self.context.count("unchanged")
                log.warning(
                    "%s: not all of it could be read; passing it on unchanged", self._queue_id()
                )
            else:
                self._end_of_message(message)
        except Exception:
            self._failed("end of message")
            if not self.applied:
                self.context.count("unchanged")
        finally:
            self._end()
        return CONTINUE

    def abort(self) -> int:
        if self.message is not None:
            self.context.count("aborted")
            self._end()
        return CONTINUE

    def close(self) -> int:
        if self.message is not None:
            self._end()
        return CONTINUE

    # -- the work -----------------------------------------------------------------------------

    def _end(self) -> None:
        if self.message is not None:
            self.message = None
            self.context.transaction_ended()

    def _queue_id(self) -> str:
        value = self.getsymval("{i}")
        return str(value) if value else new_queue_id()

    def _failed(self, where: str, *, count: bool = True) -> None:
        """Log our error; with ``count=False`` the message is marked incomplete and
        counted once, at its end, as passed on unchanged."""
        if count:
            self.context.count("failures")
        elif self.message is not None:
            self.message.incomplete = True
        log.error("milter: error in %s; passing the message on unchanged", where, exc_info=True)

    def _oversized(self, message: MilterMessage) -> None:
        self.context.count("messages")
        self.context.count("oversized")
        self.context.count("unchanged")
        log.warning(
            "%s: over max_message_bytes (%d); passing it on unchanged, not tracked",
            self._queue_id(),
            self.context.max_message_bytes,
        )
        self._end()  # libmilter sends no more of this message

    def _end_of_message(self, message: MilterMessage) -> None:
        context = self.context
        context.count("messages")
        deadline = time.monotonic() + context.timeout_s
        queue_id = self._queue_id()
        stage = context.stage
        original = message.octets()
        if stage is None:
            context.count("unchanged")
            return
        reply = Reply(250, "2.0.0", _ACCEPTED_TEXT)
        transaction = Transaction(
            reverse_path=message.sender,
            parameters=(),
            smtputf8=False,
            queue_id=queue_id,
            received_at=self.started_at,
            accepted=[Recipient(address, (), reply) for address in message.recipients],
        )
        try:
            prepared = context.run(stage.prepare(original, transaction), deadline)
        except TimeoutError:
            context.count("timeouts")
            context.count("unchanged")
            log.warning(
                "%s: not rewritten within %g s (milter_timeout_s); passing it on unchanged",
                queue_id,
                context.timeout_s,
            )
            self._capture(queue_id, message, original, None, failed=True)
            return
        changed = prepared.data != original
        if changed:
            edits = edits_for(message, prepared.data)
            self._apply(edits)
            context.count("changed")
        else:
            context.count("unchanged")
        try:
            context.run(stage.record(transaction, prepared, reply, len(original)), deadline)
        except TimeoutError:
            log.warning(
                "%s: not recorded within %g s (milter_timeout_s)", queue_id, context.timeout_s
            )
        log.info(
            "%s: from=<%s> nrcpt=%d size=%d tracked=%s%s%s%s",
            queue_id,
            message.sender,
            len(message.recipients),
            len(original),
            "yes" if prepared.tracked else "no",
            f" reason={prepared.reason}" if prepared.reason else "",
            f" dkim={prepared.dkim}" if prepared.dkim else "",
            f" sasl_username={message.auth_authen}" if message.auth_authen else "",
        )
        self._capture(queue_id, message, original, prepared.data if changed else None, failed=False)

    def _apply(self, edits: MilterEdits) -> None:
        """Ask the MTA for the changes; all are queued by libmilter until end of message."""
        self.applied = True
        for change in edits.removals:
            self.chgheader(change.name, change.index, None)
        for change in edits.insertions:
            assert change.value is not None
            self.addheader(change.name, change.value.replace("\r\n", "\n"), change.index)
        if edits.body is not None:
            body = edits.body
            for start in range(0, len(body), _BODY_CHUNK_BYTES):
                self.replacebody(body[start : start + _BODY_CHUNK_BYTES])

    def _capture(
        self,
        queue_id: str,
        message: MilterMessage,
        original: bytes,
        changed: bytes | None,
        *,
        failed: bool,
    ) -> None:
        lines = [
            f"milter MAIL FROM:<{message.sender}>",
            *(f"milter RCPT TO:<{address}>" for address in message.recipients),
        ]
        if message.auth_authen:
            lines.append(f"milter {{auth_authen}}={message.auth_authen}")
        lines.append(
            "milter end of message: " + ("changed" if changed is not None else "unchanged")
        )
        self.context.submit_capture(
            Capture(
                queue_id=queue_id,
                at=self.started_at,
                session_lines=lines,
                downstream=original,
                upstream=changed if changed is not None else original,
            ),
            failed=failed,
        )
