"""The PostgreSQL read path: messages with their events and links, and the reports
(:mod:`smtp_tracker.store.queries`, the very functions SQLite runs), each read in one
``REPEATABLE READ`` snapshot."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime

from smtp_tracker.store import queries
from smtp_tracker.store.postgresql.connection import Connected
from smtp_tracker.store.records import LinkRecord, MessageRecord, StoredMessage
from smtp_tracker.store.rows import (
    MESSAGE_COLUMNS,
    ORDER,
    listing_clauses,
    message_from_row,
    with_events,
)

__all__ = ["Reading"]


class Reading(Connected):
    """The reads of :class:`~.database.PgDatabase`."""

    def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`.base.Store.find_message` (look-ups of :func:`.queries.ident_candidates`)."""

        def query() -> StoredMessage | None:
            for column, value in queries.ident_candidates(ident):
                row = self._conn.execute(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE {column} = ? {ORDER} LIMIT 1",  # noqa: S608 - constants
                    (value,),
                ).fetchone()
                if row is not None:
                    return self._with_events([message_from_row(row)])[0]
            return None

        return self._read(query)

    def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`.base.Store.list_messages`."""
        where, tail, params = listing_clauses(since, limit)
        sql = f"SELECT {MESSAGE_COLUMNS} FROM messages {where} {ORDER} {tail}"  # noqa: S608 - constants

        def query() -> list[StoredMessage]:
            rows = self._conn.execute(sql, params).fetchall()
            return self._with_events([message_from_row(row) for row in rows])

        return self._read(query)

    def _with_events(self, records: list[MessageRecord]) -> list[StoredMessage]:
        ids = [record.tracking_id for record in records]
        return with_events(self._conn, records, "tracking_id = ANY(?)", (ids,))

    def is_known_token(self, tracking_id: str) -> bool:
        """See :meth:`.base.Store.is_known_token`."""
        return self._read(
            lambda: (
                self._conn.execute(
                    "SELECT 1 FROM messages WHERE tracking_id = ?", (tracking_id,)
                ).fetchone()
                is not None
            )
        )

    def find_link(self, token: str) -> tuple[LinkRecord, str] | None:
        """See :meth:`.base.Store.find_link`."""
        row = self._read(
            lambda: self._conn.execute(
                "SELECT url, position, tracking_id FROM links WHERE token = ?", (token,)
            ).fetchone()
        )
        if row is None:
            return None
        return LinkRecord(token=token, url=row[0], position=int(row[1])), str(row[2])

    # -- reports: the shared queries ------------------------------------------------------

    def query_messages(
        self,
        message_filter: queries.MessageFilter,
        *,
        limit: int = queries.DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> queries.MessagePage:
        """See :func:`.queries.query_messages`."""
        return self._read(
            lambda: queries.query_messages(self._conn, message_filter, limit=limit, cursor=cursor)
        )

    def query_message(self, ident: str) -> queries.MessageDetail | None:
        """See :func:`.queries.query_message`."""
        return self._read(lambda: queries.query_message(self._conn, ident))

    def query_stats(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        group: queries.StatsGroup = "day",
    ) -> list[queries.StatsRow]:
        """See :func:`.queries.query_stats`."""
        return self._read(
            lambda: queries.query_stats(self._conn, since=since, until=until, group=group)
        )

    def export_rows(
        self, message_filter: queries.MessageFilter, *, page_rows: int = queries.MAX_LIMIT
    ) -> Iterator[queries.MessageSummary]:
        """Every message *message_filter* selects, newest first, one page per read."""
        yield from queries.pages(
            lambda cursor: self.query_messages(message_filter, limit=page_rows, cursor=cursor)
        )

    def integrity_check(self) -> str:
        """``"ok"`` when the server answers (PostgreSQL checks its own pages)."""
        return self._read(lambda: "ok" if self._conn.execute("SELECT 1").fetchone() else "no")
