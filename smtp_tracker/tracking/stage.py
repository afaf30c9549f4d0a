"""The tracking stage of the relay: pixel rewrite before DATA, record after the upstream's 2xx.

:class:`Tracker` is the relay handler's :class:`~smtp_tracker.smtp.handler.MessagePreparer`
and :class:`~smtp_tracker.smtp.handler.DeliveryRecorder`.  The rewrite is
CPU-bound, so it runs in a small thread pool, never in the event loop, with a
time limit; whatever goes wrong (an exception, a timeout), the original bytes
are relayed (fail open), the problem is logged with the queue id and counted.
A message that finds every rewrite thread busy waits for one, up to
``rewrite_queue_wait_s``, so that a burst does not make tracking depend on
load; the waiting messages are bounded by ``max_connections`` (one per
session, already received), and they wait in the event loop, never blocking it.
Recording happens only once the upstream has accepted the message, so a
transaction that Postfix retries is never counted twice.

With ``dkim_policy = "resign"`` the same thread then re-signs a changed message
whose DKIM signatures are all ours and verify (:mod:`smtp_tracker.dkim`), after
the rewrite and the disclosure header and before the relay; a message it may not
or cannot re-sign is relayed as received, byte for byte, with the reason.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import TYPE_CHECKING, Any

from smtp_tracker.dkim import Resigner, ResignError
from smtp_tracker.errors import StoreError
from smtp_tracker.mime import RewritePolicy, RewriteResult, deadline, rewrite
from smtp_tracker.mime.disclosure import Disclosure
from smtp_tracker.smtp.handler import Prepared
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.session import Transaction
from smtp_tracker.store.integrity import StoreSuspendedError
from smtp_tracker.store.records import LinkRecord, MessageRecord
from smtp_tracker.tokens import new_link_token, new_tracking_id, optout_url, pixel_url
from smtp_tracker.tracking.consent import ConsentCheck
from smtp_tracker.tracking.domains import DomainPolicy

if TYPE_CHECKING:
    from smtp_tracker.store.base import Store
    from smtp_tracker.store.consent import ConsentRegistry

__all__ = ["TrackedMessage", "Tracker", "header_fields"]

log = logging.getLogger("smtp_tracker.mime")

#: Messages of up to this many octets are rewritten on the event loop, not in a
#: rewrite thread: for them the hand-off (submit, the thread's wake-up, the loop's
#: wake-up, the GIL passed back and forth) cost more than the rewrite (issue 15).
#: The bound is measured on this project's 2-core machine: the 74 templates of
#: the corpus (``/work/shared/corpus/html``) that make a one-part HTML message of
#: up to 32 KiB take at most 0.43 ms each to rewrite, pixel only (median of 15
#: runs), the bench's 18 KB message 0.23 ms (p99 0.55 ms over 300).
INLINE_REWRITE_BYTES = 32 * 1024
#: Seconds a rewrite on the event loop may take (the rewrite's cooperative
#: deadline, :mod:`smtp_tracker.mime.deadline`): a small message that is slow to
#: rewrite (hostile markup, many parts) stops there and is started over in a
#: rewrite thread, under ``rewrite_timeout_s`` as any other.  Four times the
#: slowest corpus message above.
INLINE_REWRITE_BUDGET_S = 0.002
#: Headers longer than this are not parsed for Message-ID/Subject.
_MAX_HEADER_BYTES = 1024 * 1024


def header_fields(message: bytes) -> tuple[str | None, str | None]:
    """The Message-ID and Subject of a message, read from its header section only
    (up to its first empty line, RFC 5322 §2.1: CRLF CRLF or LF LF).

    As :mod:`email`'s ``compat32`` header parser reads them (the first field of
    each name); a header section of ASCII fields with CRLF line ends is read
    without it, to the same values (:func:`_simple_fields`; issue 15).

    :returns: ``(message_id, subject)``, each None when absent; Subject decoded
        per RFC 2047 as far as it can be.
    """
    crlf = message.find(b"\r\n\r\n", 0, _MAX_HEADER_BYTES)
    # an LF LF after the first CRLF CRLF cannot end the section first: not looked for
    lf = message.find(b"\n\n", 0, crlf + 1 if crlf >= 0 else _MAX_HEADER_BYTES)
    ends = [i for i in (crlf, lf) if i >= 0]
    end = min(ends) if ends else _MAX_HEADER_BYTES
    # The parser stops at a line that is no field: only what comes before it is read
    # (a message without a header section was copied and split into lines, for nothing).
    if (stop := _NOT_A_HEADER_LINE.search(message, 0, end)) is not None:
        if stop.start() == 0:
            return None, None
        end = stop.start()
    head = message[:end]
    simple = _simple_fields(head)
    if simple is None:
        headers = BytesHeaderParser(policy=compat32).parsebytes(head)
        message_id, subject = headers.get("Message-ID"), headers.get("Subject")
    else:
        message_id, subject = simple
    return (
        str(message_id).strip() if message_id is not None else None,
        _decode_subject(subject) if subject is not None else None,
    )


#: A header field's first line as ``email.feedparser`` tells one (its ``headerRE``
#: but for the ``From `` envelope line, which :func:`_simple_fields` leaves to it).
_FIELD_LINE = re.compile(r"[\041-\071\073-\176]*:")
#: The start of the first line (between LFs) that ``email.feedparser`` does not read
#: as part of a header section (its ``headerRE``: no ``From ``, field name, or
#: continuation): the parser stops there, or earlier at a bare CR, never later.
_NOT_A_HEADER_LINE = re.compile(rb"^(?!From |[\041-\071\073-\176]*:|[\t ])", re.MULTILINE)
#: The fields :func:`header_fields` reads, lower case.
_WANTED = ("message-id", "subject")


def _simple_fields(head: bytes) -> tuple[str | None, str | None] | None:
    """The raw Message-ID and Subject values of a simple header section, as
    ``compat32`` gives them (``header_source_parse``: the first line's value without
    leading blanks, its continuation lines with their CRLFs, trailing CR/LF
    removed); None when the section is not simple: non-ASCII, a bare CR or LF,
    or a line that is neither a field nor a continuation (the parser's own cases).

    The ``email`` parser took a hundredth of the relay's CPU per message (issue 15).
    """
    if not head.isascii():
        return None
    lines = head.decode("ascii").split("\r\n")
    found: dict[str, list[str]] = {}
    current: list[str] | None = None  # the source lines of a wanted field, being read
    for index, line in enumerate(lines):
        if "\r" in line or "\n" in line or line.startswith("From "):
            return None
        ending = "\r\n" if index < len(lines) - 1 else ""
        if line.startswith((" ", "\t")):
            if index == 0:
                return None
            if current is not None:
                current.append(line + ending)
            continue
        if _FIELD_LINE.match(line) is None:
            return None
        name = line.partition(":")[0].lower()
        current = None
        if name in _WANTED and name not in found:
            current = found[name] = [line + ending]
    values: list[str | None] = []
    for name in _WANTED:
        source = found.get(name)
        if source is None:
            values.append(None)
            continue
        value = source[0].partition(":")[2].lstrip(" \t") + "".join(source[1:])
        values.append(value.rstrip("\r\n"))
    return values[0], values[1]


def _decode_subject(value: object) -> str:
    text = str(value)
    if "=?" not in text:  # no encoded word: decode_header and make_header give it back
        return text[:998]
    try:
        return str(make_header(decode_header(text)))[:998]
    except (ValueError, LookupError, UnicodeError):
        return str(value)[:998]


@dataclass(frozen=True, slots=True)
class TrackedMessage(Prepared):
    """:class:`Prepared` with the links wrapped for click tracking (stored with the record).

    :ivar links: each wrapped link's token, destination and position.
    """

    links: tuple[LinkRecord, ...] = ()
    optout_token: str | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What the rewrite thread made of a message: the rewrite, then the DKIM step."""

    rewrite: RewriteResult
    message: bytes
    tracked: bool
    reason: str | None
    dkim: str | None = None


@dataclass(slots=True)
class TrackerCounters:
    """What the tracking stage counts; logged at shutdown and exposed for tests."""

    tracked: int = 0
    not_tracked: int = 0
    rewrite_failed: int = 0
    rewrite_timeouts: int = 0
    rewrite_busy: int = 0
    rewrite_queued: int = 0
    record_failed: int = 0
    resigned: int = 0
    resign_failed: int = 0


class Tracker:
    """Pixel rewrite and delivery records for the relay.

    :param policy: what the rewrite may touch.
    :param pixel_base_url: public URL of the pixel endpoint (``https://host:port``).
    :param store: where relayed messages are recorded (none: nothing recorded).
    :param rewrite_timeout_s: seconds a rewrite may take, once a thread runs it,
        before the original is relayed (the thread stays taken until it ends).
    :param rewrite_queue_wait_s: seconds a message waits for a free thread before
        the original is relayed (counted as ``rewrite_busy``); those that had to
        wait at all are counted as ``rewrite_queued``.
    :param workers: threads for rewrites (CPU-bound: about the number of cores).
    :param domains: the sender and recipient domain lists; an envelope they
        refuse is not tracked, with the rule as the reason.
    :param disclosure: footer spliced before the pixel and header field
        prepended to tracked messages (none by default).
    :param resigner: re-signs DKIM-signed messages after the rewrite
        (``dkim_policy = "resign"``); none: signatures are left as they are.
    :param consent: the recipients' objections and consent (issue 20): a
        transaction it refuses is relayed untracked with its reason; none: not asked.
    :param optout_links: where each tracked message's objection link is kept
        (with ``disclosure.optout_link``); none: no link is added.
    :param inline_rewrite_bytes: messages up to this size (octets) are rewritten
        on the event loop for at most :data:`INLINE_REWRITE_BUDGET_S`, and in a
        thread if that was not enough; 0: always in a thread.  Never with a
        ``resigner`` or ``policy.track_clicks``: signing, and wrapping every
        link, take longer than the bound was measured for (with click tracking,
        up to 2.4 ms for the corpus messages under 32 KiB).
    """

    def __init__(
        self,
        *,
        policy: RewritePolicy,
        pixel_base_url: str,
        store: Store | None = None,
        rewrite_timeout_s: float = 10.0,
        rewrite_queue_wait_s: float = 5.0,
        workers: int = 2,
        domains: DomainPolicy | None = None,
        disclosure: Disclosure | None = None,
        resigner: Resigner | None = None,
        consent: ConsentCheck | None = None,
        optout_links: ConsentRegistry | None = None,
        inline_rewrite_bytes: int = INLINE_REWRITE_BYTES,
    ) -> None:
        self._policy = policy
        self._consent = consent
        self._optout_links = optout_links
        self._resigner = resigner
        self._domains = domains or DomainPolicy()
        self._disclosure = disclosure or Disclosure()
        self._base_url = pixel_base_url
        self._store = store
        self._timeout_s = rewrite_timeout_s
        self._queue_wait_s = rewrite_queue_wait_s
        # not with re-signing or click tracking: their work is not in the measured bound
        inline = resigner is None and not policy.track_clicks
        self._inline_bytes = inline_rewrite_bytes if inline else 0
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="rewrite"
        )
        #: Two slots per thread: the rewrite it runs and one submitted behind it, so
        #: that a thread never idles while the busy event loop hands it the next
        #: (with one slot per thread, bench/load.py ran 20% slower).  A slot is taken
        #: before a rewrite is submitted and given back when its thread has ended it.
        self._slots = asyncio.Semaphore(2 * workers)
        self.counters = TrackerCounters()
        #: messages relayed untracked, by reason (``not-html``, ``dkim-signed``, ...)
        self.not_tracked_reasons: collections.Counter[str] = collections.Counter()
        #: messages waiting for a rewrite thread now
        self.waiting = 0

    async def _take_slot(self, deadline: float) -> bool:
        """Take a rewrite slot, waiting until ``deadline`` (monotonic); False if none came."""
        if not self._slots.locked():
            return await self._slots.acquire()  # at once, without suspending
        self.counters.rewrite_queued += 1
        self.waiting += 1
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await self._slots.acquire()
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        return True

    def _rewrite_inline(self, *args: Any) -> _Outcome | None:
        """:func:`_started_rewrite` on the event loop, within :data:`INLINE_REWRITE_BUDGET_S`;
        None when it ran out of that (the caller hands the message to a thread)."""
        with deadline.time_limit(INLINE_REWRITE_BUDGET_S):
            # not logged when it stops: the message is not relayed as it came, it
            # is rewritten again in a thread
            outcome = _started_rewrite([], self._disclosure, None, *args, False)
        result = outcome.rewrite
        if result.reason == "rewrite-timeout" and "time-limit" in result.defects:
            return None
        return outcome

    async def _run_rewrite(self, *args: Any) -> _Outcome | str:
        """:func:`_rewrite`, on the event loop for a small message (see
        :meth:`_rewrite_inline`), else in a thread: its result, ``"rewrite-busy"``
        when no thread started it within ``rewrite_queue_wait_s``, or
        ``"rewrite-timeout"`` when it ran longer than ``rewrite_timeout_s`` (the
        thread runs on, holding its slot)."""
        content: bytes = args[0]
        if len(content) <= self._inline_bytes:
            outcome = self._rewrite_inline(*args)
            if outcome is not None:
                return outcome
        start_by = time.monotonic() + self._queue_wait_s
        if not await self._take_slot(start_by):
            return "rewrite-busy"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Outcome] = loop.create_future()
        started: list[float] = []  # the thread appends its start time

        def ended(job: concurrent.futures.Future[_Outcome]) -> None:
            """On the loop once the job has ended (or was cancelled unstarted): the
            slot back and the result handed over, in one wake-up of the loop."""
            self._slots.release()
            if future.done():  # given up (timeout, busy, cancelled)
                return
            if job.cancelled():
                future.cancel()
            elif (error := job.exception()) is not None:
                future.set_exception(error)
            else:
                future.set_result(job.result())

        def wake(job: concurrent.futures.Future[_Outcome]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(ended, job)

        try:
            job = self._pool.submit(
                _started_rewrite, started, self._disclosure, self._resigner, *args
            )
        except BaseException:  # the pool is shut down: nothing will give the slot back
            self._slots.release()
            raise
        job.add_done_callback(wake)
        try:
            while not future.done():
                if started:
                    remaining = started[0] + self._timeout_s - time.monotonic()
                    if remaining <= 0:
                        return "rewrite-timeout"
                else:
                    remaining = start_by - time.monotonic()
                    if remaining <= 0:
                        if job.cancel():  # still behind another rewrite: never ran
                            return "rewrite-busy"
                        continue  # it has just started
                await asyncio.wait({future}, timeout=remaining)
            return future.result()
        finally:
            if not future.done():
                future.cancel()
                job.cancel()  # unless a thread runs it

    async def prepare(self, content: bytes, transaction: Transaction) -> Prepared:
        """Rewrite ``content`` with a pixel for a new tracking id; never raises."""
        tracking_id = new_tracking_id()
        url = pixel_url(self._base_url, tracking_id)
        recipients = [r.address for r in transaction.accepted]
        excluded = self._domains.not_tracked_reason(transaction.reverse_path, recipients)
        if excluded is None and self._consent is not None:
            excluded = await self._consent.not_tracked_reason(recipients)
        disclosure = self._disclosure
        optout_token: str | None = None
        if excluded is None and disclosure.optout_link and self._optout_links is not None:
            optout_token = new_link_token()
        try:
            result = await self._run_rewrite(
                content,
                url,
                self._policy,
                transaction.reverse_path,
                disclosure.footer_for(
                    optout_url(self._base_url, optout_token) if optout_token else None
                ),
                excluded,
                self._base_url if self._policy.track_clicks else None,
            )
        except Exception:  # a defect of ours: the mail goes on as received (fail open)
            self.counters.rewrite_failed += 1
            log.exception(
                "%s: the rewrite stage failed; relaying the original", transaction.queue_id
            )
            return Prepared(content, tracking_id, False, "rewrite-failed")
        if result == "rewrite-busy":
            log.warning(
                "%s: not tracked: no rewrite thread free within %g s (rewrite_queue_wait_s); "
                "relaying the original",
                transaction.queue_id,
                self._queue_wait_s,
            )
            self.counters.rewrite_busy += 1
            return Prepared(content, tracking_id, False, "rewrite-busy")
        if not isinstance(result, _Outcome):  # "rewrite-timeout"
            self.counters.rewrite_timeouts += 1
            log.warning(
                "%s: rewrite took over %.1f s; relaying the original",
                transaction.queue_id,
                self._timeout_s,
            )
            return Prepared(content, tracking_id, False, "rewrite-timeout")
        if result.rewrite.reason == "rewrite-failed":
            self.counters.rewrite_failed += 1
            log.warning(
                "%s: rewrite failed; relaying the original (%s)",
                transaction.queue_id,
                ", ".join(result.rewrite.defects[:3]) or "no detail",
            )
        if result.dkim == "resigned":
            self.counters.resigned += 1
            log.info("%s: dkim=resigned", transaction.queue_id)
        elif result.dkim is not None:
            self.counters.resign_failed += result.dkim == "dkim-resign-failed"
            log.info(
                "%s: dkim=%s: relaying the message as received", transaction.queue_id, result.dkim
            )
        if result.tracked:
            self.counters.tracked += 1
        else:
            self.counters.not_tracked += 1
            self.not_tracked_reasons[result.reason or "unknown"] += 1
        # the DKIM outcome (issue 13): resigned, why the resigner left it, or the
        # skip policy's refusal
        dkim = result.dkim or ("dkim-signed" if result.reason == "dkim-signed" else None)
        return TrackedMessage(
            result.message,
            tracking_id,
            result.tracked,
            result.reason,
            dkim,
            links=result.rewrite.links if result.tracked else (),
            optout_token=optout_token if result.tracked else None,
        )

    async def record(
        self, transaction: Transaction, prepared: Prepared, reply: Reply, size_bytes: int
    ) -> None:
        """Record a message the upstream accepted; failures are logged and counted, not raised."""
        if self._store is None or prepared.tracking_id is None:
            return
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
            dkim=prepared.dkim,
        )
        try:
            await self._store.record_message(record)
        except StoreSuspendedError:  # suspended, or its server away: the store says so once
            self.counters.record_failed += 1
            return
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
            return
        if isinstance(prepared, TrackedMessage) and prepared.optout_token is not None:
            await self._record_optout_link(prepared.optout_token, record)

    async def _record_optout_link(self, token: str, record: Any) -> None:
        """Keep the objection link of a tracked message (its footer carries it);
        a failure is logged, never raised: the mail is accepted upstream."""
        if self._optout_links is None:
            return
        try:
            await self._optout_links.add_optout_link(
                token, record.tracking_id, list(record.recipients)
            )
        except Exception as exc:
            log.warning(
                "%s: relayed, but its objection link was not kept (%s); the link in the "
                "message will answer that it is not known",
                record.queue_id,
                exc.__cause__ or type(exc).__name__,
            )

    def reconfigure(self, *, domains: DomainPolicy, disclosure: Disclosure) -> None:
        """Domain lists and disclosure for the messages prepared from now on (SIGHUP).

        A message whose rewrite is already submitted keeps what it was given.
        """
        self._domains = domains
        self._disclosure = disclosure

    def close(self) -> None:
        """Stop the rewrite threads (waits for rewrites in progress)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _started_rewrite(
    started: list[float], disclosure: Disclosure, resigner: Resigner | None, *args: Any
) -> _Outcome:
    """:func:`_rewrite`, the disclosure header and the DKIM step, noting first when a
    thread began it (the time limit runs from then)."""
    started.append(time.monotonic())
    content: bytes = args[0]
    result = _rewrite(*args)
    message = disclosure.add_header(result.message) if result.tracked else result.message
    outcome = _Outcome(result, message, result.tracked, result.reason)
    if resigner is None or message == content:
        return outcome
    return _resign(content, outcome, resigner)


def _resign(content: bytes, outcome: _Outcome, resigner: Resigner) -> _Outcome:
    """Re-sign the changed message, or fall back to ``content`` as received (fail open)."""
    reason: str
    try:
        check = resigner.check(content)
        if check.signatures == 0:
            return outcome
        if check.reason is None:
            signed = resigner.resign(outcome.message, check)
            return _Outcome(outcome.rewrite, signed, outcome.tracked, outcome.reason, "resigned")
        reason = check.reason
    except ResignError as exc:
        log.warning("DKIM re-sign failed (%s); relaying the message as received", exc)
        reason = "dkim-resign-failed"
    except Exception:  # a defect of ours must not lose or break the mail
        log.exception("DKIM re-sign failed; relaying the message as received")
        reason = "dkim-resign-failed"
    return _Outcome(
        outcome.rewrite,
        content,
        False,
        reason if outcome.tracked else outcome.reason,
        reason,
    )


def _rewrite(
    content: bytes,
    url: str,
    policy: RewritePolicy,
    reverse_path: str,
    footer_html: str = "",
    not_tracked: str | None = None,
    click_base_url: str | None = None,
    log_timeout: bool = True,
) -> RewriteResult:
    return rewrite(
        content,
        url,
        policy,
        reverse_path=reverse_path,
        extra_html=footer_html,
        not_tracked=not_tracked,
        click_base_url=click_base_url,
        log_timeout=log_timeout,
    )
