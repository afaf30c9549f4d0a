"""A message record as a row, and the counters its events move: shared by both backends.

Moved out of :mod:`.sqlite` (issue 14) so that :mod:`.postgresql` uses the
same columns, times (integer microseconds since the epoch, UTC), storable
texts, aggregate-mode record and event counting as SQLite, without importing
the SQLite backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from smtp_tracker.store import queries
from smtp_tracker.store.instant import from_us, to_us
from smtp_tracker.store.migrations import immediate_transaction
from smtp_tracker.store.queries import Connection
from smtp_tracker.store.records import (
    COUNTED_VERDICTS,
    USER_AGENT_MAX_CHARS,
    VERDICTS,
    ClickEvent,
    EventClassifier,
    EventContext,
    EventKind,
    LinkRecord,
    MessageRecord,
    OpenEvent,
    StoredMessage,
    Verdict,
    header_text,
)

__all__ = [
    "MESSAGE_COLUMNS",
    "ORDER",
    "KnownTokens",
    "MessageState",
    "add_to_dkim_rollup",
    "add_to_rollup",
    "aggregate_record",
    "count_message",
    "day_of",
    "event_rows",
    "from_us",
    "link_rows",
    "listing_clauses",
    "message_from_row",
    "message_row",
    "recipient_rows",
    "sender_domain_of",
    "storable",
    "to_us",
    "with_events",
]

log = logging.getLogger("smtp_tracker.store")

#: The rollup's columns counting open events by verdict.
_OPENS_BY_VERDICT = {verdict: f"opens_{verdict}" for verdict in VERDICTS}

#: The columns of a :class:`MessageRecord`, in :func:`message_from_row`'s order.
MESSAGE_COLUMNS = (
    "tracking_id, queue_id, message_id, sender, recipients, size_bytes, received_at_us,"
    " relayed_at_us, upstream_reply, tracked, not_tracked_reason, subject, dkim"
)

#: Newest first, the order of every message listing.
ORDER = "ORDER BY relayed_at_us DESC, id DESC"


def sender_domain_of(reverse_path: str) -> str:
    """The lower-cased domain of *reverse_path* (after its last ``@``), ``""`` if none."""
    _, at, domain = reverse_path.rpartition("@")
    return domain.lower() if at else ""


def day_of(value_us: int) -> str:
    """The UTC calendar day (``YYYY-MM-DD``) of a time in microseconds since the epoch."""
    return from_us(value_us).strftime("%Y-%m-%d")


def add_to_rollup(conn: Connection, day: str, domain: str, counts: dict[str, int]) -> None:
    """Add *counts* (rollup column → increment) to the ``daily_stats`` row of *day*, *domain*:
    one atomic upsert (``INSERT ... ON CONFLICT DO UPDATE``), the same SQL on both backends."""
    counts = {column: value for column, value in counts.items() if value}
    if not counts:
        return
    assert set(counts) <= set(queries.ROLLUP_COLUMNS), counts
    columns = ", ".join(counts)
    marks = ", ".join("?" * len(counts))
    updates = ", ".join(f"{c} = daily_stats.{c} + excluded.{c}" for c in counts)
    conn.execute(
        f"INSERT INTO daily_stats (day, sender_domain, {columns}) VALUES (?, ?, {marks})"  # noqa: S608 - column names from ROLLUP_COLUMNS
        f" ON CONFLICT (day, sender_domain) DO UPDATE SET {updates}",
        (day, domain, *counts.values()),
    )


def add_to_dkim_rollup(conn: Connection, day: str, domain: str, outcome: str | None) -> None:
    """Count one message of DKIM *outcome* in the ``dkim_stats`` row of *day*, *domain*
    (one upsert, the same SQL on both backends); nothing for None or an unknown outcome."""
    column = queries.DKIM_COLUMNS.get(outcome or "")
    if column is None:
        return
    conn.execute(
        f"INSERT INTO dkim_stats (day, sender_domain, {column}) VALUES (?, ?, 1)"  # noqa: S608 - a column of DKIM_COLUMNS
        f" ON CONFLICT (day, sender_domain) DO UPDATE SET {column} = dkim_stats.{column} + 1",
        (day, domain),
    )


def write_transaction(conn: Connection) -> contextlib.AbstractContextManager[Any]:
    """One write transaction on either backend: SQLite's ``BEGIN IMMEDIATE`` (one writer at
    a time, :func:`.migrations.immediate_transaction`), or the ``PgConnection``'s."""
    if isinstance(conn, sqlite3.Connection):
        return immediate_transaction(conn)
    transaction: contextlib.AbstractContextManager[Any] = conn.transaction()  # type: ignore[attr-defined]  # PgConnection
    return transaction


