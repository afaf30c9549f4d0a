"""Report queries over the tracking store: message lists, one message, statistics.

Blocking functions over a :class:`~.base.Connection` (SQLite's, or PostgreSQL's through
:mod:`.postgresql`'s dialect adapter) of a store at schema v3 or
newer; :class:`~smtp_tracker.store.sqlite.SqliteDatabase` and
:class:`~smtp_tracker.store.sqlite.SqliteStore` wrap them (section "reports"),
and the JSON API (:mod:`smtp_tracker.web.reports.api`), the dashboard and
``smtp-tracker stats`` read through those wrappers.  Nothing here writes.

Counting
    An open or click event carries a verdict (``human``, ``privacy_proxy``,
    ``mail_proxy``, ``scanner``, ``unknown``).  A message is **opened** when it
    has at least one *counted* open, one whose verdict is in
    :data:`COUNTED_VERDICTS` (``human`` and ``mail_proxy``), or, failing that,
    a counted click: a link followed by a person means the message was read
    though its pixel was not fetched (images blocked, clipped mail), and
    ``opened_via`` says which (``"pixel"``, ``"click"``, or None).
    **opened_any** counts messages with an open of any verdict, so the machine
    opens stay visible beside the honest figure.  ``open_rate`` is opened / tracked.

Messages (:func:`query_messages`)
    Newest first, ordered by (relay time, row id), both descending, and paged
    by keyset: the cursor names the last row of a page, so a page costs the
    same at any depth and rows relayed meanwhile neither shift nor repeat the
    pages after it.  Every filter uses an index: ``sender`` the
    ``(sender, relayed_at_us, id)`` index, ``sender_domain`` its own,
    ``recipient`` the ``message_recipients`` index, ``q`` the tracking id,
    queue id and Message-ID indexes, the others the ``(relayed_at_us, id)``
    index.

Statistics (:func:`query_stats`)
    Read only the ``daily_stats`` rollup, which the write paths keep current,
    never the messages.  A **day is the UTC calendar day of the message's relay
    time**: an open on 2 May of a message relayed on 1 May counts on 1 May, so
    a day's open rate is the share of that day's messages that were opened.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Final, Literal, Protocol

from smtp_tracker.store.instant import Instant
from smtp_tracker.store.instant import from_us as _from_us
from smtp_tracker.store.instant import to_us as _to_us
from smtp_tracker.store.migrations import DKIM_ROLLUP
from smtp_tracker.store.records import COUNTED_VERDICTS, VERDICTS, ClickEvent, OpenEvent

__all__ = [
    "COUNTED_VERDICTS",
    "DEFAULT_LIMIT",
    "DKIM_COLUMNS",
    "DKIM_OUTCOMES",
    "EXPORT_PAGE_ROWS",
    "MAX_LIMIT",
    "ROLLUP_COLUMNS",
    "VERDICTS",
    "Connection",
    "Cursor",
    "MessageDetail",
    "MessageFilter",
    "MessagePage",
    "MessageSummary",
    "OpenedVia",
    "StatsGroup",
    "StatsRow",
    "check_limit",
    "decode_cursor",
    "encode_cursor",
    "export_rows",
    "ident_candidates",
    "page_query",
    "pages",
    "query_message",
    "query_messages",
    "query_stats",
    "stats_total",
]


#: Page size of :func:`query_messages` when none is given.
DEFAULT_LIMIT: Final = 50
#: The largest page :func:`query_messages` returns.
MAX_LIMIT: Final = 500
#: Rows per read transaction in :func:`export_rows`.
EXPORT_PAGE_ROWS: Final = 1000

StatsGroup = Literal["day", "sender_domain"]
#: How a message came to count as opened: its pixel (a counted open) or a counted click.
OpenedVia = Literal["pixel", "click"]

_CURSOR_VERSION = 1
_CURSOR = struct.Struct(">Bqq8s")  # version, relayed_at_us, id, filter digest


class Cursor(Protocol):
    """What the shared queries read from a statement's result (DB-API 2.0, PEP 249)."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What the shared queries (:mod:`.queries`) need of a connection: ``execute`` with
    ``?`` placeholders.  :class:`sqlite3.Connection` is one; PostgreSQL's is wrapped by
    :class:`~.postgresql.PgConnection`, which translates the placeholders.
    """

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


# -- records --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageFilter:
    """Which messages :func:`query_messages` and :func:`export_rows` select.

    Every field is optional (``None``: no condition); given fields all apply (AND).

    :param sender: the reverse-path exactly as recorded (``""`` selects bounces).
    :param sender_domain: the reverse-path's domain, matched case-insensitively.
    :param recipient: one forward-path, matched case-insensitively.
    :param q: a tracking id, queue id or Message-ID (with or without its angle
        brackets), exact.
    :param since: relayed at or after this aware datetime (inclusive).
    :param until: relayed before this aware datetime (exclusive).
    :param opened: true: opened (a counted open, or a counted click); false:
        neither (untracked messages included, combine with ``tracked=True`` to
        leave them out).
    :param tracked: whether a pixel was injected.
    """

    sender: str | None = None
    recipient: str | None = None
    q: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    opened: bool | None = None
    sender_domain: str | None = None
    tracked: bool | None = None

    def fingerprint(self) -> bytes:
        """8 bytes naming this filter, which a cursor carries (not a secret)."""
        canonical = json.dumps(
            [
                self.sender,
                None if self.recipient is None else self.recipient.lower(),
                self.q,
                None if self.since is None else _to_us(self.since),
                None if self.until is None else _to_us(self.until),
                self.opened,
                None if self.sender_domain is None else self.sender_domain.lower(),
                self.tracked,
            ]
        )
        return hashlib.blake2b(canonical.encode(), digest_size=8, person=b"smtp-tracker").digest()


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageSummary:
    """One message as a list shows it.

    :param recipients: the forward-paths as recorded, in order.
    :param subject: ``None`` unless the store keeps subjects.
    :param relayed_at: when the upstream accepted it (UTC).
    :param open_count: open events of any verdict.
    :param counted_open_count: open events with a counted verdict.
    :param first_open_at: the first counted open (UTC), or ``None``.
    :param click_count: click events of any verdict.
    :param counted_click_count: click events with a counted verdict.
    :param dkim: what became of its DKIM signatures (``resigned``, or why it was
        relayed as received, e.g. ``dkim-foreign``); ``None`` when it had none.
    """

    tracking_id: str
    queue_id: str
    message_id: str | None
    sender: str
    recipients: tuple[str, ...]
    subject: str | None
    relayed_at: datetime
    tracked: bool
    not_tracked_reason: str | None
    open_count: int
    counted_open_count: int
    first_open_at: datetime | None
    click_count: int
    counted_click_count: int = 0
    dkim: str | None = None

    @property
    def opened(self) -> bool:
        """Whether the message counts as opened: a counted open, or a counted click."""
        return self.counted_open_count > 0 or self.counted_click_count > 0

    @property
    def opened_via(self) -> OpenedVia | None:
        """``"pixel"`` (a counted open), ``"click"`` (a counted click and no counted
        open: read, its pixel not fetched), or None (not opened)."""
        if self.counted_open_count > 0:
            return "pixel"
        return "click" if self.counted_click_count > 0 else None


@dataclass(frozen=True, kw_only=True, slots=True)
class MessagePage:
    """One page of :func:`query_messages`.

    :param items: at most ``limit`` messages, newest first.
    :param next_cursor: give it back as ``cursor`` for the next page; ``None``
        on the last page.
    """

    items: list[MessageSummary]
    next_cursor: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageDetail:
    """One message with its events, oldest first."""

    summary: MessageSummary
    size_bytes: int
    received_at: datetime
    upstream_reply: str
    opens: tuple[OpenEvent, ...] = ()
    clicks: tuple[ClickEvent, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class StatsRow:
    """The figures of one day or one sender domain.

    :param key: ``"YYYY-MM-DD"`` (a UTC relay day) or a sender domain (``""``
        for bounces and senders without a domain); ``"total"`` from :func:`stats_total`.
    :param relayed: messages relayed.
    :param tracked: of those, messages with a pixel.
    :param opened: messages opened: with at least one counted open (human,
        mail_proxy), or with a counted click and no counted open.
    :param opened_any: messages with at least one open of any verdict.
    :param opens: open events of any verdict.
    :param opens_by_verdict: open events per verdict, every verdict of
        :data:`VERDICTS` present (0 when none).
    :param clicks: click events of any verdict.
    :param clicked: messages with at least one counted click.
    :param open_rate: opened / tracked in [0, 1], or ``None`` when nothing was tracked.
    :param opened_via_click: of *opened*, the messages opened by a counted
        click alone (no counted open).
    :param relayed_aggregate: of *relayed*, the messages recorded with
        ``tracking_mode = "aggregate"`` (issue 20; see :attr:`tracking_mode`).
    :param dkim: of *relayed*, the DKIM-signed messages per outcome (issue 13):
        every outcome of :data:`DKIM_OUTCOMES` present (0 when none):
        ``resigned`` (tracked, re-signed) and each reason one was relayed as
        received.  From the ``dkim_stats`` rollup, which, like ``daily_stats``,
        keeps the counts of pruned and forgotten messages.
    """

    key: str
    relayed: int
    tracked: int
    opened: int
    opened_any: int
    opens: int
    opens_by_verdict: dict[str, int] = field(default_factory=dict)
    clicks: int = 0
    clicked: int = 0
    open_rate: float | None = None
    opened_via_click: int = 0
    relayed_aggregate: int = 0
    dkim: dict[str, int] = field(default_factory=dict)

    @property
    def tracking_mode(self) -> str:
        """Which ``tracking_mode`` produced these figures: ``per-person``,
        ``aggregate``, or ``mixed`` (the mode changed within them)."""
        if self.relayed_aggregate == 0:
            return "per-person"
        return "aggregate" if self.relayed_aggregate >= self.relayed else "mixed"


# -- messages -------------------------------------------------------------------------------

_SUMMARY_COLUMNS = (
    "m.id, m.tracking_id, m.queue_id, m.message_id, m.sender, m.recipients, m.subject,"
    " m.relayed_at_us, m.tracked, m.not_tracked_reason, m.open_count, m.counted_open_count,"
    " m.first_open_at_us, m.click_count, m.counted_click_count, m.dkim"
)
_ORDER = "ORDER BY m.relayed_at_us DESC, m.id DESC"


def encode_cursor(relayed_at_us: int, row_id: int, message_filter: MessageFilter) -> str:
    """The opaque, URL-safe cursor after the row (*relayed_at_us*, *row_id*).

    It binds the position to *message_filter*'s fingerprint: it is not a secret
    and grants nothing (any page can be asked for), but a corrupted, edited or
    reused-with-other-filters cursor is rejected rather than answered wrongly.
    """
    payload = _CURSOR.pack(
        _CURSOR_VERSION,
        relayed_at_us,
        row_id,
        _cursor_digest(relayed_at_us, row_id, message_filter),
    )
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, message_filter: MessageFilter) -> tuple[int, int]:
    """The (relayed_at_us, id) position a cursor from :func:`encode_cursor` names.

    :raises ValueError: when *cursor* is malformed, altered, or was made for
        another filter.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, relayed_at_us, row_id, digest = _CURSOR.unpack(raw)
    except (binascii.Error, struct.error, ValueError):
        raise ValueError("malformed cursor") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != cursor:
        raise ValueError("malformed cursor")  # not the one canonical spelling (RFC 4648 §3.5)
    if version != _CURSOR_VERSION or digest != _cursor_digest(
        relayed_at_us, row_id, message_filter
    ):
        raise ValueError("cursor does not belong to these filters")
    return Instant(relayed_at_us), row_id


