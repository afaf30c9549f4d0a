"""The reports listener's JSON API (aiohttp), separate from the public pixel endpoint.

Routes (all ``GET``, also ``HEAD``; every one behind the app's authentication)
    ``/api/messages``: a page of messages, newest first; filters ``sender``,
    ``sender_domain``, ``recipient``, ``q`` (Message-ID, queue id or tracking
    id, exact), ``since``, ``until`` (ISO 8601 date or datetime, UTC when no
    offset; a date ``until`` includes that whole day), ``opened``,
    ``tracked`` (``true``/``false``), ``limit`` (1-500, default 50) and
    ``cursor`` (the previous page's ``next_cursor``).
    ``/api/messages/{id}``: one message (tracking id, queue id or Message-ID)
    with its opens and clicks, each with its verdict.
    ``/api/stats``: relayed, tracked, opened, opens (per verdict), clicks and
    open rate per UTC relay day or per sender domain (``since``, ``until`` as
    dates, ``group=day|sender_domain``).
    ``/api/export.csv``: the messages of ``/api/messages``'s filters as CSV,
    streamed page by page, with a header row.
    ``/api/openapi.json``: the OpenAPI 3.1 description (:mod:`.openapi`).

Errors
    JSON ``{"error": "..."}`` with 400 (bad parameter), 401 (from the
    authentication), 404, 405, 503 (store unreadable) or 500; never an
    exception's text.

Headers
    ``Cache-Control: no-store`` on every ``/api`` response, ``X-Content-Type-Options:
    nosniff``, ``Server: smtp-tracker``; never a CORS header (the API is for
    scripts and the dashboard on the same origin, not for other sites' pages).

Contract with the authentication and the dashboard
    :func:`make_reports_app` takes the authentication as an aiohttp middleware
    (``auth_middleware``), installed outermost but for the body deadline and
    the JSON error translation, so it runs before every route, the
    dashboard's included (the one assembly is
    :func:`smtp_tracker.web.reports.app.build_reports_app`).  It
    must answer 401 to any ``/api`` request without ``Authorization: Bearer
    <token>`` matching ``reports_token_file`` (constant-time comparison).  The
    app is returned unstarted: the dashboard adds its routes (and templates) to
    it before :func:`~smtp_tracker.web.site.start_site`.  The dashboard reads
    the store through the same :class:`ReportsStore` (``app[REPORTS_STORE_KEY]``)
    and may reuse :func:`parse_message_filter` and :func:`parse_stats_query`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Final, Protocol, cast

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from smtp_tracker.errors import StartupError, StoreError
from smtp_tracker.store.export import detail_to_dict, summary_to_dict
from smtp_tracker.store.queries import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MessageDetail,
    MessageFilter,
    MessagePage,
    MessageSummary,
    StatsGroup,
    StatsRow,
    check_limit,
    stats_total,
)
from smtp_tracker.web.site import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    SERVER_HEADER,
    body_deadline,
    handler_args,
)

__all__ = [
    "API_PREFIX",
    "CSV_COLUMNS",
    "REPORTS_STORE_KEY",
    "ReportsStore",
    "StatsQuery",
    "create_token_file",
    "detail_to_dict",
    "find_message_detail",
    "make_reports_app",
    "parse_message_filter",
    "parse_stats_query",
    "stats_row_to_dict",
    "summary_to_dict",
]

logger = logging.getLogger(__name__)

#: Every route of the JSON API starts with this.
API_PREFIX: Final = "/api/"

#: Rows per store read while streaming the CSV export (the app's default).
_EXPORT_PAGE_ROWS = MAX_LIMIT
_EXPORT_PAGE_KEY: Final = web.AppKey("export_page_rows", int)
_MAX_IDENT_CHARS = 1000
_CLIENT_MAX_BYTES = 64 * 1024


class ReportsStore(Protocol):
    """The read side the reports need; :class:`~smtp_tracker.store.sqlite.SqliteStore` has it."""

    async def query_messages(
        self, message_filter: MessageFilter, *, limit: int = ..., cursor: str | None = ...
    ) -> MessagePage:
        """See :func:`smtp_tracker.store.queries.query_messages`."""
        ...

    async def query_message(self, ident: str) -> MessageDetail | None:
        """See :func:`smtp_tracker.store.queries.query_message`."""
        ...

    async def query_stats(
        self, *, since: date | None = ..., until: date | None = ..., group: StatsGroup = ...
    ) -> list[StatsRow]:
        """See :func:`smtp_tracker.store.queries.query_stats`."""
        ...


#: The app's store.
REPORTS_STORE_KEY: Final = web.AppKey("reports_store", ReportsStore)

#: Random bytes of a token made by :func:`create_token_file` (43 URL-safe characters).
_TOKEN_BYTES = 32


def create_token_file(path: Path) -> bool:
    """Write a new random API bearer token to *path* (mode 0600) unless it exists.

    The token is 32 random bytes, URL-safe base64 (RFC 4648 §5), on one line.
    An existing file is left alone, whatever it holds (it is checked when it is
    read, by :func:`smtp_tracker.web.reports.auth.load_reports_token`).

    :returns: whether the file was created.
    :raises StartupError: when it cannot be written.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise StartupError(f"reports_token_file: cannot create {path} ({exc.strerror})") from exc
    try:
        os.fchmod(fd, 0o600)  # the mode given to open() is filtered by the umask
        os.write(fd, (secrets.token_urlsafe(_TOKEN_BYTES) + "\n").encode("ascii"))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise StartupError(f"reports_token_file: cannot write {path} ({exc.strerror})") from exc
    os.close(fd)
    return True


