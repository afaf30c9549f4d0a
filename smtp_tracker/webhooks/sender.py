"""The webhook sender: delivers the outbox to each webhook and to ``events_log``.

One task per target takes the due deliveries from the outbox (oldest first,
at most one per message at a time, so a message's events arrive in order),
POSTs each event as its own signed JSON request (:mod:`.signing`), several at
once, and writes back what became of each:

* a 2xx answer is the only success: the delivery is deleted;
* ``410 Gone`` disables the hook (logged; its pending deliveries become
  dead) until ``smtp-tracker webhooks retry --all``;
* anything else (a refused connection, a timeout, a 3xx: redirects are not
  followed, a 4xx or 5xx) is retried with exponential backoff and jitter:
  ``backoff_base_s * 2**(attempts - 1)``, at most ``backoff_max_s``, times a
  random factor between 0.5 and 1, until ``webhook_retry_hours`` after the
  event, when the delivery goes to the dead-letter state.

A delivery is taken with a lease (its due time moved past the attempt's
timeout), so two processes on one store never send the same event at once,
and one killed mid-attempt sends it again after the lease: delivery is at
least once, and receivers deduplicate on ``webhook-id``.

Nothing here can hold the mail: the outbox is written by the store (fail
open), and the sender only reads it.

The outbox is in the tracking store: SQLite's file in ``data_dir``, or the
PostgreSQL database ``store`` names, where the sender keeps a connection of
its own, made again by itself after the server was away (the outage logged
once, the deliveries resumed without a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from smtp_tracker import __version__
from smtp_tracker.errors import SMTPReply, StartupError, StoreError
from smtp_tracker.store import instant
from smtp_tracker.store.backends import is_postgresql
from smtp_tracker.tracking.stage import header_fields
from smtp_tracker.webhooks import outbox
from smtp_tracker.webhooks.eventlog import EventLog
from smtp_tracker.webhooks.events import Event
from smtp_tracker.webhooks.outbox import Claimed, Outbox, Settled
from smtp_tracker.webhooks.settings import EVENTS_LOG_HOOK, WebhookSettings
from smtp_tracker.webhooks.signing import read_secret, signature_headers

__all__ = ["LATENCY_BUCKETS_S", "SenderCounters", "WebhookSender"]

log = logging.getLogger("smtp_tracker.webhooks")

_T = TypeVar("_T")

#: Upper bounds of the delivery latency histogram (event written → 2xx), in seconds.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


@dataclass(slots=True)
class SenderCounters:
    """What the sender counts, per target name.

    :ivar delivered: deliveries answered 2xx (or lines written to ``events_log``).
    :ivar failed: attempts that failed (each retry counts).
    :ivar retried: failed attempts rescheduled.
    :ivar dead: deliveries moved to the dead-letter state (retry time over, or a 410).
    :ivar latency_buckets: delivered per :data:`LATENCY_BUCKETS_S` bound (cumulative
        at read time), with the sum in :attr:`latency_sum_s`.
    """

    delivered: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    latency_count: int = 0
    latency_sum_s: float = 0.0

    def add(self, name: str, hook: str, by: int = 1) -> None:
        counts: dict[str, int] = getattr(self, name)
        counts[hook] = counts.get(hook, 0) + by

    def total(self, name: str) -> int:
        """The sum over targets of counter *name*."""
        counts: dict[str, int] = getattr(self, name)
        return sum(counts.values())

    def observe_latency(self, seconds: float) -> None:
        self.latency_count += 1
        self.latency_sum_s += seconds
        for index, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.latency_buckets[index] += 1
                break


@dataclass(frozen=True, slots=True)
class _Hook:
    settings: WebhookSettings
    key: bytes
    ssl: ssl.SSLContext | bool


class WebhookSender:
    """The outbox's hook for the store, and the tasks that deliver it.

    Build with :meth:`build` (reads the secrets), :meth:`start` in the running
    loop, :meth:`stop` at the end.  Give :attr:`outbox` to the store
    (:meth:`~smtp_tracker.store.sqlite.SqliteStore.set_outbox`).

    :param data_dir: the store's directory (a connection of the sender's own).
    :param store: the ``store`` key: a ``postgresql://`` DSN puts the outbox on that
        server (*data_dir* is then unused); None, SQLite in *data_dir*.
    :param password_file: ``store_password_file``, for PostgreSQL.
    :param hooks: the webhooks with their HMAC keys and TLS contexts.
    :param events_log: the NDJSON file, or None.
    :param max_events: ``webhook_outbox_max_events``.
    :param retry_hours: ``webhook_retry_hours``.
    :param timeout_s: each attempt's time limit, connect to answer, in seconds.
    :param backoff_base_s: the first retry's delay (before jitter), in seconds.
    :param backoff_max_s: the longest delay between two attempts, in seconds.
    :param concurrency: attempts in flight per webhook.
    :param poll_interval_s: how often the outbox is read when nothing woke the
        sender (events written by another process, retries coming due), in seconds.
    :param coalesce_s: how long new events gather before they are claimed, in seconds.
    """

    def __init__(
        self,
        data_dir: Path,
        hooks: Sequence[_Hook],
        *,
        store: str | None = None,
        password_file: Path | None = None,
        events_log: Path | None = None,
        max_events: int = 100_000,
        retry_hours: float = 24.0,
        timeout_s: float = 10.0,
        backoff_base_s: float = 5.0,
        backoff_max_s: float = 3600.0,
        concurrency: int = 16,
        poll_interval_s: float = 2.0,
        coalesce_s: float = 0.05,
    ) -> None:
        self._data_dir = data_dir
        self._dsn = store if is_postgresql(store) else None
        self._password_file = password_file
        self._errors: tuple[type[Exception], ...] = (sqlite3.Error, StoreError)
        if self._dsn is not None:
            import psycopg

            self._errors += (psycopg.Error,)
        self._unreachable = False
        self._hooks = {hook.settings.hook: hook for hook in hooks}
        self.event_log = EventLog(events_log) if events_log is not None else None
        targets: list[outbox.Target] = [(hook.settings.hook, hook.settings.wants) for hook in hooks]
        if self.event_log is not None:
            targets.append((EVENTS_LOG_HOOK, lambda _type, _counted: True))
        self.outbox = Outbox(targets, max_events=max_events, on_written=self._woken_from_thread)
        self._retry_us = int(retry_hours * 3600 * 1_000_000)
        self._timeout_s = timeout_s
        self._backoff = (backoff_base_s, backoff_max_s)
        self._concurrency = concurrency
        self._poll_s = poll_interval_s
        self._coalesce_s = coalesce_s
        self._lease_us = int((timeout_s * 2 + 5) * 1_000_000)
        self.counters = SenderCounters()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="webhooks")
        self._conn: outbox.Conn | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wakes: list[asyncio.Event] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing: set[str] = set()
        #: current outbox depth (events), read by each round
        self.depth = 0

    @classmethod
    def build(
        cls, data_dir: Path, hooks: Sequence[WebhookSettings], **options: Any
    ) -> WebhookSender:
        """Read each hook's secret and CA file (blocking), then construct.

        :raises StartupError: one line naming the hook and the file that cannot be used.
        """
        built = []
        for settings in hooks:
            try:
                key = read_secret(settings.secret_file)
            except ValueError as exc:
                raise StartupError(f"webhooks: {settings.hook}: secret_file: {exc}") from None
            context: ssl.SSLContext | bool = True
            if settings.ca_file is not None:
                try:
                    context = ssl.create_default_context(cafile=str(settings.ca_file))
                except (OSError, ssl.SSLError):
                    raise StartupError(
                        f"webhooks: {settings.hook}: ca_file: cannot load {settings.ca_file} "
                        "as PEM certificates"
                    ) from None
            built.append(_Hook(settings, key, context))
        return cls(data_dir, built, **options)

    @property
    def targets(self) -> list[str]:
        """The names of the webhooks, and ``events_log`` when configured."""
        return [*self._hooks, *([EVENTS_LOG_HOOK] if self.event_log is not None else [])]

    # -- life cycle ----------------------------------------------------------------------

    async def start(self, *, deliver: bool = True) -> None:
        """Open the sender's connection and start one task per target.

        A store that cannot be opened here is logged and leaves the sender
        idle: mail and records go on.

        :param deliver: start the delivery tasks; False: only write events (and
            keep the disabled hooks current), another process delivers them.
        """
        self._loop = asyncio.get_running_loop()
        try:
            self._conn = await self._db(self._open)
            self.outbox.disabled = await self._db(lambda: outbox.disabled_hooks(self._conn_()))
            self.depth = await self._db(lambda: outbox.repair(self._conn_()))
        except self._errors as exc:
            if self._dsn is None:
                log.error("webhooks: cannot open the outbox (%s); no events will be sent", exc)
                return
            self._failing_store(exc)  # PostgreSQL: tried again each round until it answers
        for hook in sorted(self.outbox.disabled & set(self._hooks)):
            log.warning(
                "webhook %s is disabled (it answered 410 Gone); 'smtp-tracker "
                "webhooks retry --all' enables it again",
                hook,
            )
        if not deliver:
            self._tasks.append(asyncio.create_task(self._follow(), name="webhook outbox"))
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            headers={"User-Agent": f"smtp-tracker/{__version__}"},
        )
        for name in self.targets:
            wake = asyncio.Event()
            self._wakes.append(wake)
            self._tasks.append(asyncio.create_task(self._run(name, wake), name=f"webhook {name}"))

    async def stop(self) -> None:
        """Stop the tasks (an attempt in flight is sent again after a restart), close."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._db(lambda: _close(conn))
        if self.event_log is not None:
            await self._db(self.event_log.close)
        self._executor.shutdown(wait=False)
        log.info(
            "webhook counters: delivered=%d, failed=%d, retried=%d, dead=%d, dropped=%d",
            self.counters.total("delivered"),
            self.counters.total("failed"),
            self.counters.total("retried"),
            self.counters.total("dead"),
            self.outbox.dropped,
        )

    async def _follow(self) -> None:
        """Without delivery: keep the disabled hooks and the depth current."""
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                self.outbox.disabled, self.depth = await self._db(self._read_state)
            except self._errors as exc:
                self._failing_store(exc)
            else:
                self._store_answers()

    def _read_state(self) -> tuple[frozenset[str], int]:
        conn = self._conn_()
        return outbox.disabled_hooks(conn), outbox.outbox_depth(conn)

    def wake(self) -> None:
        """Look at the outbox now (in the loop's thread)."""
        for wake in self._wakes:
            wake.set()

    def _woken_from_thread(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self.wake)

    def _open(self) -> outbox.Conn:
        """A connection to the outbox (in the sender's thread).

        :raises sqlite3.Error: SQLite's file cannot be opened.
        :raises StoreError: the PostgreSQL server cannot be reached.
        """
        if self._dsn is None:
            return outbox.connect(self._data_dir)
        return outbox.connect_postgresql(
            self._dsn, password_file=self._password_file, timeout_s=self._timeout_s
        )

    def _conn_(self) -> outbox.Conn:
        """The connection (in the sender's thread); on PostgreSQL made again when the
        server closed or broke it (an outage, a restart)."""
        conn = self._conn
        if self._dsn is not None and (
            conn is None or (not isinstance(conn, sqlite3.Connection) and conn.raw.broken)
        ):
            if conn is not None:
                _close(conn)
            self._conn = conn = None
            self._conn = conn = self._open()
        assert conn is not None, "not started"
        return conn

    def _failing_store(self, exc: BaseException) -> None:
        """Log the outbox's store failing, once until it answers again."""
        if not self._unreachable:
            self._unreachable = True
            log.warning(
                "webhooks: the outbox cannot be read or written (%s); events wait in the "
                "store and are sent when it answers (logged once)",
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            )

    def _store_answers(self) -> None:
        if self._unreachable:
            self._unreachable = False
            log.warning("webhooks: the outbox answers again; delivering")

    async def _db(self, call: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    # -- events that no store record carries ---------------------------------------------

    def refused(self, transaction: Any, reply: SMTPReply, sent: bytes) -> None:
        """``message.deferred`` (4xx) or ``message.bounced`` (5xx) for a message refused
        at the end of data (:class:`~smtp_tracker.smtp.handler.RefusalRecorder`).

        Returns at once: the event is written in the sender's thread; a failure
        is logged and counted, never raised.

        :param transaction: the :class:`~smtp_tracker.smtp.session.Transaction`.
        :param sent: the message as sent upstream (its Message-ID is read from it).
        """
        if self._conn is None and self._dsn is None:
            return
        queue_id = str(transaction.queue_id)
        try:
            event = Event.make(
                "message.deferred" if reply.code // 100 == 4 else "message.bounced",
                occurred_at=datetime.now(UTC),
                tracking_id=None,
                queue_id=queue_id,
                message_id=header_fields(sent)[0],
                sender=transaction.reverse_path,
                recipients=[r.address for r in transaction.accepted],
                reply={
                    "code": reply.code,
                    "enhanced_status": reply.enhanced_status,
                    "text": reply.text,
                },
            )
        except Exception as exc:  # never the mail's problem
            self._not_written(queue_id, exc)
            return

        def write() -> None:
            try:
                conn = self._conn_()
                with outbox.transaction(conn):
                    self.outbox.add(conn, [event])
            except self._errors as exc:
                self._not_written(queue_id, exc)

        with contextlib.suppress(RuntimeError):  # stopped: the executor is shut down
            self._executor.submit(write)

    def _not_written(self, queue_id: str, exc: BaseException) -> None:
        self.outbox.count_failed()
        log.warning("%s: webhook event not written (%s)", queue_id, exc)

    # -- delivering ----------------------------------------------------------------------

    async def _run(self, name: str, wake: asyncio.Event) -> None:
        """Claim, deliver, settle; then wait for new events, the next due time or the poll.

        New events are gathered for :attr:`_coalesce_s` before the next claim, so
        that a burst of mail costs the store a few claims of many events, not a
        write transaction per event (the relay's own records wait on that lock).
        """
        batch = self._concurrency * 4 if name != EVENTS_LOG_HOOK else 1000
        while True:
            wake.clear()
            wait_s = self._poll_s
            try:
                claimed, next_due_us = await self._claim(name, batch)
                if claimed:
                    await self._deliver(name, claimed)
                    if len(claimed) < batch:  # caught up: let the next ones gather
                        await asyncio.sleep(self._coalesce_s)
                    continue
                if next_due_us is not None:
                    wait_s = min(wait_s, max(0.01, (next_due_us - instant.now_us()) / 1_000_000))
            except self._errors as exc:
                self._failing_store(exc)
            try:
                async with asyncio.timeout(wait_s):
                    await wake.wait()
            except TimeoutError:
                continue
            await asyncio.sleep(self._coalesce_s)

    async def _claim(self, name: str, limit: int) -> tuple[list[Claimed], int | None]:
        """Due deliveries of *name*; when none, the time the next one comes due."""
        now_us = instant.now_us()

        def take() -> tuple[list[Claimed], int | None, frozenset[str], int]:
            conn = self._conn_()
            disabled = outbox.disabled_hooks(conn)
            depth = outbox.outbox_depth(conn)
            if name in disabled:
                return [], None, disabled, depth
            taken = []
            if outbox.any_due(conn, name, now_us=now_us):  # no write lock for nothing
                taken = outbox.claim(
                    conn, name, now_us=now_us, limit=limit, lease_us=self._lease_us
                )
            next_due = None if taken else outbox.next_due(conn, name)
            return taken, next_due, disabled, depth

        claimed, next_due_us, disabled, self.depth = await self._db(take)
        self._store_answers()
        self.outbox.disabled = disabled
        return claimed, next_due_us

    async def _deliver(self, name: str, claimed: list[Claimed]) -> None:
        """Send *claimed*: each message's events one after the other, in order, stopping
        at its first failure (the rest released); messages concurrently."""
        gone: Claimed | None = None
        if name == EVENTS_LOG_HOOK:
            results = await self._write_log(claimed)
        else:
            hook = self._hooks[name]
            gate = asyncio.Semaphore(self._concurrency)
            messages: dict[str, list[Claimed]] = {}
            for item in claimed:
                messages.setdefault(item.order_key, []).append(item)

            async def one_message(
                items: list[Claimed],
            ) -> list[tuple[Claimed, int | None, str | None]]:
                done: list[tuple[Claimed, int | None, str | None]] = []
                async with gate:
                    for item in items:
                        status, error = await self._post(hook, item)
                        done.append((item, status, error))
                        if status is None or not 200 <= status < 300:
                            break
                return done

            attempts = [
                attempt
                for done in await asyncio.gather(*map(one_message, messages.values()))
                for attempt in done
            ]
            tried = {item.seq for item, _, _ in attempts}
            results = [
                self._settled(item, status, error)
                for item, status, error in attempts
                if status != 410
            ]
            results += [
                Settled(item.hook, item.seq, "release", due_us=item.due_us)
                for item in claimed
                if item.seq not in tried
            ]
            gone = next((item for item, status, _ in attempts if status == 410), None)
        await self._db(lambda: outbox.settle(self._conn_(), results))
        if gone is not None:  # after the settle: its pending deliveries are all dead now
            await self._disable(name, gone)
        self._note(name, results)
        created = {item.seq: item.created_us for item in claimed}
        self.observe([created[r.seq] for r in results if r.outcome == "delivered"])

    async def _post(self, hook: _Hook, item: Claimed) -> tuple[int | None, str | None]:
        """One attempt: the answer's status, or None and why there was none."""
        assert self._session is not None
        body = item.body.encode("utf-8")
        headers = signature_headers(hook.key, item.event_id, int(time.time()), body)
        headers["Content-Type"] = "application/json"
        try:
            async with self._session.post(
                hook.settings.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                ssl=hook.ssl,
            ) as response:
                return response.status, None
        except TimeoutError:
            return None, f"no answer within {self._timeout_s:g} s"
        except aiohttp.ClientSSLError as exc:
            return None, f"TLS: {getattr(exc, 'strerror', None) or type(exc).__name__}"
        except (aiohttp.ClientError, OSError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            return None, str(reason)

    async def _write_log(self, claimed: list[Claimed]) -> list[Settled]:
        assert self.event_log is not None
        event_log = self.event_log
        try:
            await self._db(lambda: event_log.write([item.body for item in claimed]))
        except OSError as exc:
            error = f"{event_log.path}: {exc.strerror or type(exc).__name__}"
            return [self._settled(item, None, error) for item in claimed]
        return [self._settled(item, 200, None) for item in claimed]

    def _settled(self, item: Claimed, status: int | None, error: str | None) -> Settled:
        if status is not None and 200 <= status < 300:
            return Settled(item.hook, item.seq, "delivered")
        if status is not None:
            error = f"HTTP {status}"
        attempts = item.attempts + 1
        now_us = instant.now_us()
        window_end = item.since_us + self._retry_us
        if now_us >= window_end:
            return Settled(item.hook, item.seq, "dead", attempts, now_us, error)
        base, most = self._backoff
        delay_s = min(most, base * 2 ** min(attempts - 1, 62)) * (0.5 + random.random() / 2)  # noqa: S311 - jitter
        due_us = min(now_us + int(delay_s * 1_000_000), window_end)
        return Settled(item.hook, item.seq, "retry", attempts, due_us, error)

    async def _disable(self, name: str, item: Claimed) -> None:
        reason = "410 Gone: hook disabled"
        buried = await self._db(
            lambda: outbox.disable_hook(self._conn_(), name, reason=reason, now_us=instant.now_us())
        )
        self.outbox.disabled = self.outbox.disabled | {name}
        self.counters.add("dead", name, buried)
        log.error(
            "webhook %s answered 410 Gone (event %s): disabled; %d pending events are dead "
            "letters; 'smtp-tracker webhooks retry --all' enables it again",
            name,
            item.event_id,
            buried,
        )

    def _note(self, name: str, results: Sequence[Settled]) -> None:
        delivered = failed = 0
        last_error = None
        for result in results:
            if result.outcome == "delivered":
                delivered += 1
            elif result.outcome == "release":
                continue
            else:
                failed += 1
                last_error = result.error
                self.counters.add("retried" if result.outcome == "retry" else "dead", name)
        self.counters.add("delivered", name, delivered)
        self.counters.add("failed", name, failed)
        if failed and name not in self._failing:
            self._failing.add(name)
            log.warning(
                "webhook %s: delivery failing (%s); retrying with backoff", name, last_error
            )
        elif delivered and not failed and name in self._failing:
            self._failing.discard(name)
            log.info("webhook %s: delivering again", name)

    def observe(self, created_us: Sequence[int]) -> None:
        """Count the delivery latency of events created at *created_us*."""
        now_us = instant.now_us()
        for value in created_us:
            self.counters.observe_latency(max(0, now_us - value) / 1_000_000)

    def metrics(self) -> Iterator[Any]:
        """Prometheus metric families (``prometheus_client``), read at scrape time."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        counters = self.counters
        for name, text in (
            ("delivered", "Events delivered (2xx) per webhook, or written to events_log."),
            ("failed", "Delivery attempts that failed, per webhook."),
            ("retried", "Failed attempts rescheduled with backoff, per webhook."),
            ("dead", "Deliveries moved to the dead-letter state, per webhook."),
        ):
            family = CounterMetricFamily(f"smtp_tracker_webhook_{name}", text, labels=["hook"])
            for hook in self.targets:
                family.add_metric([hook], getattr(counters, name).get(hook, 0))
            yield family
        dropped = CounterMetricFamily(
            "smtp_tracker_webhook_dropped",
            "Events dropped because the outbox was full (webhook_outbox_max_events), or lost "
            "because writing them failed.",
            labels=["why"],
        )
        dropped.add_metric(["full"], self.outbox.dropped)
        dropped.add_metric(["error"], self.outbox.failed)
        yield dropped
        yield GaugeMetricFamily(
            "smtp_tracker_webhook_outbox_depth", "Events in the outbox.", value=self.depth
        )
        buckets, running = [], 0
        for bound, count in zip(LATENCY_BUCKETS_S, counters.latency_buckets, strict=True):
            running += count
            buckets.append((repr(bound), running))
        buckets.append(("+Inf", counters.latency_count))
        yield HistogramMetricFamily(
            "smtp_tracker_webhook_latency_seconds",
            "Seconds from an event's occurrence to its 2xx.",
            buckets=buckets,
            sum_value=counters.latency_sum_s,
        )


def _close(conn: outbox.Conn) -> None:
    if isinstance(conn, sqlite3.Connection):
        conn.close()
    else:
        conn.raw.close()