def _cursor_digest(relayed_at_us: int, row_id: int, message_filter: MessageFilter) -> bytes:
    position = struct.pack(">qq", relayed_at_us, row_id)
    return hashlib.blake2b(
        position + message_filter.fingerprint(), digest_size=8, person=b"st-cursor"
    ).digest()


def _where(message_filter: MessageFilter) -> tuple[list[str], list[Any]]:
    """SQL conditions (on ``messages AS m``) and their parameters for *message_filter*."""
    conditions: list[str] = []
    params: list[Any] = []
    f = message_filter
    if f.sender is not None:
        conditions.append("m.sender = ?")
        params.append(f.sender)
    if f.sender_domain is not None:
        conditions.append("m.sender_domain = ?")
        params.append(f.sender_domain.lower())
    if f.recipient is not None:
        conditions.append(
            "m.id IN (SELECT message_rowid FROM message_recipients WHERE address = ?)"
        )
        params.append(f.recipient.strip().lower())
    if f.q is not None:
        q = f.q.strip()
        bare = q[1:-1] if q.startswith("<") and q.endswith(">") else q
        conditions.append(
            "(m.tracking_id = ? OR m.queue_id = ? OR m.message_id = ? OR m.message_id = ?)"
        )
        params.extend([q, q, bare, f"<{bare}>"])
    if f.since is not None:
        conditions.append("m.relayed_at_us >= ?")
        params.append(_to_us(f.since))
    if f.until is not None:
        conditions.append("m.relayed_at_us < ?")
        params.append(_to_us(f.until))
    if f.opened is not None:
        conditions.append(
            "(m.counted_open_count > 0 OR m.counted_click_count > 0)"
            if f.opened
            else "m.counted_open_count = 0 AND m.counted_click_count = 0"
        )
    if f.tracked is not None:
        conditions.append("m.tracked = ?")
        params.append(int(f.tracked))
    return conditions, params