# -- parameters -----------------------------------------------------------------------------

_FILTER_PARAMS = frozenset(
    {"sender", "sender_domain", "recipient", "q", "since", "until", "opened", "tracked"}
)
_LIST_PARAMS = _FILTER_PARAMS | {"limit", "cursor"}
_STATS_PARAMS = frozenset({"since", "until", "group"})


class StatsQuery:
    """The parameters of ``/api/stats``: *since* and *until* days (inclusive), *group*."""

    __slots__ = ("group", "since", "until")

    def __init__(self, *, since: date | None, until: date | None, group: StatsGroup) -> None:
        self.since = since
        self.until = until
        self.group: StatsGroup = group


def _check_names(query: Mapping[str, str], allowed: frozenset[str]) -> None:
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise ValueError(
            f"unknown parameter {unknown[0]!r}; expected one of {', '.join(sorted(allowed))}"
        )


def _text(query: Mapping[str, str], name: str, max_chars: int = _MAX_IDENT_CHARS) -> str | None:
    value = query.get(name, "").strip()
    if not value:
        return None
    if len(value) > max_chars:
        raise ValueError(f"{name}: longer than {max_chars} characters")
    return value


def _boolean(query: Mapping[str, str], name: str) -> bool | None:
    value = query.get(name, "").strip().lower()
    if not value:
        return None
    if value not in ("true", "false"):
        raise ValueError(f"{name}: expected true or false")
    return value == "true"


