"""The SQLite write path: message records, their recipients and links, and batches of events.

Every write is one short transaction started with ``BEGIN IMMEDIATE``, so a
writer waits for the lock (up to the busy timeout) instead of failing on a
snapshot upgrade; in the same transaction it keeps the messages' counters
and the daily rollups current (:mod:`smtp_tracker.store.rows`) and tells the webhook outbox
(:class:`OutboxHook`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from smtp_tracker.errors import StoreError
from smtp_tracker.store.address import AddressPolicy
from smtp_tracker.store.migrations import immediate_transaction
from smtp_tracker.store.records import (
    ClickEvent,
    EventClassifier,
    EventKind,
    MessageRecord,
    OpenEvent,
)
from smtp_tracker.store.rows import MESSAGE_COLUMNS as _MESSAGE_COLUMNS
from smtp_tracker.store.rows import MessageState as _MessageState
from smtp_tracker.store.rows import count_message as _count_message
from smtp_tracker.store.rows import event_rows as _event_rows
from smtp_tracker.store.rows import link_rows as _link_rows
from smtp_tracker.store.rows import message_row as _message_row
from smtp_tracker.store.rows import recipient_rows as _recipient_rows
from smtp_tracker.store.sqlite.connection import Connected

__all__ = ["OutboxHook", "Recording"]

_INSERT_MESSAGE = (
    f"INSERT INTO messages ({_MESSAGE_COLUMNS}, sender_domain)"  # noqa: S608 - constant
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_OPEN = (
    "INSERT INTO opens (tracking_id, at_us, ip, user_agent, verdict, verdict_reason, signals)"
    " VALUES (?,?,?,?,?,?,?)"
)
_INSERT_CLICK = (
    "INSERT INTO clicks (link_token, tracking_id, at_us, ip, user_agent, verdict, verdict_reason,"
    " signals) VALUES (?,?,?,?,?,?,?,?)"
)


def _select_rows_in(
    conn: sqlite3.Connection, query: str, keys: Iterable[str]
) -> Iterator[Sequence[Any]]:
    """Rows of *query* (with one ``IN ({})``) for *keys*, in chunks within SQLite's limits."""
    pending = list(keys)
    for start in range(0, len(pending), _IN_CHUNK):
        chunk = pending[start : start + _IN_CHUNK]
        yield from conn.execute(query.format(", ".join("?" * len(chunk))), chunk)


def _select_in(conn: sqlite3.Connection, query: str, keys: Iterable[str]) -> dict[str, str]:
    """``{first column: second column}`` of :func:`_select_rows_in`."""
    return {str(row[0]): str(row[1]) for row in _select_rows_in(conn, query, keys)}


#: Keys per ``IN (...)`` look-up (SQLite allows 32,766 variables since 3.32).
_IN_CHUNK = 500


class OutboxHook(Protocol):
    """Called inside the store's write transactions (the webhook outbox, issue 18).

    Must not raise: what it writes is its own business, never the record's.
    """

    def message_recorded(self, conn: sqlite3.Connection, record: MessageRecord) -> None:
        """*record* was inserted; the transaction is still open."""
        ...

    def events_recorded(
        self, conn: sqlite3.Connection, kind: EventKind, rows: Sequence[Sequence[Any]]
    ) -> None:
        """*rows* (``_INSERT_OPEN`` or ``_INSERT_CLICK`` columns) were inserted, before
        the messages' counters were updated; the transaction is still open."""
        ...


class Recording(Connected):
    """The writes of :class:`~.database.SqliteDatabase`, which sets the attributes below
    (see there)."""

    store_subject: bool
    address_policy: AddressPolicy
    classifier: EventClassifier
    tracking_mode: str
    aggregate_per_message: bool
    outbox: OutboxHook | None
    last_message_rowid: int | None

    def record_message(self, record: MessageRecord) -> None:
        """See :meth:`.base.Store.record_message`."""
        aggregate = self.tracking_mode == "aggregate"
        record, row = _message_row(
            record,
            aggregate=aggregate,
            per_message=self.aggregate_per_message,
            store_subject=self.store_subject,
        )
        relayed_us, domain = row[7], row[-1]
        conn = self._conn
        try:
            with immediate_transaction(conn):
                rowid = conn.execute(_INSERT_MESSAGE, row).lastrowid
                conn.executemany(
                    "INSERT INTO message_recipients (message_rowid, address) VALUES (?, ?)",
                    _recipient_rows(rowid, record),
                )
                conn.executemany(
                    "INSERT INTO links (token, tracking_id, url, position, relayed_at_us)"
                    " VALUES (?, ?, ?, ?, ?)",
                    _link_rows(record, relayed_us),
                )
                _count_message(conn, record, domain, relayed_us, aggregate=aggregate)
                if self.outbox is not None:
                    self.outbox.message_recorded(conn, record)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"tracking id {record.tracking_id} is already recorded") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record message {record.queue_id}: {exc}") from exc
        self.last_message_rowid = rowid

    def has_message_row(self, rowid: int) -> bool:
        """Whether this connection sees ``messages.id == rowid`` (pruned or forgotten: no)."""
        return (
            self._conn.execute("SELECT 1 FROM messages WHERE id = ?", (rowid,)).fetchone()
            is not None
        )

    def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        """See :meth:`.base.Store.record_opens`; each open is classified first."""
        return self._record_events("open", hits)

    def record_clicks(self, hits: Sequence[ClickEvent]) -> int:
        """See :meth:`.base.Store.record_clicks`; each click is classified first."""
        return self._record_events("click", hits)

    def _record_events(
        self, kind: EventKind, hits: Sequence[OpenEvent] | Sequence[ClickEvent]
    ) -> int:
        """Record *hits* of known tokens in one transaction, with counters and rollup.

        Per message the counters ``open_count``/``counted_open_count``/
        ``first_open_at_us`` (or ``click_count``/``counted_click_count``) grow,
        and the ``daily_stats`` row of its relay day and sender domain gets the
        events by verdict and, for a message's first (counted) event, ``opened_any``
        and ``opened`` (``clicked``).
        """
        if not hits:
            return 0
        aggregate = self.tracking_mode == "aggregate"
        conn = self._conn
        try:
            with immediate_transaction(conn):
                owners: dict[str, str] = {}  # link token → tracking id
                if kind == "click":
                    owners = _select_in(
                        conn,
                        "SELECT token, tracking_id FROM links WHERE token IN ({})",
                        {hit.link_token for hit in hits if isinstance(hit, ClickEvent)},
                    )
                messages = {
                    str(row[0]): _MessageState(row[1:])
                    for row in _select_rows_in(
                        conn,
                        _MessageState.SELECT_BY_TRACKING_IDS,
                        {
                            owners.get(hit.link_token, "")
                            if isinstance(hit, ClickEvent)
                            else hit.tracking_id
                            for hit in hits
                        }
                        - {""},
                    )
                }
                rows = _event_rows(
                    kind,
                    hits,
                    owners,
                    messages,
                    classify=self.classifier,
                    apply=self.address_policy.apply,
                    aggregate=aggregate,
                )
                if not aggregate:
                    conn.executemany(_INSERT_CLICK if kind == "click" else _INSERT_OPEN, rows)
                if self.outbox is not None:
                    self.outbox.events_recorded(conn, kind, rows)
                _MessageState.save_all(conn, messages.values())
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record {len(hits)} {kind}s: {exc}") from exc
        return len(rows)