def page_query(
    message_filter: MessageFilter, *, after: tuple[int, int] | None, limit: int
) -> tuple[str, list[Any]]:
    """The SQL and parameters of one page: at most *limit* rows after position *after*.

    :param after: (relayed_at_us, id) of the previous page's last row, or ``None``.
    :raises ValueError: when a datetime in the filter is naive.
    """
    conditions, params = _where(message_filter)
    if after is not None:
        after = (Instant.of(after[0]), after[1])
        conditions.append("(m.relayed_at_us, m.id) < (?, ?)")
        params.extend(after)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    sql = f"SELECT {_SUMMARY_COLUMNS} FROM messages AS m {where} {_ORDER} LIMIT ?"  # noqa: S608 - constants
    return sql, [*params, limit]


def check_limit(limit: int) -> int:
    """*limit* if it is a page size :func:`query_messages` serves.

    :raises ValueError: when it is outside 1..:data:`MAX_LIMIT`.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return limit


def query_messages(
    conn: Connection,
    message_filter: MessageFilter,
    *,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> MessagePage:
    """One page of the messages *message_filter* selects, newest first.

    Blocking; run it in a read transaction (one snapshot) from a worker thread.

    :param limit: page size, 1..:data:`MAX_LIMIT` messages.
    :param cursor: ``next_cursor`` of the previous page with the same filter,
        or ``None`` for the first page.
    :raises ValueError: when *limit* is out of range, *cursor* is invalid for
        this filter, or a datetime in the filter is naive.
    :raises sqlite3.Error: when the database cannot be read (psycopg.Error on PostgreSQL).
    """
    check_limit(limit)
    after = None if cursor is None else decode_cursor(cursor, message_filter)
    rows = conn.execute(*page_query(message_filter, after=after, limit=limit + 1)).fetchall()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(int(last[7]), int(last[0]), message_filter)
    return MessagePage(items=[_summary(row) for row in rows], next_cursor=next_cursor)


def export_rows(
    conn: Connection,
    message_filter: MessageFilter,
    *,
    page_rows: int = EXPORT_PAGE_ROWS,
) -> Iterator[MessageSummary]:
    """Every message *message_filter* selects, newest first, read *page_rows* at a time.

    Each page is one query; keyset paging keeps memory flat however many rows
    match, and rows relayed during the export (newer than its first row) are
    not included.  Runs each page in its own read transaction when the
    connection is in autocommit mode and none is open.

    :raises ValueError: when a datetime in the filter is naive.
    :raises sqlite3.Error: when the database cannot be read (psycopg.Error on PostgreSQL).
    """
    page_rows = max(1, min(page_rows, MAX_LIMIT * 10))
    position: tuple[int, int] | None = None
    while True:
        rows = conn.execute(*page_query(message_filter, after=position, limit=page_rows)).fetchall()
        for row in rows:
            yield _summary(row)
        if len(rows) < page_rows:
            return
        position = (int(rows[-1][7]), int(rows[-1][0]))


def pages(read_page: Callable[[str | None], MessagePage]) -> Iterator[MessageSummary]:
    """Every summary of the pages *read_page* gives, the first for cursor ``None``,
    each next for the cursor its predecessor names, until one names none: the stores'
    ``export_rows``, one read (transaction) per page.

    Whatever *read_page* raises propagates.
    """
    cursor: str | None = None
    while True:
        page = read_page(cursor)
        yield from page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def ident_candidates(ident: str) -> list[tuple[str, str]]:
    """The (column, value) look-ups, in order, of a message named by *ident*.

    Its tracking id, else its queue id, else its Message-ID with or without
    the angle brackets (RFC 5322 section 3.6.4 writes them; people often
    leave them out): ``<bare>`` first, then ``bare``.  Surrounding blanks are
    ignored.  Both :func:`query_message` and the stores' ``find_message`` use it.
    """
    ident = ident.strip()
    bare = ident[1:-1] if ident.startswith("<") and ident.endswith(">") else ident
    return [
        ("tracking_id", ident),
        ("queue_id", ident),
        ("message_id", f"<{bare}>"),
        ("message_id", bare),
    ]


def query_message(conn: Connection, ident: str) -> MessageDetail | None:
    """The message whose tracking id, else queue id, else Message-ID is *ident*, with its events.

    A Message-ID matches with or without its angle brackets; of several
    messages sharing a queue id or Message-ID, the newest.  Opens and clicks
    come oldest first.

    :raises sqlite3.Error: when the database cannot be read (psycopg.Error on PostgreSQL).
    """
    for column, value in ident_candidates(ident):
        row = conn.execute(
            f"SELECT {_SUMMARY_COLUMNS}, m.size_bytes, m.received_at_us, m.upstream_reply"  # noqa: S608 - constants
            f" FROM messages AS m WHERE m.{column} = ? {_ORDER} LIMIT 1",
            (value,),
        ).fetchone()
        if row is not None:
            break
    else:
        return None
    summary = _summary(row)
    opens = tuple(
        OpenEvent(
            tracking_id=summary.tracking_id,
            at=_from_us(at_us),
            ip=ip,
            user_agent=user_agent,
            verdict=verdict,
            verdict_reason=reason,
        )
        for at_us, ip, user_agent, verdict, reason in conn.execute(
            "SELECT at_us, ip, user_agent, verdict, verdict_reason FROM opens"
            " WHERE tracking_id = ? ORDER BY at_us, id",
            (summary.tracking_id,),
        )
    )
    clicks = tuple(
        ClickEvent(
            link_token=link_token,
            tracking_id=summary.tracking_id,
            url=url or "",
            at=_from_us(at_us),
            ip=ip,
            user_agent=user_agent,
            verdict=verdict,
            verdict_reason=reason,
        )
        for link_token, at_us, url, ip, user_agent, verdict, reason in conn.execute(
            "SELECT c.link_token, c.at_us, l.url, c.ip, c.user_agent, c.verdict, c.verdict_reason"
            " FROM clicks AS c LEFT JOIN links AS l ON l.token = c.link_token"
            " WHERE c.tracking_id = ? ORDER BY c.at_us, c.id",
            (summary.tracking_id,),
        )
    )
    return MessageDetail(
        summary=summary,
        size_bytes=int(row[16]),
        received_at=_from_us(int(row[17])),
        upstream_reply=str(row[18]),
        opens=opens,
        clicks=clicks,
    )


def _summary(row: Sequence[Any]) -> MessageSummary:
    (
        _row_id,
        tracking_id,
        queue_id,
        message_id,
        sender,
        recipients,
        subject,
        relayed_at_us,
        tracked,
        not_tracked_reason,
        open_count,
        counted_open_count,
        first_open_at_us,
        click_count,
        counted_click_count,
        dkim,
    ) = row[:16]
    return MessageSummary(
        tracking_id=tracking_id,
        queue_id=queue_id,
        message_id=message_id,
        sender=sender,
        recipients=tuple(str(r) for r in json.loads(recipients)),
        subject=subject,
        relayed_at=_from_us(int(relayed_at_us)),
        tracked=bool(tracked),
        not_tracked_reason=not_tracked_reason,
        open_count=int(open_count),
        counted_open_count=int(counted_open_count),
        first_open_at=None if first_open_at_us is None else _from_us(int(first_open_at_us)),
        click_count=int(click_count),
        counted_click_count=int(counted_click_count),
        dkim=dkim,
    )


# -- statistics -----------------------------------------------------------------------------

#: The ``daily_stats`` rollup's counters, in table order (after ``day`` and ``sender_domain``).
ROLLUP_COLUMNS: Final[tuple[str, ...]] = (
    "relayed",
    "tracked",
    "opened",
    "opened_any",
    "opens",
    *(f"opens_{verdict}" for verdict in VERDICTS),
    "clicks",
    "clicked",
    "opened_via_click",
    "relayed_aggregate",
)
_STATS_SUMS = ", ".join(f"SUM({column})" for column in ROLLUP_COLUMNS)

#: What ``messages.dkim`` holds (issue 13), in report order: re-signed, then why a
#: signed message was relayed as received.
DKIM_OUTCOMES: Final[tuple[str, ...]] = (
    "resigned",
    "dkim-signed",
    "dkim-invalid",
    "dkim-foreign",
    "dkim-length-tag",
    "arc-sealed",
    "dkim-resign-failed",
)
#: ``dkim_stats``' counter of each outcome.
DKIM_COLUMNS: Final[dict[str, str]] = dict(zip(DKIM_OUTCOMES, DKIM_ROLLUP, strict=True))
_DKIM_SUMS = ", ".join(f"SUM({column})" for column in DKIM_ROLLUP)


def _days_where(since: date | None, until: date | None) -> tuple[str, list[str]]:
    """The ``WHERE`` clause (``?`` placeholders, empty for neither bound) and parameters
    that keep a rollup's rows of UTC days *since* to *until*, both included."""
    conditions: list[str] = []
    params: list[str] = []
    if since is not None:
        conditions.append("day >= ?")
        params.append(since.isoformat())
    if until is not None:
        conditions.append("day <= ?")
        params.append(until.isoformat())
    return (f"WHERE {' AND '.join(conditions)}" if conditions else ""), params