def _moment(text: str, *, name: str, end_of_day: bool) -> datetime:
    """An ISO 8601 date or datetime as an aware UTC datetime (a date: its start, or next day's)."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime.combine(day, time(0), tzinfo=UTC)
            return start + timedelta(days=1) if end_of_day else start
        moment = datetime.fromisoformat(text)
    except OverflowError:  # the day after 9999-12-31
        raise ValueError(f"{name}: expected a date before 9999-12-31") from None
    except ValueError:
        raise ValueError(
            f"{name}: expected an ISO 8601 date (2024-05-01) or datetime (2024-05-01T12:00:00Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_message_filter(query: Mapping[str, str]) -> MessageFilter:
    """The :class:`MessageFilter` named by request parameters (see the module docstring).

    Empty values count as absent; ``sender=<>`` selects the null reverse-path.

    :raises ValueError: with a message for the user when a value is invalid.
    """
    since_text, until_text = _text(query, "since", 40), _text(query, "until", 40)
    since = None if since_text is None else _moment(since_text, name="since", end_of_day=False)
    until = None if until_text is None else _moment(until_text, name="until", end_of_day=True)
    if since is not None and until is not None and since >= until:
        raise ValueError("since: must be before until")
    sender = _text(query, "sender")
    return MessageFilter(
        sender="" if sender == "<>" else sender,
        sender_domain=_text(query, "sender_domain"),
        recipient=_text(query, "recipient"),
        q=_text(query, "q"),
        since=since,
        until=until,
        opened=_boolean(query, "opened"),
        tracked=_boolean(query, "tracked"),
    )


def _limit(query: Mapping[str, str]) -> int:
    text = query.get("limit", "").strip()
    if not text:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ValueError(f"limit: expected a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def parse_stats_query(query: Mapping[str, str]) -> StatsQuery:
    """The parameters of ``/api/stats``: ``since``, ``until`` (ISO dates), ``group``.

    :raises ValueError: with a message for the user when a value is invalid.
    """
    days: dict[str, date | None] = {}
    for name in ("since", "until"):
        text = _text(query, name, 40)
        try:
            days[name] = None if text is None else date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{name}: expected an ISO 8601 date like 2024-05-01") from None
    since, until = days["since"], days["until"]
    if since is not None and until is not None and since > until:
        raise ValueError("since: must not be after until")
    group = query.get("group", "").strip() or "day"
    if group not in ("day", "sender_domain"):
        raise ValueError("group: expected day or sender_domain")
    return StatsQuery(since=since, until=until, group=cast(StatsGroup, group))


# -- JSON shapes ----------------------------------------------------------------------------


def stats_row_to_dict(row: StatsRow) -> dict[str, Any]:
    """The JSON object of one :class:`StatsRow`."""
    return {
        "key": row.key,
        "relayed": row.relayed,
        "tracked": row.tracked,
        "opened": row.opened,
        "opened_any": row.opened_any,
        "opens": row.opens,
        "opens_by_verdict": dict(row.opens_by_verdict),
        "clicks": row.clicks,
        "clicked": row.clicked,
        "opened_via_click": row.opened_via_click,
        "open_rate": row.open_rate,
        "relayed_aggregate": row.relayed_aggregate,
        "tracking_mode": row.tracking_mode,
        "dkim": dict(row.dkim),
    }


#: The CSV export's columns, in order (the header row).
CSV_COLUMNS: Final = (
    "relayed_at",
    "tracking_id",
    "queue_id",
    "message_id",
    "sender",
    "recipients",
    "subject",
    "tracked",
    "not_tracked_reason",
    "dkim",
    "opened",
    "opened_via",
    "open_count",
    "counted_open_count",
    "first_open_at",
    "click_count",
    "counted_click_count",
)

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    """One CSV cell; text a spreadsheet would run as a formula is prefixed with ``'``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _csv_row(summary: MessageSummary) -> list[str]:
    item = summary_to_dict(summary)
    item["recipients"] = " ".join(summary.recipients)
    return [_cell(item[name]) for name in CSV_COLUMNS]


# -- handlers -------------------------------------------------------------------------------


def _json(data: Any, *, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=_dumps({"error": message}), content_type="application/json")


def _store(request: web.Request) -> ReportsStore:
    return request.app[REPORTS_STORE_KEY]


async def _messages(request: web.Request) -> web.Response:
    query = request.query
    try:
        _check_names(query, _LIST_PARAMS)
        message_filter = parse_message_filter(query)
        limit = _limit(query)
        cursor = _text(query, "cursor", 200)
        page = await _store(request).query_messages(message_filter, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    return _json(
        {"items": [summary_to_dict(s) for s in page.items], "next_cursor": page.next_cursor}
    )


async def find_message_detail(request: web.Request) -> MessageDetail:
    """The message the route's ``{id}`` names (see ``query_message``).

    :raises web.HTTPNotFound: when the id is empty or too long, or names no message.
    """
    ident = request.match_info["id"]
    if not ident or len(ident) > _MAX_IDENT_CHARS:
        raise web.HTTPNotFound()
    detail = await _store(request).query_message(ident)
    if detail is None:
        raise web.HTTPNotFound()
    return detail


async def _message(request: web.Request) -> web.Response:
    return _json(detail_to_dict(await find_message_detail(request)))


async def _stats(request: web.Request) -> web.Response:
    try:
        _check_names(request.query, _STATS_PARAMS)
        params = parse_stats_query(request.query)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    rows = await _store(request).query_stats(
        since=params.since, until=params.until, group=params.group
    )
    return _json(
        {
            "group": params.group,
            "since": None if params.since is None else params.since.isoformat(),
            "until": None if params.until is None else params.until.isoformat(),
            "rows": [stats_row_to_dict(row) for row in rows],
            "total": stats_row_to_dict(stats_total(rows)),
        }
    )


async def _export(request: web.Request) -> web.StreamResponse:
    query = request.query
    try:
        _check_names(query, _FILTER_PARAMS)
        message_filter = parse_message_filter(query)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    store = _store(request)
    page_rows = request.app[_EXPORT_PAGE_KEY]
    # the first page before the headers: a store failure is still a clean 503
    page = await store.query_messages(message_filter, limit=page_rows)
    response = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: "text/csv; charset=utf-8; header=present",
            hdrs.CONTENT_DISPOSITION: 'attachment; filename="smtp-tracker-messages.csv"',
        }
    )
    await response.prepare(request)
    if request.method == hdrs.METH_HEAD:
        return response
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180 §2
    writer.writerow(CSV_COLUMNS)
    while True:
        writer.writerows(_csv_row(summary) for summary in page.items)
        await response.write(buffer.getvalue().encode("utf-8"))
        buffer.seek(0)
        buffer.truncate()
        if page.next_cursor is None:
            break
        try:
            page = await store.query_messages(
                message_filter, limit=page_rows, cursor=page.next_cursor
            )
        except StoreError:
            logger.exception("CSV export stopped: the tracking store cannot be read")
            raise  # the client sees a truncated body, not a complete-looking file
    await response.write_eof()
    return response


