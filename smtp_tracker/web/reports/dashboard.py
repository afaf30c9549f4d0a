"""The reports dashboard: server-rendered pages over the reports store, no JavaScript.

Pages (``GET``, behind the login of :mod:`.auth`)
    ``/``: the overview of a period (default: the last 30 UTC days): relayed,
    tracked, opened and open rate; opens per day as an SVG bar chart stacked
    by verdict, built here (:func:`opens_chart`); the figures per sender
    domain with the opens split by verdict.
    ``/messages``: the messages, newest first, with a search box (``q``: a
    Message-ID, queue id or tracking id) and filters (sender, sender domain,
    recipient, since, until, opened), 50 per page, keyset-paged ("Older").
    ``/messages/{id}``: one message with its open timeline (verdict and
    reason of each open) and its clicks.

"Opened" counts the verdicts ``human`` and ``mail_proxy`` (a person's mail
client, or a provider's image proxy fetching for a reader); the other
verdicts are shown beside them, never hidden.  Every figure comes from the
reports store (:class:`~smtp_tracker.web.reports.api.ReportsStore`): this
module writes no SQL.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web

from smtp_tracker.errors import StoreError
from smtp_tracker.store.queries import (
    COUNTED_VERDICTS,
    VERDICTS,
    StatsRow,
    stats_total,
)
from smtp_tracker.web.reports.api import (
    API_PREFIX,
    REPORTS_STORE_KEY,
    find_message_detail,
    parse_message_filter,
    parse_stats_query,
)
from smtp_tracker.web.reports.templating import render, setup_site

__all__ = [
    "CHART_HEIGHT",
    "CHART_MAX_DAYS",
    "DEFAULT_PERIOD_DAYS",
    "MESSAGES_PAGE_SIZE",
    "VERDICT_LABELS",
    "VERDICT_ORDER",
    "ChartColumn",
    "ChartSegment",
    "OpensChart",
    "install_dashboard",
    "opens_chart",
]

logger = logging.getLogger(__name__)

#: Days the overview shows when no period is given (ending today, UTC).
DEFAULT_PERIOD_DAYS: Final = 30
#: Longest period the overview charts, in days.
CHART_MAX_DAYS: Final = 366
#: Messages per page of ``/messages``.
MESSAGES_PAGE_SIZE: Final = 50
#: Height of the chart's plot area, in CSS pixels (the SVG is drawn 1:1 vertically).
CHART_HEIGHT: Final = 200
#: Sender domains listed on the overview (the most relayed first).
DOMAINS_SHOWN: Final = 100

#: How each verdict is named on the pages.
VERDICT_LABELS: Final[Mapping[str, str]] = {
    "human": "Human",
    "mail_proxy": "Mail proxy",
    "privacy_proxy": "Privacy proxy",
    "scanner": "Scanner",
    "unknown": "Unknown",
}

#: The verdicts in the order the pages show them: the counted ones first (bottom of the bars).
VERDICT_ORDER: Final[tuple[str, ...]] = tuple(
    sorted(VERDICTS, key=lambda verdict: verdict not in COUNTED_VERDICTS)
)

_SLOT_WIDTH = 10.0  # SVG units per day; the SVG stretches to the page width
_BAR_WIDTH = 7.0
_PAD_TOP = 8  # room for the top tick label
_PAD_BOTTOM = 8
_MESSAGE_FILTER_FIELDS = ("q", "sender", "sender_domain", "recipient", "since", "until", "opened")


# -- the chart ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChartSegment:
    """One verdict's part of a day's bar, in SVG units (y grows downwards)."""

    verdict: str
    count: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class ChartColumn:
    """One day: its stacked segments (counted verdicts at the bottom) and a description."""

    day: date
    opens: int
    segments: tuple[ChartSegment, ...]
    title: str


@dataclass(frozen=True, slots=True)
class OpensChart:
    """Opens per day, ready for the template.

    :param width: SVG user units across (``columns`` times 10); the bars SVG is
        stretched to the page's width (``preserveAspectRatio="none"``).
    :param height: SVG user units down, drawn 1:1 in CSS pixels.
    :param ticks: (value, y) of each horizontal grid line, 0 first.
    :param max_opens: the largest day's opens (0: nothing to show).
    """

    width: float
    height: int
    columns: tuple[ChartColumn, ...]
    ticks: tuple[tuple[int, float], ...]
    max_opens: int
    baseline: float

    @property
    def first_day(self) -> date:
        return self.columns[0].day

    @property
    def last_day(self) -> date:
        return self.columns[-1].day

    @property
    def middle_day(self) -> date:
        return self.columns[len(self.columns) // 2].day


def _nice_step(top: int, max_ticks: int = 5) -> int:
    """The grid step (1, 2 or 5 times a power of 10) showing *top* in at most *max_ticks*."""
    if top <= 0:
        return 1
    exponent: int = 10 ** max(0, math.floor(math.log10(top / max_ticks)))
    for multiple in (1, 2, 5, 10):
        if top / (multiple * exponent) <= max_ticks:
            return multiple * exponent
    return 10 * exponent


def opens_chart(rows: Sequence[StatsRow], *, since: date, until: date) -> OpensChart:
    """Opens per day from *since* to *until* (inclusive), days without a row at 0.

    :param rows: ``query_stats(group="day")`` rows (``key`` is ``YYYY-MM-DD``).
    :raises ValueError: when *until* is before *since*.
    """
    if until < since:
        raise ValueError("until is before since")
    by_day = {row.key: row for row in rows}
    days = [since + timedelta(days=n) for n in range((until - since).days + 1)]
    max_opens = max(
        (by_day[d.isoformat()].opens for d in days if d.isoformat() in by_day), default=0
    )
    step = _nice_step(max_opens)
    top = max(step, math.ceil(max_opens / step) * step)
    plot = CHART_HEIGHT
    baseline = _PAD_TOP + plot
    scale = plot / top
    columns: list[ChartColumn] = []
    for index, day in enumerate(days):
        row = by_day.get(day.isoformat())
        counts = {v: (row.opens_by_verdict.get(v, 0) if row else 0) for v in VERDICT_ORDER}
        x = index * _SLOT_WIDTH + (_SLOT_WIDTH - _BAR_WIDTH) / 2
        y = float(baseline)
        segments: list[ChartSegment] = []
        for verdict in VERDICT_ORDER:
            count = counts[verdict]
            if count <= 0:
                continue
            height = count * scale
            y -= height
            segments.append(ChartSegment(verdict, count, x, round(y, 3), _BAR_WIDTH, height))
        opens = row.opens if row else 0
        parts = ", ".join(
            f"{VERDICT_LABELS[v].lower()} {counts[v]}" for v in VERDICT_ORDER if counts[v]
        )
        title = f"{day.isoformat()}: {opens} opens" + (f" ({parts})" if parts else "")
        if row is not None:
            title += f"; {row.relayed} relayed, {row.opened} opened"
        columns.append(ChartColumn(day, opens, tuple(segments), title))
    ticks = tuple((value, baseline - value * scale) for value in range(0, top + 1, step))
    return OpensChart(
        width=len(days) * _SLOT_WIDTH,
        height=plot + _PAD_TOP + _PAD_BOTTOM,
        columns=tuple(columns),
        ticks=ticks,
        max_opens=max_opens,
        baseline=baseline,
    )


# -- pages ----------------------------------------------------------------------------------


def install_dashboard(app: web.Application) -> None:
    """Add the dashboard's pages to the reports app (which holds ``REPORTS_STORE_KEY``).

    The pages are behind whatever authentication *app* has
    (:func:`~smtp_tracker.web.reports.auth.install_auth`).
    """
    setup_site(app)
    app.router.add_get("/", _overview, name="overview")
    app.router.add_get("/messages", _messages, name="messages")
    app.router.add_get("/messages/{id}", _message, name="message")
    app.middlewares.append(_page_errors)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _page_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Pages' errors as pages: 404/405 in the site's layout, a store failure as 503."""
    if request.path.startswith(API_PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        title = "Not found" if exc.status == 404 else "Method not allowed"
        message = (
            "There is no such page or message here."
            if exc.status == 404
            else "This page does not accept that kind of request."
        )
        response = render(
            request, "error.html", {"title": title, "message": message}, status=exc.status
        )
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = exc.headers.get("Allow", "")
        return response
    except StoreError:
        logger.exception("dashboard: the tracking store cannot be read")
        return render(
            request,
            "error.html",
            {
                "title": "Reports unavailable",
                "message": "The tracking store cannot be read just now. Try again in a moment; "
                "the server's log says more.",
            },
            status=503,
        )


def _today() -> date:
    return datetime.now(UTC).date()


async def _overview(request: web.Request) -> web.StreamResponse:
    query = request.query
    form = {"since": query.get("since", "").strip(), "until": query.get("until", "").strip()}
    error: str | None = None
    status = 200
    until = _today()
    since = until - timedelta(days=DEFAULT_PERIOD_DAYS - 1)
    try:
        params = parse_stats_query({k: v for k, v in form.items() if v})
        until = params.until or (max(_today(), params.since) if params.since else until)
        since = params.since or until - timedelta(days=DEFAULT_PERIOD_DAYS - 1)
        if (until - since).days + 1 > CHART_MAX_DAYS:
            raise ValueError(f"choose a period of at most {CHART_MAX_DAYS} days")
    except ValueError as exc:
        error, status = str(exc), 400
        until = _today()
        since = until - timedelta(days=DEFAULT_PERIOD_DAYS - 1)
    store = request.app[REPORTS_STORE_KEY]
    days = await store.query_stats(since=since, until=until, group="day")
    domains = await store.query_stats(since=since, until=until, group="sender_domain")
    context: dict[str, Any] = {
        "title": "Overview",
        "nav": "overview",
        "form": form,
        "error": error,
        "since": since,
        "until": until,
        "total": stats_total(days),
        "chart": opens_chart(days, since=since, until=until),
        "days": [row for row in days if row.relayed or row.opens],
        "domains": domains[:DOMAINS_SHOWN],
        "domains_more": max(0, len(domains) - DOMAINS_SHOWN),
        "verdicts": VERDICT_ORDER,
        "counted": COUNTED_VERDICTS,
        "verdict_labels": VERDICT_LABELS,
        "domain_link": lambda domain: _messages_url(
            {"sender_domain": domain, "since": since.isoformat(), "until": until.isoformat()}
        ),
    }
    return render(request, "overview.html", context, status=status)


def _messages_url(params: Mapping[str, str]) -> str:
    kept = {name: value for name, value in params.items() if value}
    return "/messages" + (f"?{urlencode(kept)}" if kept else "")


async def _messages(request: web.Request) -> web.StreamResponse:
    query = request.query
    form = {name: query.get(name, "").strip() for name in _MESSAGE_FILTER_FIELDS}
    cursor = query.get("cursor", "").strip() or None
    error: str | None = None
    status = 200
    items: list[Any] = []
    older: str | None = None
    try:
        message_filter = parse_message_filter(form)
        page = await request.app[REPORTS_STORE_KEY].query_messages(
            message_filter, limit=MESSAGES_PAGE_SIZE, cursor=cursor
        )
    except ValueError as exc:
        error, status = str(exc), 400
    else:
        items = page.items
        if page.next_cursor is not None:
            older = _messages_url({**form, "cursor": page.next_cursor})
    context: dict[str, Any] = {
        "title": "Messages",
        "nav": "messages",
        "form": form,
        "error": error,
        "items": items,
        "older": older,
        "newest": _messages_url(form) if cursor else None,
        "filtered": any(form.values()),
    }
    return render(request, "messages.html", context, status=status)


async def _message(request: web.Request) -> web.StreamResponse:
    detail = await find_message_detail(request)
    context: dict[str, Any] = {
        "title": f"Message {detail.summary.message_id or detail.summary.queue_id}",
        "nav": "messages",
        "m": detail.summary,
        "detail": detail,
        "verdict_labels": VERDICT_LABELS,
        "machine_opens": detail.summary.open_count - detail.summary.counted_open_count,
    }
    return render(request, "message.html", context)