def query_stats(
    conn: Connection,
    *,
    since: date | None = None,
    until: date | None = None,
    group: StatsGroup = "day",
) -> list[StatsRow]:
    """Figures per UTC relay day or per sender domain, from the ``daily_stats`` rollup.

    :param since: first relay day included (UTC), or ``None``.
    :param until: last relay day included (UTC), or ``None``.
    :param group: ``"day"``: one row per day that relayed anything, oldest
        first; ``"sender_domain"``: one row per sender domain over the period,
        most relayed first (then by name).
    :raises ValueError: when *group* is unknown or *since* is after *until*.
    :raises sqlite3.Error: when the database cannot be read (psycopg.Error on PostgreSQL).
    """
    if group not in ("day", "sender_domain"):
        raise ValueError(f"group must be day or sender_domain, got {group!r}")
    if since is not None and until is not None and since > until:
        raise ValueError("since is after until")
    where, params = _days_where(since, until)
    order = "ORDER BY day" if group == "day" else "ORDER BY SUM(relayed) DESC, sender_domain"
    rows = conn.execute(
        f"SELECT {group}, {_STATS_SUMS} FROM daily_stats {where} GROUP BY {group} {order}",  # noqa: S608 - constants
        params,
    ).fetchall()
    dkim = _dkim_counts(conn, since=since, until=until, group=group)
    return [
        _stats_row(str(row[0]), [int(v or 0) for v in row[1:]], dkim.get(str(row[0]), {}))
        for row in rows
    ]


