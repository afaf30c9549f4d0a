"""Prometheus metrics: what the relay, the tracking stage and the pixel endpoint count.

The counters already kept by the parts (:class:`~smtp_tracker.smtp.handler.RelayHandler`,
:class:`~smtp_tracker.tracking.stage.Tracker`, the event writer and limiter of
the pixel endpoint, :class:`~smtp_tracker.smtp.listener.ConnectionSlots`) are
read at scrape time by :class:`_PartsCollector`, so the hot paths pay nothing
for metrics.  Three things no part counted are measured by small hooks:
upstream connect and reply times and connect failures
(:class:`UpstreamMetrics`, an :class:`~smtp_tracker.smtp.upstream.UpstreamObserver`),
and open and click verdicts (:meth:`Metrics.counting_verdicts`, around the
store's classifier).

:class:`Metrics` serves them in the Prometheus text format (version 0.0.4) on
``metrics_listen`` over plain HTTP, ``GET /metrics``.  Every name starts with
``smtp_tracker_``; ``docs/metrics.md`` lists them.  One process, one registry:
``serve`` and a stand-alone ``pixel`` process each serve their own, on their
own ``metrics_listen``.
"""

from __future__ import annotations

import platform
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, Info
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from smtp_tracker import __version__
from smtp_tracker.errors import UpstreamAuthError, UpstreamError, UpstreamTLSError
from smtp_tracker.store.records import EventContext

if TYPE_CHECKING:
    from smtp_tracker.smtp.handler import RelayHandler
    from smtp_tracker.smtp.listener import ConnectionSlots
    from smtp_tracker.store.writer import EventWriter
    from smtp_tracker.tracking.stage import Tracker
    from smtp_tracker.web.public.limits import EventLimiter

__all__ = [
    "METRICS_PATH",
    "Metrics",
    "MetricsSource",
    "UpstreamMetrics",
    "WorkerMetrics",
    "merge_families",
]

#: What a store classifier returns: a tuple whose first item is the verdict.
_J = TypeVar("_J", bound=tuple[Any, ...])

#: The path Prometheus scrapes.
METRICS_PATH: Final = "/metrics"
#: The text format every Prometheus server reads; our names and labels need
#: nothing newer (prometheus_client's latest, 1.0.0, is for UTF-8 names).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Upstream connect (TCP, implicit TLS, greeting) buckets, in seconds.
_CONNECT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Upstream reply buckets, in seconds (DATA replies may wait for content filters).
_REPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class MetricsSource(Protocol):
    """What :class:`Metrics` reads at scrape time (:class:`~smtp_tracker.app.Application`).

    Each part is None until it runs (or when it does not run in this process).
    """

    @property
    def relay_handler(self) -> RelayHandler | None:
        """The SMTP relay handler."""

    @property
    def lmtp_handler(self) -> RelayHandler | None:
        """The LMTP listener's handler (``lmtp = true``)."""

    @property
    def tracker(self) -> Tracker | None:
        """The tracking stage."""

    @property
    def event_writer(self) -> EventWriter | None:
        """The pixel and click endpoint's event writer."""

    @property
    def limiter(self) -> EventLimiter:
        """The open and click rate limiter."""

    @property
    def connection_slots(self) -> ConnectionSlots:
        """The SMTP listener's connection slots."""


