"""The tracking stage of the relay: pixel rewrite before DATA, record after the upstream's 2xx.

:class:`Tracker` is the relay handler's :class:`~smtp_tracker.smtp.handler.MessagePreparer`
and :class:`~smtp_tracker.smtp.handler.DeliveryRecorder`.  The rewrite is
CPU-bound, so it runs in a small thread pool, never in the event loop, with a
time limit; whatever goes wrong (an exception, a timeout), the original bytes
are relayed (fail open), the problem is logged with the queue id and counted.
Recording happens only once the upstream has accepted the message, so a
transaction that Postfix retries is never counted twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import TYPE_CHECKING

from smtp_tracker.errors import StoreError
from smtp_tracker.mime import RewritePolicy, RewriteResult, rewrite
from smtp_tracker.mime.disclosure import Disclosure
from smtp_tracker.privacy import DomainPolicy
from smtp_tracker.smtp.handler import Prepared
from smtp_tracker.smtp.reply import Reply
from smtp_tracker.smtp.transaction import Transaction
from smtp_tracker.store.records import LinkRecord
from smtp_tracker.store.token import new_tracking_id, pixel_url

if TYPE_CHECKING:
    from smtp_tracker.store.base import Store

__all__ = ["TrackedMessage", "Tracker", "header_fields"]

log = logging.getLogger("smtp_tracker.mime")

#: The header section ends at the first empty line (RFC 5322 §2.1).
_HEADER_END = (b"\r\n\r\n", b"\n\n")
#: Headers longer than this are not parsed for Message-ID/Subject.
_MAX_HEADER_BYTES = 1024 * 1024


def header_fields(message: bytes) -> tuple[str | None, str | None]:
    """The Message-ID and Subject of a message, read from its header section only.

    :returns: ``(message_id, subject)``, each None when absent; Subject decoded
        per RFC 2047 as far as it can be.
    """
    ends = [i for i in (message.find(sep, 0, _MAX_HEADER_BYTES) for sep in _HEADER_END) if i >= 0]
    head = message[: min(ends)] if ends else message[:_MAX_HEADER_BYTES]
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    message_id = headers.get("Message-ID")
    subject = headers.get("Subject")
    return (
        str(message_id).strip() if message_id is not None else None,
        _decode_subject(subject) if subject is not None else None,
    )


def _decode_subject(value: object) -> str:
    from email.header import decode_header, make_header

    try:
        return str(make_header(decode_header(str(value))))[:998]
    except (ValueError, LookupError, UnicodeError):
        return str(value)[:998]


@dataclass(frozen=True, slots=True)
class TrackedMessage(Prepared):
    """:class:`Prepared` with the links wrapped for click tracking (stored with the record).

    :ivar links: each wrapped link's token, destination and position.
    """

    links: tuple[LinkRecord, ...] = ()


@dataclass(slots=True)
class TrackerCounters:
    """What the tracking stage counts; logged at shutdown and exposed for tests."""

    tracked: int = 0
    not_tracked: int = 0
    rewrite_failed: int = 0
    rewrite_timeouts: int = 0
    rewrite_busy: int = 0
    record_failed: int = 0


class Tracker:
    """Pixel rewrite and delivery records for the relay.

    :param policy: what the rewrite may touch.
    :param pixel_base_url: public URL of the pixel endpoint (``https://host:port``).
    :param store: where relayed messages are recorded (none: nothing recorded).
    :param rewrite_timeout_s: seconds a rewrite may take before the original is relayed.
    :param workers: threads for rewrites (CPU-bound: about the number of cores).
    :param max_pending: rewrites allowed to wait for a thread; beyond that, and
        while they wait, messages go out unchanged rather than pile up in memory.
    :param domains: the sender and recipient domain lists; an envelope they
        refuse is not tracked, with the rule as the reason.
    :param disclosure: footer spliced before the pixel and header field
        prepended to tracked messages (none by default).
    """

    def __init__(
        self,
        *,
        policy: RewritePolicy,
        pixel_base_url: str,
        store: Store | None = None,
        rewrite_timeout_s: float = 10.0,
        workers: int = 2,
        max_pending: int = 32,
        domains: DomainPolicy | None = None,
        disclosure: Disclosure | None = None,
    ) -> None:
        self._policy = policy
        self._domains = domains or DomainPolicy()
        self._disclosure = disclosure or Disclosure()
        self._base_url = pixel_base_url
        self._store = store
        self._timeout_s = rewrite_timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="rewrite"
        )
        self._slots = asyncio.Semaphore(max_pending)
        self.counters = TrackerCounters()

    async def prepare(self, content: bytes, transaction: Transaction) -> Prepared:
        """Rewrite ``content`` with a pixel for a new tracking id; never raises."""
        tracking_id = new_tracking_id()
        url = pixel_url(self._base_url, tracking_id)
        if self._slots.locked():
            log.warning(
                "%s: not tracked: too many rewrites waiting; relaying the original",
                transaction.queue_id,
            )
            self.counters.rewrite_busy += 1
            return Prepared(content, tracking_id, False, "rewrite-busy")
        excluded = self._domains.not_tracked_reason(
            transaction.reverse_path, [r.address for r in transaction.accepted]
        )
        async with self._slots:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(
                self._pool,
                _rewrite,
                content,
                url,
                self._policy,
                transaction.reverse_path,
                self._disclosure.footer_html,
                excluded,
                self._base_url if self._policy.track_clicks else None,
            )
            try:
                result = await asyncio.wait_for(future, self._timeout_s)
            except TimeoutError:
                self.counters.rewrite_timeouts += 1
                log.warning(
                    "%s: rewrite took over %.1f s; relaying the original",
                    transaction.queue_id,
                    self._timeout_s,
                )
                return Prepared(content, tracking_id, False, "rewrite-timeout")
        if result.reason == "rewrite-failed":
            self.counters.rewrite_failed += 1
            log.warning(
                "%s: rewrite failed; relaying the original (%s)",
                transaction.queue_id,
                ", ".join(result.defects[:3]) or "no detail",
            )
        message = result.message
        if result.tracked:
            self.counters.tracked += 1
            message = self._disclosure.add_header(message)
        else:
            self.counters.not_tracked += 1
        return TrackedMessage(message, tracking_id, result.tracked, result.reason, result.links)

    async def record(
        self, transaction: Transaction, prepared: Prepared, reply: Reply, size_bytes: int
    ) -> None:
        """Record a message the upstream accepted; failures are logged and counted, not raised."""
        if self._store is None or prepared.tracking_id is None:
            return
        from smtp_tracker.store.records import MessageRecord

        message_id, subject = header_fields(prepared.data)
        record = MessageRecord(
            tracking_id=prepared.tracking_id,
            queue_id=transaction.queue_id,
            message_id=message_id,
            sender=transaction.reverse_path,
            recipients=[r.address for r in transaction.accepted],
            size_bytes=size_bytes,
            received_at=transaction.received_at,
            relayed_at=datetime.now(UTC),
            upstream_reply=str(reply),
            tracked=prepared.tracked,
            not_tracked_reason=prepared.reason,
            subject=subject,
            links=prepared.links if isinstance(prepared, TrackedMessage) else (),
        )
        try:
            await self._store.record_message(record)
        except Exception as exc:  # the mail is accepted upstream: never fail the transaction
            # one line per message (a full or read-only disk fails every one of them);
            # a traceback only for what the store did not foresee
            self.counters.record_failed += 1
            foreseen = isinstance(exc, StoreError)
            log.warning(
                "%s: relayed, but not recorded in the store (%s)",
                transaction.queue_id,
                exc.__cause__ if foreseen and exc.__cause__ is not None else type(exc).__name__,
                exc_info=not foreseen,
            )

    def close(self) -> None:
        """Stop the rewrite threads (waits for rewrites in progress)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _rewrite(
    content: bytes,
    url: str,
    policy: RewritePolicy,
    reverse_path: str,
    footer_html: str = "",
    not_tracked: str | None = None,
    click_base_url: str | None = None,
) -> RewriteResult:
    return rewrite(
        content,
        url,
        policy,
        reverse_path=reverse_path,
        extra_html=footer_html,
        not_tracked=not_tracked,
        click_base_url=click_base_url,
    )