def _dkim_counts(
    conn: Connection, *, since: date | None, until: date | None, group: StatsGroup
) -> dict[str, dict[str, int]]:
    """Signed messages per *group* key and DKIM outcome, from the ``dkim_stats`` rollup."""
    where, params = _days_where(since, until)
    return {
        str(row[0]): dict(zip(DKIM_OUTCOMES, (int(v or 0) for v in row[1:]), strict=True))
        for row in conn.execute(
            f"SELECT {group}, {_DKIM_SUMS} FROM dkim_stats {where} GROUP BY {group}",  # noqa: S608 - constants
            params,
        ).fetchall()
    }


def _dkim_row(counts: dict[str, int]) -> dict[str, int]:
    """*counts* with every outcome of :data:`DKIM_OUTCOMES` (then any other, by name)."""
    others = sorted(set(counts) - set(DKIM_OUTCOMES))
    return {outcome: counts.get(outcome, 0) for outcome in (*DKIM_OUTCOMES, *others)}


def _stats_row(key: str, sums: Sequence[int], dkim: dict[str, int] | None = None) -> StatsRow:
    relayed, tracked, opened, opened_any, opens, *rest = sums
    by_verdict, (clicks, clicked, via_click, aggr) = rest[:-4], rest[-4:]
    return StatsRow(
        key=key,
        relayed=relayed,
        tracked=tracked,
        opened=opened,
        opened_any=opened_any,
        opens=opens,
        opens_by_verdict=dict(zip(VERDICTS, by_verdict, strict=True)),
        clicks=clicks,
        clicked=clicked,
        open_rate=opened / tracked if tracked else None,
        opened_via_click=via_click,
        relayed_aggregate=aggr,
        dkim=_dkim_row(dkim or {}),
    )


def stats_total(rows: Sequence[StatsRow], *, key: str = "total") -> StatsRow:
    """The sum of *rows* (open rate recomputed from the sums)."""
    sums = [
        sum(getattr(row, name) for row in rows)
        for name in ("relayed", "tracked", "opened", "opened_any", "opens")
    ]
    by_verdict = [sum(row.opens_by_verdict.get(v, 0) for row in rows) for v in VERDICTS]
    clicks = sum(row.clicks for row in rows)
    clicked = sum(row.clicked for row in rows)
    via_click = sum(row.opened_via_click for row in rows)
    aggregate = sum(row.relayed_aggregate for row in rows)
    dkim: dict[str, int] = {}
    for row in rows:
        for outcome, count in row.dkim.items():
            dkim[outcome] = dkim.get(outcome, 0) + count
    return _stats_row(key, [*sums, *by_verdict, clicks, clicked, via_click, aggregate], dkim)


# -- times ----------------------------------------------------------------------------------