class UpstreamMetrics:
    """The upstream's timings, reply classes and connect failures, as they happen.

    An :class:`~smtp_tracker.smtp.upstream.UpstreamObserver`; its methods run
    in the event loop and do not block.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connect_seconds = Histogram(
            "smtp_tracker_upstream_connect_seconds",
            "Time to connect to the upstream: TCP, implicit TLS and its greeting, in seconds.",
            buckets=_CONNECT_BUCKETS,
            registry=registry,
        )
        self.reply_seconds = Histogram(
            "smtp_tracker_upstream_reply_seconds",
            "Time the upstream took to reply to MAIL, RCPT and DATA, in seconds.",
            ["command"],
            buckets=_REPLY_BUCKETS,
            registry=registry,
        )
        self.replies = PromCounter(
            "smtp_tracker_upstream_replies",
            "Upstream replies to MAIL, RCPT and DATA, by command and reply class.",
            ["command", "class"],
            registry=registry,
        )
        self.connect_failures = PromCounter(
            "smtp_tracker_upstream_connect_failures",
            "Failed upstream connections, by reason (tls, auth, unavailable).",
            ["reason"],
            registry=registry,
        )
        for reason in ("tls", "auth", "unavailable"):
            self.connect_failures.labels(reason)

    def connected(self, seconds: float) -> None:
        """See :meth:`~smtp_tracker.smtp.upstream.UpstreamObserver.connected`."""
        self.connect_seconds.observe(seconds)

    def connect_failed(self, error: UpstreamError) -> None:
        """See :meth:`~smtp_tracker.smtp.upstream.UpstreamObserver.connect_failed`."""
        if isinstance(error, UpstreamTLSError):
            reason = "tls"
        elif isinstance(error, UpstreamAuthError):
            reason = "auth"
        else:
            reason = "unavailable"
        self.connect_failures.labels(reason).inc()

    def replied(self, command: str, code: int, seconds: float) -> None:
        """See :meth:`~smtp_tracker.smtp.upstream.UpstreamObserver.replied`."""
        self.reply_seconds.labels(command).observe(seconds)
        self.replies.labels(command, f"{code // 100}xx").inc()


class _VerdictCounts:
    """Open and click events by verdict, counted as the store classifies them.

    The store classifies in its writer thread; scrapes read from the event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def wrap(self, classifier: Callable[[EventContext], _J]) -> Callable[[EventContext], _J]:
        def counted(context: EventContext) -> _J:
            judged = classifier(context)  # (verdict, reason, ...), passed on as it is
            with self._lock:
                self._counts[(context.kind, str(judged[0]))] += 1
            return judged

        return counted

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


class _PartsCollector(Collector):
    """Reads the parts' own counters at scrape time."""

    def __init__(self, source: MetricsSource, verdicts: _VerdictCounts) -> None:
        self._source = source
        self._verdicts = verdicts

    def collect(self) -> Iterator[Metric]:
        source = self._source
        yield from _relay_metrics(source.relay_handler, source.connection_slots)
        yield from _lmtp_metrics(source.lmtp_handler)
        tracker = source.tracker
        writer = source.event_writer
        depths = GaugeMetricFamily(
            "smtp_tracker_queue_depth",
            "Items waiting: rewrite (messages waiting for a rewrite thread), events (opens "
            "and clicks waiting for the store).",
            labels=["queue"],
        )
        failed = CounterMetricFamily(
            "smtp_tracker_store_writes_failed",
            "Records the tracking store failed to write, by what: message (a relayed "
            "message, still relayed) or event (an open or click, lost).",
            labels=["what"],
        )
        if tracker is not None:
            yield from _tracking_metrics(tracker)
            depths.add_metric(["rewrite"], tracker.waiting)
            failed.add_metric(["message"], tracker.counters.record_failed)
        if writer is not None:
            yield from _event_metrics(writer, source.limiter, self._verdicts.snapshot())
            depths.add_metric(["events"], writer.pending)
            failed.add_metric(["event"], writer.failed)
        if tracker is not None or writer is not None:
            yield depths
            yield failed
        webhooks = getattr(source, "webhooks", None)  # the Application's WebhookSender
        if webhooks is not None:
            yield from webhooks.metrics()


