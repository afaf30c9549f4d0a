"""The SQLite read path: messages with their events and links, and the reports.

Each read runs in one read transaction (:meth:`~.connection.Connected._read`),
so it sees one snapshot; in WAL mode it never waits for a writer.  The
reports are :mod:`smtp_tracker.store.queries`, shared with PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from typing import Any

from smtp_tracker.errors import StoreError
from smtp_tracker.store import queries
from smtp_tracker.store.records import LinkRecord, MessageRecord, StoredMessage
from smtp_tracker.store.rows import MESSAGE_COLUMNS as _MESSAGE_COLUMNS
from smtp_tracker.store.rows import ORDER as _ORDER
from smtp_tracker.store.rows import listing_clauses as _listing_clauses
from smtp_tracker.store.rows import message_from_row as _message_from_row
from smtp_tracker.store.rows import with_events as _events_of
from smtp_tracker.store.sqlite.connection import Connected

__all__ = ["Reading"]


class Reading(Connected):
    """The reads of :class:`~.database.SqliteDatabase`."""

    def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`.base.Store.find_message`."""

        def query() -> StoredMessage | None:
            for column, value in queries.ident_candidates(ident):
                row = self._conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {column} = ? {_ORDER} LIMIT 1",  # noqa: S608 - constants
                    (value,),
                ).fetchone()
                if row is not None:
                    return self._with_events(
                        [_message_from_row(row)], "tracking_id = ?", (row[0],)
                    )[0]
            return None

        return self._read(query)

    def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`.base.Store.list_messages`."""
        where, tail, params = _listing_clauses(since, limit)
        selected = f"SELECT {{}} FROM messages {where} {_ORDER} {tail}"  # noqa: S608 - constants

        def query() -> list[StoredMessage]:
            rows = self._conn.execute(selected.format(_MESSAGE_COLUMNS), params).fetchall()
            return self._with_events(
                [_message_from_row(row) for row in rows],
                f"tracking_id IN ({selected.format('tracking_id')})",
                params,
            )

        return self._read(query)

    def is_known_token(self, tracking_id: str) -> bool:
        """See :meth:`.base.Store.is_known_token`."""
        try:
            row = self._conn.execute(
                "SELECT 1 FROM messages WHERE tracking_id = ?", (tracking_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store: {exc}") from exc
        return row is not None

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"``, or the problems found, one per line."""
        rows = self._read(lambda: self._conn.execute("PRAGMA integrity_check").fetchall())
        return "\n".join(str(row[0]) for row in rows)

    def find_link(self, token: str) -> tuple[LinkRecord, str] | None:
        """The wrapped link with click token *token* and its message's tracking id.

        :raises StoreError: when the store cannot be read.
        """
        try:
            row = self._conn.execute(
                "SELECT url, position, tracking_id FROM links WHERE token = ?", (token,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store: {exc}") from exc
        if row is None:
            return None
        return LinkRecord(token=token, url=row[0], position=int(row[1])), str(row[2])

    def _with_events(
        self, records: list[MessageRecord], where: str, params: Iterable[Any]
    ) -> list[StoredMessage]:
        """*records* with their links, opens and clicks (``where`` selects their tracking ids)."""
        return _events_of(self._conn, records, where, tuple(params))

    # -- reports (smtp_tracker.store.queries) ----------------------------------------

    def query_messages(
        self,
        message_filter: queries.MessageFilter,
        *,
        limit: int = queries.DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> queries.MessagePage:
        """See :func:`.queries.query_messages` (one snapshot).

        :raises ValueError: when *limit* or *cursor* is invalid, or a filter time naive.
        :raises StoreError: when the store cannot be read.
        """
        return self._read(
            lambda: queries.query_messages(self._conn, message_filter, limit=limit, cursor=cursor)
        )

    def query_message(self, ident: str) -> queries.MessageDetail | None:
        """See :func:`.queries.query_message` (one snapshot).

        :raises StoreError: when the store cannot be read.
        """
        return self._read(lambda: queries.query_message(self._conn, ident))

    def query_stats(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        group: queries.StatsGroup = "day",
    ) -> list[queries.StatsRow]:
        """See :func:`.queries.query_stats`.

        :raises ValueError: when *group* is unknown or *since* after *until*.
        :raises StoreError: when the store cannot be read.
        """
        return self._read(
            lambda: queries.query_stats(self._conn, since=since, until=until, group=group)
        )

    def export_rows(
        self, message_filter: queries.MessageFilter, *, page_rows: int = queries.MAX_LIMIT
    ) -> Iterator[queries.MessageSummary]:
        """Every message *message_filter* selects, newest first, *page_rows* per read.

        Memory stays flat: one page at a time, each in its own short read
        transaction (so a long export never holds a snapshot that keeps the
        WAL from being checkpointed).

        :raises ValueError: when a filter time is naive.
        :raises StoreError: when the store cannot be read.
        """
        yield from queries.pages(
            lambda cursor: self.query_messages(message_filter, limit=page_rows, cursor=cursor)
        )
