"""Keeping a PostgreSQL store: retention, forgetting a recipient, reclassification.

As SQLite's (:mod:`smtp_tracker.store.sqlite.maintenance`), over the shared
:mod:`smtp_tracker.store.retention` and :mod:`smtp_tracker.store.reclassify`;
the messages' rows are locked as the writers lock them, and the webhook
outbox's events go with the messages (:mod:`smtp_tracker.store.pg_outbox`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from smtp_tracker.errors import StoreError
from smtp_tracker.store import consent, pg_outbox, reclassify, retention
from smtp_tracker.store.postgresql.connection import Connected, error_text
from smtp_tracker.store.rows import to_us

__all__ = ["Maintenance"]

#: The ids of the first messages of ``{select}`` (in ``{order}``) whose rows add up to at
#: most the batch size, or the first message alone (SQLite's ``retention._BATCH``): each
#: message counts for itself, its events (its counters), its recipients and its links.
#: Parameters: those of ``{select}``, then the batch size twice.
_BATCH = """
SELECT id FROM (
    SELECT id, row_number() OVER w AS n, sum(
        1 + open_count + click_count + json_array_length(recipients::json)
        + (SELECT count(*) FROM links WHERE links.tracking_id = candidate.tracking_id)
    ) OVER w AS rows_so_far
    FROM ({select} ORDER BY {order} LIMIT ?) AS candidate
    WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)
) AS batch
WHERE n = 1 OR rows_so_far <= ?
"""
_CANDIDATES = "SELECT id, tracking_id, relayed_at_us, open_count, click_count, recipients"
_OLDER = _BATCH.format(
    select=f"{_CANDIDATES} FROM messages WHERE relayed_at_us < ?", order="relayed_at_us, id"
)
_OF_RECIPIENT = _BATCH.format(
    select=f"{_CANDIDATES} FROM messages WHERE id IN"  # noqa: S608 - constants
    " (SELECT message_rowid FROM message_recipients WHERE address = ANY(?))",
    order="id",
)


class Maintenance(Connected):
    """Retention and reclassification of :class:`~.database.PgDatabase`."""

    def _delete_messages(
        self, select_ids: str, params: Sequence[Any], failure: str, needles: Sequence[str] = ()
    ) -> retention.Removed:
        """Delete the messages whose ids *select_ids* gives, whole, in one transaction;
        with *needles*, their links whose destination holds one (forget).

        :raises StoreError: ``"{failure}: {reason}"`` when the store cannot be written
            (the transaction rolled back).
        """
        import psycopg

        conn = self._conn
        try:
            with self._raw.transaction():
                named = conn.execute(
                    f"SELECT id, tracking_id, queue_id FROM messages WHERE id IN ({select_ids})"  # noqa: S608 - constant selects
                    " ORDER BY id FOR UPDATE",
                    params,
                ).fetchall()
                if not named:
                    return retention.Removed()
                ids = [int(row[0]) for row in named]
                tracking = [str(row[1]) for row in named]
                counts = {
                    "opens": conn.execute(
                        "DELETE FROM opens WHERE tracking_id = ANY(?)", (tracking,)
                    ).rowcount,
                    "clicks": conn.execute(
                        "DELETE FROM clicks WHERE tracking_id = ANY(?)", (tracking,)
                    ).rowcount,
                    "recipients": conn.execute(
                        "DELETE FROM message_recipients WHERE message_rowid = ANY(?)", (ids,)
                    ).rowcount,
                }
                messages = conn.execute("DELETE FROM messages WHERE id = ANY(?)", (ids,)).rowcount
                if needles:
                    counts["links"] = conn.execute(
                        "DELETE FROM links WHERE tracking_id = ANY(?) AND EXISTS (SELECT 1 FROM"
                        " unnest(?::text[]) AS n(v) WHERE strpos(lower(links.url), n.v) > 0)",
                        (tracking, list(needles)),
                    ).rowcount
        except psycopg.Error as exc:
            raise StoreError(f"{failure}: {error_text(exc)}") from exc
        queue_ids = tuple(str(row[2]) for row in named) if needles else ()
        return retention.Removed(messages=messages, queue_ids=queue_ids, **counts)

    def prune_batch(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """The oldest messages relayed before *before*, as many as fit in about
        *batch_rows* rows with their events, links and recipients (at least one);
        once none is left, the webhook outbox's events created before it (as SQLite's
        :func:`.retention.prune_batch`)."""
        retention.check_batch(batch_rows)
        removed = self._delete_messages(
            _OLDER, (to_us(before), batch_rows, batch_rows), "cannot prune the store"
        )
        if removed.messages:
            return removed
        before_us = to_us(before)
        events = self._drop_outbox_events(
            lambda: pg_outbox.older_events(self._conn, before_us, batch_rows), batch_rows
        )
        return retention.Removed(outbox_events=events)

    def _drop_outbox_events(self, select: Callable[[], list[int]], limit: int | None) -> int:
        """Delete the webhook outbox events *select* names (read under the outbox's lock,
        :func:`.pg_outbox.lock_state`), one transaction per round, again while a round
        removes *limit* (None: one round).

        :raises StoreError: when the store cannot be written.
        """
        import psycopg

        total = 0
        try:
            while True:
                with self._raw.transaction():
                    pg_outbox.lock_state(self._conn)
                    gone = pg_outbox.drop_events(self._conn, select())
                total += gone
                if limit is None or gone < limit:
                    return total
        except psycopg.Error as exc:
            raise StoreError(f"cannot remove webhook events: {error_text(exc)}") from exc

    def prune_links_batch(
        self, *, now: datetime | None = None, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> int:
        """Links older than ``link_retention_days`` whose message record is gone."""
        import psycopg

        days = self._options.link_retention_days
        if days <= 0:
            return 0
        cutoff = to_us((now or datetime.now(UTC)) - timedelta(days=days))
        try:
            with self._raw.transaction():
                return retention.delete_old_links(self._conn, cutoff, batch_rows)
        except psycopg.Error as exc:
            raise StoreError(f"cannot prune the store's links: {error_text(exc)}") from exc

    def prune(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """Every message relayed before *before*, with its events, links and recipients."""
        total = retention.Removed()
        while (removed := self.prune_batch(before, batch_rows=batch_rows)).messages:
            total += removed
        total += removed  # the last: the webhook outbox's old events
        while links := self.prune_links_batch(batch_rows=batch_rows):
            total += retention.Removed(links=links)
        return total

    def count_prunable(self, before: datetime) -> retention.Removed:
        """What :meth:`prune` would delete (links left aside)."""
        counted = self._count("SELECT id FROM messages WHERE relayed_at_us < ?", (to_us(before),))
        events = self._read(lambda: pg_outbox.count_older(self._conn, to_us(before)))
        return dataclasses.replace(counted, outbox_events=events)

    def _count(self, select_ids: str, params: Sequence[Any]) -> retention.Removed:
        row = self._read(
            lambda: self._conn.execute(
                f"WITH sel AS (SELECT id, tracking_id FROM messages WHERE id IN ({select_ids}))"  # noqa: S608 - constant selects
                " SELECT (SELECT count(*) FROM sel),"
                " (SELECT count(*) FROM opens WHERE tracking_id IN (SELECT tracking_id FROM sel)),"
                " (SELECT count(*) FROM clicks WHERE tracking_id IN (SELECT tracking_id FROM sel)),"
                " (SELECT count(*) FROM message_recipients WHERE message_rowid IN"
                " (SELECT id FROM sel))",
                params,
            ).fetchone()
        )
        assert row is not None
        messages, opens, clicks, recipients = (int(v) for v in row)
        return retention.Removed(
            messages=messages, opens=opens, clicks=clicks, recipients=recipients
        )

    def forget_recipient(
        self, address: str, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """Every message sent to *address* (any of :func:`.retention.recipient_forms`), whole."""
        retention.check_batch(batch_rows)
        forms = retention.recipient_forms(address)
        total = retention.Removed()
        while (
            removed := self._delete_messages(
                _OF_RECIPIENT,
                (forms, batch_rows, batch_rows),
                f"cannot forget {address}",
                retention.needles(address),
            )
        ).messages:
            total += removed
        total += retention.Removed(
            outbox_events=self._drop_outbox_events(
                lambda: pg_outbox.events_naming(self._conn, address), None
            )
        )
        import psycopg

        try:  # objection links naming the address and a grant; an objection itself stays
            consent.forget_address(self._conn, address)
        except psycopg.Error as exc:
            raise StoreError(f"cannot forget {address}: {error_text(exc)}") from exc
        return total

    def count_recipient(self, address: str) -> retention.Removed:
        """What :meth:`forget_recipient` would delete, queue ids and links naming it included."""
        forms = retention.recipient_forms(address)
        select = "SELECT message_rowid FROM message_recipients WHERE address = ANY(?)"
        counted = self._count(select, (forms,))

        def named() -> tuple[list[Any], int]:
            rows = self._conn.execute(
                f"SELECT tracking_id, queue_id FROM messages WHERE id IN ({select})"  # noqa: S608 - constant
                " ORDER BY id",
                (forms,),
            ).fetchall()
            links = self._conn.execute(
                "SELECT count(*) FROM links WHERE tracking_id = ANY(?) AND EXISTS (SELECT 1"
                " FROM unnest(?::text[]) AS n(v) WHERE strpos(lower(links.url), n.v) > 0)",
                ([str(row[0]) for row in rows], retention.needles(address)),
            ).fetchone()
            return rows, int(links[0]) if links else 0

        rows, links = self._read(named)
        events = len(self._read(lambda: pg_outbox.events_naming(self._conn, address)))
        return dataclasses.replace(
            counted, links=links, queue_ids=tuple(str(row[1]) for row in rows), outbox_events=events
        )

    # -- reclassification (smtp_tracker.store.reclassify) ------------------------------

    def reclassify_scope(self, since: date | None) -> tuple[int, list[str]]:
        """As :meth:`.sqlite.SqliteDatabase.reclassify_scope`.

        :raises StoreError: when the store cannot be read.
        """
        return self._read(
            lambda: (
                reclassify.count_messages(self._conn, since),
                reclassify.days_from(self._conn, since),
            )
        )

    def reclassify_batch(
        self,
        *,
        since: date | None = None,
        after_rowid: int = 0,
        batch_messages: int = reclassify.DEFAULT_BATCH_MESSAGES,
    ) -> reclassify.Batch:
        """See :func:`.reclassify.reclassify_batch` (the messages' rows locked, as the
        writers lock them), with this store's classifier.

        :raises StoreError: when the store cannot be written.
        """
        import psycopg

        try:
            return reclassify.reclassify_batch(
                self._conn,
                self._options.classifier,
                since=since,
                after_rowid=after_rowid,
                batch_messages=batch_messages,
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot reclassify: {error_text(exc)}") from exc

    def rebuild_rollup_day(self, day: str) -> reclassify.DayRebuild:
        """See :func:`.reclassify.rebuild_rollup_day` (``daily_stats`` locked against writers).

        :raises StoreError: when the store cannot be written.
        """
        import psycopg

        try:
            return reclassify.rebuild_rollup_day(self._conn, day)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot rebuild the daily counts of {day}: {error_text(exc)}"
            ) from exc