def _relay_metrics(handler: RelayHandler | None, slots: ConnectionSlots) -> Iterator[Metric]:
    if handler is None:
        return
    counts = handler.counters
    outcomes = CounterMetricFamily(
        "smtp_tracker_transactions",
        "Mail transactions ended, by outcome: relayed (upstream 2xx), deferred (4xx, "
        "the upstream's or ours), bounced (5xx), aborted (RSET, QUIT, drop before the end).",
        labels=["outcome"],
    )
    for outcome, key in (
        ("relayed", "relayed"),
        ("deferred", "deferred"),
        ("bounced", "rejected"),
        ("aborted", "aborted"),
    ):
        outcomes.add_metric([outcome], counts[key])
    yield outcomes
    yield CounterMetricFamily(
        "smtp_tracker_upstream_errors",
        "Upstream connections that failed or were lost (answered 4xx by us).",
        value=counts["upstream_failures"],
    )
    yield CounterMetricFamily(
        "smtp_tracker_bare_line_endings",
        "Messages received with a bare CR or LF, relayed with CRLF.",
        value=counts["bare_line_endings"],
    )
    yield GaugeMetricFamily(
        "smtp_tracker_transactions_active",
        "Mail transactions between an accepted MAIL and their end.",
        value=handler.active_transactions,
    )
    yield GaugeMetricFamily(
        "smtp_tracker_sessions_active",
        "SMTP connections open now (of max_connections).",
        value=slots.active,
    )
    yield CounterMetricFamily(
        "smtp_tracker_connections_refused",
        "SMTP connections refused because max_connections were open.",
        value=slots.refused,
    )
    yield from _upstream_metrics(handler)


def _lmtp_metrics(handler: RelayHandler | None) -> Iterator[Metric]:
    """The LMTP listener's recipients, each relayed as a transaction of its own."""
    if handler is None:
        return
    counts = handler.counters
    outcomes = CounterMetricFamily(
        "smtp_tracker_lmtp_recipients",
        "Recipients of LMTP deliveries, each relayed as its own copy, by outcome: relayed "
        "(upstream 2xx), deferred (4xx), bounced (5xx).",
        labels=["outcome"],
    )
    for outcome, key in (("relayed", "relayed"), ("deferred", "deferred"), ("bounced", "rejected")):
        outcomes.add_metric([outcome], counts[key])
    yield outcomes


def _upstream_metrics(handler: RelayHandler) -> Iterator[Metric]:
    """Each upstream's and copy's state, and what it carried and failed (issue 21)."""
    labels = ["upstream", "role"]
    up = GaugeMetricFamily(
        "smtp_tracker_upstream_up",
        "Whether each upstream (and copy) takes transactions now (1), or is skipped after "
        "failing until its probe finds it back (0).",
        labels=labels,
    )
    carried = CounterMetricFamily(
        "smtp_tracker_upstream_carried",
        "Messages each upstream (and copy) accepted: 2xx to the end of data.",
        labels=labels,
    )
    failed = CounterMetricFamily(
        "smtp_tracker_upstream_failed",
        "Transactions each upstream (and copy) failed before the end: connection, TLS, AUTH, "
        "421 (the transaction then went to the next upstream, or was deferred).",
        labels=labels,
    )
    kept = GaugeMetricFamily(
        "smtp_tracker_upstream_pool_idle",
        "Connections to each upstream (and copy) kept open for the next transaction "
        "(at most upstream_pool_size).",
        labels=labels,
    )
    reuses = CounterMetricFamily(
        "smtp_tracker_upstream_pool_reuses",
        "Transactions each upstream (and copy) carried on a kept connection instead of a new one.",
        labels=labels,
    )
    pool = handler.upstreams.pool
    for health in handler.upstreams.all_health():
        values = [health.label, health.role]
        up.add_metric(values, 1 if health.up else 0)
        carried.add_metric(values, health.carried)
        failed.add_metric(values, health.failed)
        stats = pool.stats(health.settings)
        kept.add_metric(values, stats.idle)
        reuses.add_metric(values, stats.reuses)
    yield up
    yield carried
    yield failed
    yield kept
    yield reuses