async def _openapi(request: web.Request) -> web.Response:
    from smtp_tracker.web.reports.openapi import OPENAPI

    return _json(OPENAPI)


# -- middlewares and headers ----------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``/api`` errors as JSON ``{"error": ...}``; store failures as 503; nothing leaked."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.empty_body:
            raise
        body = _dumps({"error": exc.reason})
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        headers.pop(hdrs.CONTENT_LENGTH, None)
        return web.Response(
            status=exc.status, text=body, content_type="application/json", headers=headers
        )
    except StoreError:
        logger.exception("reports: the tracking store cannot be read")
        return _json({"error": "the tracking store cannot be read"}, status=503)


async def _response_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[hdrs.SERVER] = SERVER_HEADER
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.path.startswith(API_PREFIX) or request.path == API_PREFIX.rstrip("/"):
        response.headers[hdrs.CACHE_CONTROL] = "no-store"


def make_reports_app(
    *,
    store: ReportsStore,
    auth_middleware: Middleware | None,
    middlewares: Sequence[Middleware] = (),
    keepalive_timeout_s: float = HEADER_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
    client_max_bytes: int = _CLIENT_MAX_BYTES,
    export_page_rows: int = _EXPORT_PAGE_ROWS,
) -> web.Application:
    """The reports JSON API as an aiohttp application (not started).

    The whole reports listener (API, logins, dashboard) is
    :func:`smtp_tracker.web.reports.app.build_reports_app`, built on this.
    Middlewares, outermost first: the body deadline
    (:func:`~smtp_tracker.web.site.body_deadline`), the JSON errors,
    *auth_middleware*, then *middlewares*.

    :param store: what the routes read; the caller opens and closes it.
    :param auth_middleware: the authentication (see the module docstring),
        run before every route; ``None`` serves without authentication, for
        tests and for callers that authenticate in front of it.
    :param middlewares: more middlewares, run inside the authentication (the
        dashboard's, e.g. CSRF).
    :param keepalive_timeout_s: seconds a connection has to send a request's
        headers, and may stay idle between requests.
    :param body_timeout_s: seconds a request body has to arrive once its
        headers have (``408`` and closed after that).
    :param client_max_bytes: largest request body accepted, in bytes (the
        API has none; the dashboard's forms do).
    :param export_page_rows: messages per store read of the CSV export
        (1..:data:`~smtp_tracker.store.queries.MAX_LIMIT`); memory holds one page.
    """
    chain: list[Middleware] = [body_deadline(body_timeout_s), _json_errors]
    if auth_middleware is not None:
        chain.append(auth_middleware)
    chain.extend(middlewares)
    app = web.Application(
        middlewares=chain,
        client_max_size=client_max_bytes,
        handler_args=handler_args(keepalive_timeout_s),
    )
    app[REPORTS_STORE_KEY] = store
    app[_EXPORT_PAGE_KEY] = check_limit(export_page_rows)
    app.router.add_get("/api/messages", _messages)
    app.router.add_get("/api/messages/{id}", _message)
    app.router.add_get("/api/stats", _stats)
    app.router.add_get("/api/export.csv", _export)
    app.router.add_get("/api/openapi.json", _openapi)
    app.on_response_prepare.append(_response_headers)
    return app