class KnownTokens:
    """The tracking ids a store last answered known (:meth:`.base.Store.is_known_token`),
    the *size* most recently asked at most (least recently asked dropped first); none
    kept when *size* is 0 or less. Shared by both async stores."""

    __slots__ = ("_ids", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def hit(self, tracking_id: str) -> bool:
        """Whether *tracking_id* is kept (then it is the most recently asked)."""
        if tracking_id in self._ids:
            self._ids.move_to_end(tracking_id)
            return True
        return False

    def add(self, tracking_id: str) -> None:
        """Keep *tracking_id*, dropping the least recently asked beyond the size."""
        if self._size > 0:
            self._ids[tracking_id] = None
            while len(self._ids) > self._size:
                self._ids.popitem(last=False)

    def clear(self) -> None:
        """Forget every id (after a prune, a pruned token is no longer known)."""
        self._ids.clear()


class MessageState:
    """A message's event counters while one batch of events is recorded."""

    __slots__ = (
        "click_count",
        "counted_click_count",
        "counted_open_count",
        "first_open_at_us",
        "initial",
        "open_count",
        "relayed_at_us",
        "rollup",
        "rowid",
        "sender_domain",
    )

    #: The tracking id, then the columns :meth:`__init__` takes, of the messages
    #: whose tracking ids fill the ``IN ({})`` (see :func:`.sqlite._select_rows_in`).
    SELECT_BY_TRACKING_IDS = (
        "SELECT tracking_id, id, relayed_at_us, sender_domain, open_count,"
        " counted_open_count, first_open_at_us, click_count, counted_click_count"
        " FROM messages WHERE tracking_id IN ({})"
    )

    def __init__(self, row: Sequence[Any]) -> None:
        (
            self.rowid,
            self.relayed_at_us,
            self.sender_domain,
            self.open_count,
            self.counted_open_count,
            self.first_open_at_us,
            self.click_count,
            self.counted_click_count,
        ) = row
        self.initial = tuple(row[3:])
        self.rollup: dict[str, int] = {}

    def _bump(self, column: str, by: int = 1) -> None:
        self.rollup[column] = self.rollup.get(column, 0) + by

    def add(self, kind: EventKind, verdict: Verdict, at_us: int) -> None:
        # a counted click means the message was read: opened, via the click
        # until a counted open comes (queries.opened_via)
        counted = verdict in COUNTED_VERDICTS
        if kind == "click":
            self._bump("clicks")
            if counted:
                if self.counted_click_count == 0:
                    self._bump("clicked")
                    if self.counted_open_count == 0:
                        self._bump("opened")
                        self._bump("opened_via_click")
                self.counted_click_count += 1
            self.click_count += 1
            return
        self._bump("opens")
        self._bump(_OPENS_BY_VERDICT[verdict])
        if self.open_count == 0:
            self._bump("opened_any")
        self.open_count += 1
        if counted:
            if self.counted_open_count == 0:
                if self.counted_click_count == 0:
                    self._bump("opened")
                else:
                    self._bump("opened_via_click", -1)
            self.counted_open_count += 1
            if self.first_open_at_us is None or at_us < self.first_open_at_us:
                self.first_open_at_us = at_us

    @staticmethod
    def changes(
        states: Iterable[MessageState],
    ) -> tuple[list[tuple[Any, ...]], dict[tuple[str, str], dict[str, int]]]:
        """The changed messages' new counters, each ``(open_count, counted_open_count,
        first_open_at_us, click_count, counted_click_count, rowid)``, and the rollup
        increments summed per (relay day, sender domain): what both backends write."""
        updates: list[tuple[Any, ...]] = []
        rollup: dict[tuple[str, str], dict[str, int]] = {}
        for state in states:
            current = (
                state.open_count,
                state.counted_open_count,
                state.first_open_at_us,
                state.click_count,
                state.counted_click_count,
            )
            if current == state.initial:
                continue
            updates.append((*current, state.rowid))
            counts = rollup.setdefault((day_of(state.relayed_at_us), state.sender_domain), {})
            for column, value in state.rollup.items():
                counts[column] = counts.get(column, 0) + value
        return updates, rollup

    @staticmethod
    def save_all(conn: sqlite3.Connection, states: Iterable[MessageState]) -> None:
        """Write the changed counters, and the rollup increments summed per day and domain."""
        updates, rollup = MessageState.changes(states)
        conn.executemany(
            "UPDATE messages SET open_count = ?, counted_open_count = ?, first_open_at_us = ?,"
            " click_count = ?, counted_click_count = ? WHERE id = ?",
            updates,
        )
        for (day, domain), counts in rollup.items():
            add_to_rollup(conn, day, domain, counts)


def event_rows(
    kind: EventKind,
    hits: Sequence[OpenEvent] | Sequence[ClickEvent],
    owners: dict[str, str],
    messages: dict[str, MessageState],
    *,
    classify: EventClassifier,
    apply: Callable[[str | None], str | None],
    aggregate: bool,
) -> list[tuple[Any, ...]]:
    """Classify *hits* and count them in *messages*' states; the rows to insert, both backends.

    A click's message is its link token's in *owners* (token → tracking id); a
    hit of an unknown message is skipped. Rows are ``(tracking_id, at_us, ip,
    user_agent, verdict, reason, signals)`` for opens and ``(link_token,
    tracking_id, at_us, ip, user_agent, verdict, reason, signals)`` for clicks,
    *ip* as *apply* (the address policy) keeps it; under *aggregate* no ip,
    user agent or signals. A classifier that raises or answers an unknown
    verdict costs only that event (verdict ``unknown``), never the batch.
    """
    rows: list[tuple[Any, ...]] = []
    for hit in hits:
        if isinstance(hit, ClickEvent):
            tracking_id = owners.get(hit.link_token, "")
        else:
            tracking_id = hit.tracking_id
        state = messages.get(tracking_id)
        if state is None:
            continue
        # untrusted octets: text any UTF-8 encoder takes (issue 12, item 1)
        user_agent = header_text(hit.user_agent)
        if user_agent is not None:
            user_agent = user_agent[:USER_AGENT_MAX_CHARS]
        client = header_text(hit.ip)
        at_us = to_us(hit.at)
        event = EventContext(
            kind=kind,
            at=hit.at,
            client_address=client,
            user_agent=user_agent,
            relayed_at=from_us(state.relayed_at_us),
        )
        signals: str | None = None
        try:
            judged = classify(event)
            verdict, reason = judged[0], judged[1]
            signals = getattr(judged, "signals", None)
        except Exception as exc:  # one event's classification never costs the batch
            log.warning("classifier failed on one %s (%s)", kind, type(exc).__name__)
            verdict, reason = "unknown", "classifier-failed"
        if verdict not in _OPENS_BY_VERDICT:
            verdict, reason = "unknown", f"bad verdict from {reason}"
        state.add(kind, verdict, at_us)
        ip = apply(client)
        if aggregate:  # counted, never stored: nothing ties it to a person
            ip = user_agent = signals = None
        if isinstance(hit, ClickEvent):
            click = (hit.link_token, tracking_id, at_us, ip, user_agent, verdict)
            rows.append((*click, reason, signals))
        else:
            rows.append((tracking_id, at_us, ip, user_agent, verdict, reason, signals))
    return rows


def message_row(
    record: MessageRecord, *, aggregate: bool, per_message: bool, store_subject: bool
) -> tuple[MessageRecord, tuple[Any, ...]]:
    """*record* as it is stored (:func:`storable` texts; :func:`aggregate_record` under
    *aggregate*) and its ``messages`` row: :data:`MESSAGE_COLUMNS`, then ``sender_domain``
    (of the sender before aggregation). Times in microseconds since the epoch (UTC).

    :raises ValueError: when a time of *record* is naive.
    """
    record = storable(record)
    domain = sender_domain_of(record.sender)
    if aggregate:
        record = aggregate_record(record, per_message=per_message)
    row = (
        record.tracking_id,
        record.queue_id,
        record.message_id,
        record.sender,
        json.dumps(list(record.recipients)),
        int(record.size_bytes),
        to_us(record.received_at),
        to_us(record.relayed_at),
        record.upstream_reply,
        int(bool(record.tracked)),
        record.not_tracked_reason,
        record.subject if store_subject else None,
        record.dkim,
        domain,
    )
    return record, row


def recipient_rows(rowid: object, record: MessageRecord) -> list[tuple[object, str]]:
    """The ``message_recipients`` rows of *record* stored as *rowid*: each address once,
    lower-cased."""
    return [(rowid, address.lower()) for address in dict.fromkeys(record.recipients)]


def link_rows(record: MessageRecord, relayed_us: int) -> list[tuple[str, str, str, int, int]]:
    """The ``links`` rows of *record*: token, tracking id, URL, position, relay time (µs)."""
    return [
        (link.token, record.tracking_id, link.url, link.position, relayed_us)
        for link in record.links
    ]


def count_message(
    conn: Connection, record: MessageRecord, domain: str, relayed_us: int, *, aggregate: bool
) -> None:
    """Count one recorded message in the ``daily_stats`` and ``dkim_stats`` rows of its
    relay day and sender *domain* (both backends)."""
    day = day_of(relayed_us)
    add_to_rollup(
        conn,
        day,
        domain,
        {
            "relayed": 1,
            "tracked": int(bool(record.tracked)),
            "relayed_aggregate": int(aggregate),
        },
    )
    add_to_dkim_rollup(conn, day, domain, record.dkim)


def aggregate_record(record: MessageRecord, *, per_message: bool) -> MessageRecord:
    """*record* as ``tracking_mode = "aggregate"`` keeps it: nothing that names a person.

    No sender (its domain is kept apart, for the daily counts), no recipients,
    and unless *per_message* no queue id, Message-ID, subject or upstream reply
    either (they lead back to the mail logs); the tracking id, times, size,
    links and tracked flag stay, so that opens and clicks can be counted.
    """
    return dataclasses.replace(
        record,
        sender="",
        recipients=[],
        queue_id=record.queue_id if per_message else "",
        message_id=record.message_id if per_message else None,
        subject=record.subject if per_message else None,
        upstream_reply=record.upstream_reply if per_message else "",
    )


def storable(record: MessageRecord) -> MessageRecord:
    """*record* with its texts made UTF-8-encodable (:func:`.records.header_text`).

    Header fields (``Subject``, ``Message-ID``) read with the :mod:`email`
    package and SMTP arguments may carry octets that are not UTF-8 as lone
    surrogates; SQLite's binding would refuse them and the message would go
    unrecorded.
    """
    texts = (
        record.queue_id,
        record.message_id,
        record.sender,
        *record.recipients,
        record.upstream_reply,
        record.not_tracked_reason,
        record.subject,
        *(link.url for link in record.links),
    )
    if all(text is None or text.isascii() for text in texts):
        return record
    return dataclasses.replace(
        record,
        queue_id=str(header_text(record.queue_id)),
        message_id=header_text(record.message_id),
        sender=str(header_text(record.sender)),
        recipients=[str(header_text(r)) for r in record.recipients],
        upstream_reply=str(header_text(record.upstream_reply)),
        not_tracked_reason=header_text(record.not_tracked_reason),
        subject=header_text(record.subject),
        links=tuple(
            dataclasses.replace(link, url=str(header_text(link.url))) for link in record.links
        ),
    )


def message_from_row(row: Sequence[Any]) -> MessageRecord:
    """The :class:`MessageRecord` of a row of :data:`MESSAGE_COLUMNS`."""
    (
        tracking_id,
        queue_id,
        message_id,
        sender,
        recipients,
        size_bytes,
        received_at_us,
        relayed_at_us,
        upstream_reply,
        tracked,
        not_tracked_reason,
        subject,
        dkim,
    ) = row
    return MessageRecord(
        tracking_id=tracking_id,
        queue_id=queue_id,
        message_id=message_id,
        sender=sender,
        recipients=[str(r) for r in json.loads(recipients)],
        size_bytes=int(size_bytes),
        received_at=from_us(received_at_us),
        relayed_at=from_us(relayed_at_us),
        upstream_reply=upstream_reply,
        tracked=bool(tracked),
        not_tracked_reason=not_tracked_reason,
        subject=subject,
        dkim=dkim,
    )


def listing_clauses(since: datetime | None, limit: int | None) -> tuple[str, str, list[Any]]:
    """The ``WHERE`` and ``LIMIT`` clauses (``?`` placeholders) and parameters of a
    message listing from *since* (UTC), at most *limit* messages; both backends.

    :raises ValueError: when *limit* is negative or *since* naive.
    """
    where, params = "", list[int]()
    if since is not None:
        where = "WHERE relayed_at_us >= ?"
        params.append(to_us(since))
    tail = ""
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        tail = "LIMIT ?"
        params.append(int(limit))
    return where, tail, params


def with_events(
    conn: Connection, records: list[MessageRecord], where: str, params: Sequence[Any]
) -> list[StoredMessage]:
    """*records* with their links, opens and clicks, read through *conn* (``?``
    placeholders); *where* (with *params*) selects the records' tracking ids.

    Opens and clicks in time order, links in position order; both backends.
    """
    opens: dict[str, list[OpenEvent]] = {}
    for tracking_id, at_us, ip, user_agent, verdict, reason in conn.execute(
        "SELECT tracking_id, at_us, ip, user_agent, verdict, verdict_reason FROM opens"  # noqa: S608 - constants
        f" WHERE {where} ORDER BY at_us, id",
        params,
    ):
        opens.setdefault(tracking_id, []).append(
            OpenEvent(
                tracking_id=tracking_id,
                at=from_us(at_us),
                ip=ip,
                user_agent=user_agent,
                verdict=verdict,
                verdict_reason=reason,
            )
        )
    links: dict[str, list[LinkRecord]] = {}
    urls: dict[str, str] = {}
    for token, tracking_id, url, position in conn.execute(
        f"SELECT token, tracking_id, url, position FROM links WHERE {where}"  # noqa: S608 - constants
        " ORDER BY tracking_id, position",
        params,
    ):
        links.setdefault(tracking_id, []).append(
            LinkRecord(token=token, url=url, position=int(position))
        )
        urls[token] = url
    clicks: dict[str, list[ClickEvent]] = {}
    for token, tracking_id, at_us, ip, user_agent, verdict, reason in conn.execute(
        "SELECT link_token, tracking_id, at_us, ip, user_agent, verdict, verdict_reason"  # noqa: S608 - constants
        f" FROM clicks WHERE {where} ORDER BY at_us, id",
        params,
    ):
        clicks.setdefault(tracking_id, []).append(
            ClickEvent(
                link_token=token,
                tracking_id=tracking_id,
                url=urls.get(token, ""),
                at=from_us(at_us),
                ip=ip,
                user_agent=user_agent,
                verdict=verdict,
                verdict_reason=reason,
            )
        )
    return [
        StoredMessage(
            record=dataclasses.replace(record, links=tuple(links.get(record.tracking_id, ()))),
            opens=tuple(opens.get(record.tracking_id, ())),
            clicks=tuple(clicks.get(record.tracking_id, ())),
        )
        for record in records
    ]