def _tracking_metrics(tracker: Tracker) -> Iterator[Metric]:
    counts = tracker.counters
    reasons = {r: n for r, n in tracker.not_tracked_reasons.items() if r != "rewrite-failed"}
    rewrites = CounterMetricFamily(
        "smtp_tracker_rewrites",
        "Pixel rewrites by result: tracked, not_tracked (see "
        "smtp_tracker_rewrites_not_tracked_total), failed_open, timed_out and busy "
        "(each of the last three relayed the original).",
        labels=["result"],
    )
    rewrites.add_metric(["tracked"], counts.tracked)
    rewrites.add_metric(["not_tracked"], sum(reasons.values()))
    rewrites.add_metric(["failed_open"], counts.rewrite_failed)
    rewrites.add_metric(["timed_out"], counts.rewrite_timeouts)
    rewrites.add_metric(["busy"], counts.rewrite_busy)
    yield rewrites
    not_tracked = CounterMetricFamily(
        "smtp_tracker_rewrites_not_tracked",
        "Messages relayed untracked by choice, by reason (not-html, dkim-signed, ...).",
        labels=["reason"],
    )
    for reason, count in sorted(reasons.items()):
        not_tracked.add_metric([reason], count)
    yield not_tracked
    yield CounterMetricFamily(
        "smtp_tracker_rewrites_queued",
        "Messages that waited for a rewrite thread.",
        value=counts.rewrite_queued,
    )


def _event_metrics(
    writer: EventWriter, limiter: EventLimiter, verdicts: dict[tuple[str, str], int]
) -> Iterator[Metric]:
    events = CounterMetricFamily(
        "smtp_tracker_events",
        "Opens and clicks of known tokens classified, by kind and verdict.",
        labels=["kind", "verdict"],
    )
    for (kind, verdict), count in sorted(verdicts.items()):
        events.add_metric([kind, verdict], count)
    yield events
    yield CounterMetricFamily(
        "smtp_tracker_events_offered",
        "Opens and clicks with a well-formed token, within the limits, offered to the writer.",
        value=writer.offered,
    )
    yield CounterMetricFamily(
        "smtp_tracker_events_unknown",
        "Opens and clicks whose token the store does not know.",
        value=writer.unknown,
    )
    yield CounterMetricFamily(
        "smtp_tracker_events_dropped",
        "Opens and clicks dropped: the queue was full or the writer stopping.",
        value=writer.dropped,
    )
    limited = CounterMetricFamily(
        "smtp_tracker_events_limited",
        "Opens and clicks not recorded because of a rate limit, by limit (token, client).",
        labels=["limit"],
    )
    limited.add_metric(["token"], limiter.limited_token)
    limited.add_metric(["client"], limiter.limited_client)
    yield limited


class Metrics:
    """The registry of one process and its ``/metrics`` HTTP listener.

    :param source: the parts to read at scrape time.
    """

    def __init__(self, source: MetricsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        #: the upstream observer to give :class:`~smtp_tracker.smtp.upstream.UpstreamSettings`
        self.upstream = UpstreamMetrics(self.registry)
        self._verdicts = _VerdictCounts()
        Info("smtp_tracker_build", "The running version.", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.registry.register(_PartsCollector(source, self._verdicts))
        self._runner: web.AppRunner | None = None
        #: the port bound (after :meth:`start`)
        self.port: int | None = None

    def counting_verdicts(
        self, classifier: Callable[[EventContext], _J]
    ) -> Callable[[EventContext], _J]:
        """``classifier``, counting each verdict it gives (``smtp_tracker_events_total``)."""
        return self._verdicts.wrap(classifier)

    def exposition(self) -> bytes:
        """The metrics now, in the Prometheus text format 0.0.4."""
        return generate_latest(self.registry)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Serve ``GET /metrics`` over plain HTTP on ``host:port``.

        :param reuse_port: bind with ``SO_REUSEPORT`` (a worker, whose port the
            supervisor holds: :mod:`smtp_tracker.workers`).
        :returns: the port bound (``port`` resolved when 0).
        :raises StartupError: when the address cannot be bound.
        """
        from smtp_tracker.web.site import start_site

        app = web.Application()
        app.router.add_get(METRICS_PATH, self._serve)
        self._runner, self.port = await start_site(
            app, host=host, port=port, ssl_context=None, reuse_port=reuse_port
        )
        return self.port

    async def _serve(self, request: web.Request) -> web.Response:
        # collecting reads plain ints; the text for a few hundred series takes
        # well under a millisecond, so it runs in the loop, where the counters live
        body = self.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def stop(self) -> None:
        """Close the listener (scrapes in progress are cut)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class _Families(Collector):
    """Metric families already built, yielded as they are (one scrape's registry)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_families(expositions: list[str]) -> list[Metric]:
    """The families of several processes' expositions, one view: values summed per series.

    Counters, gauges and histograms (each bucket, ``_sum`` and ``_count``) are
    summed per name and label set; a gauge named ``*_info`` (an ``Info``: the
    value 1 with labels) keeps the largest value instead.  ``*_created``
    samples (a process's start time, meaningless summed) are left out.

    :param expositions: texts in the Prometheus text format 0.0.4.
    :returns: the merged families, in the order first seen.
    :raises ValueError: when a text does not parse (``prometheus_client.parser``).
    """
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            series = values[family.name]
            keep_max = family.type == "gauge" and family.name.endswith("_info")
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in series:
                    series[key] = sample.value
                elif keep_max:
                    series[key] = max(series[key], sample.value)
                else:
                    series[key] += sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


class WorkerMetrics:
    """The supervisor's ``/metrics`` with ``workers = N``: every worker's, summed.

    Each worker serves its own registry on a private loopback port; a scrape of
    this listener fetches each worker's ``/metrics`` (in parallel, each within
    ``timeout_s``), parses the texts with ``prometheus_client.parser`` and
    serves them merged (:func:`merge_families`), with ``smtp_tracker_workers``
    (the workers configured) and ``smtp_tracker_worker_up{worker}`` (1 when that
    worker answered this scrape; a worker that did not is missing from the
    sums, and a restarted worker's counters start again from 0, which
    Prometheus' ``rate()`` reads as a counter reset).

    :param ports: each worker's metrics port on ``host``, by worker index.
    """

    def __init__(self, ports: list[int], *, host: str = "127.0.0.1", timeout_s: float = 5.0):
        self.ports = ports
        self.host = host
        self.timeout_s = timeout_s
        self._runner: web.AppRunner | None = None
        self._session: Any = None
        #: the port bound (after :meth:`start`)
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Serve ``GET /metrics`` over plain HTTP on ``host:port``.

        :returns: the port bound (``port`` resolved when 0).
        :raises StartupError: when the address cannot be bound.
        """
        import aiohttp

        from smtp_tracker.web.site import start_site

        app = web.Application()
        app.router.add_get(METRICS_PATH, self._serve)
        self._runner, self.port = await start_site(app, host=host, port=port, ssl_context=None)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s), trust_env=False
        )
        return self.port

    async def _fetch(self, port: int) -> str | None:
        import aiohttp

        url = f"http://{self.host}:{port}{METRICS_PATH}"
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    return None
                text: str = await response.text()
                return text
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def exposition(self) -> bytes:
        """Every worker's metrics now, merged, in the Prometheus text format 0.0.4."""
        import asyncio

        texts = await asyncio.gather(*(self._fetch(port) for port in self.ports))
        families = merge_families([text for text in texts if text is not None])
        workers = GaugeMetricFamily(
            "smtp_tracker_workers", "The serve worker processes configured (workers)."
        )
        workers.add_metric([], len(self.ports))
        up = GaugeMetricFamily(
            "smtp_tracker_worker_up",
            "Whether each worker answered this scrape (1); a worker that did not (0) is "
            "missing from every other series.",
            labels=["worker"],
        )
        for index, text in enumerate(texts):
            up.add_metric([str(index)], 0 if text is None else 1)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families([*families, workers, up]))
        return generate_latest(registry)

    async def _serve(self, request: web.Request) -> web.Response:
        try:
            body = await self.exposition()
        except ValueError:  # a worker's text did not parse: never a partial sum
            return web.Response(status=500, text="a worker's metrics did not parse\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def stop(self) -> None:
        """Close the listener and the client session."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
