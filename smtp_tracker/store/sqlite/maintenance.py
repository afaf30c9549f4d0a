"""Keeping the SQLite store: retention, forgetting a recipient, reclassification.

Thin over :mod:`smtp_tracker.store.retention`, :mod:`.consent`
and :mod:`.reclassify` (shared with PostgreSQL): each batch
is one write transaction, and ``sqlite3`` errors become :class:`StoreError`.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, date, datetime, timedelta

from smtp_tracker.errors import StoreError
from smtp_tracker.store import consent, reclassify, retention
from smtp_tracker.store.records import EventClassifier
from smtp_tracker.store.rows import to_us
from smtp_tracker.store.sqlite.connection import Connected

__all__ = ["Maintenance"]


class Maintenance(Connected):
    """Retention and reclassification of :class:`~.database.SqliteDatabase`, which sets
    the attributes below (see there)."""

    classifier: EventClassifier
    link_retention_days: int

    def prune_batch(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """See :func:`.retention.prune_batch`: one transaction, the oldest first.

        :raises ValueError: when *before* is naive or *batch_rows* not positive.
        :raises StoreError: when the store cannot be written.
        """
        before_us = to_us(before)
        try:
            return retention.prune_batch(self._conn, before_us, batch_rows=batch_rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prune the store: {exc}") from exc

    def prune(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """Every message relayed before *before*, with its events, links and recipients.

        In transactions of about *batch_rows* rows (see :meth:`prune_batch`).
        """
        total = retention.Removed()
        while True:
            removed = self.prune_batch(before, batch_rows=batch_rows)
            total += removed
            if removed.messages == 0:
                break
        while links := self.prune_links_batch(batch_rows=batch_rows):
            total += retention.Removed(links=links)
        return total

    def prune_links_batch(
        self, *, now: datetime | None = None, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> int:
        """One batch of :func:`.retention.prune_links_batch` for :attr:`link_retention_days`
        before *now*; 0 when the days are 0 (kept forever).

        :raises StoreError: when the store cannot be written.
        """
        if self.link_retention_days <= 0:
            return 0
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.link_retention_days)
        try:
            return retention.prune_links_batch(self._conn, to_us(cutoff), batch_rows=batch_rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prune the store's links: {exc}") from exc

    def count_prunable(self, before: datetime) -> retention.Removed:
        """What :meth:`prune` would delete (see :func:`.retention.count_older`)."""
        before_us = to_us(before)
        return self._read(lambda: retention.count_older(self._conn, before_us))

    def forget_recipient(
        self, address: str, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """Every message sent to *address*, whole (see :func:`.retention.forget_recipient_batch`).

        :raises StoreError: when the store cannot be written.
        """
        total = retention.Removed()
        while True:
            try:
                removed = retention.forget_recipient_batch(
                    self._conn, address, batch_rows=batch_rows
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot forget {address}: {exc}") from exc
            total += removed
            if removed.messages == 0:
                break
        try:  # objection links naming the address; an objection itself stays
            consent.forget_address(self._conn, address)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot forget {address}: {exc}") from exc
        return total

    def count_recipient(self, address: str) -> retention.Removed:
        """What :meth:`forget_recipient` would delete (see :func:`.retention.count_recipient`)."""
        return self._read(lambda: retention.count_recipient(self._conn, address))

    # -- reclassification (smtp_tracker.store.reclassify) ------------------------------

    def reclassify_scope(self, since: date | None) -> tuple[int, list[str]]:
        """How many messages :meth:`reclassify_batch` will read, and the days to rebuild.

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
        """See :func:`.reclassify.reclassify_batch`, with this store's classifier.

        :raises StoreError: when the store cannot be written.
        """
        try:
            return reclassify.reclassify_batch(
                self._conn,
                self.classifier,
                since=since,
                after_rowid=after_rowid,
                batch_messages=batch_messages,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot reclassify: {exc}") from exc

    def rebuild_rollup_day(self, day: str) -> reclassify.DayRebuild:
        """See :func:`.reclassify.rebuild_rollup_day`.

        :raises StoreError: when the store cannot be written.
        """
        try:
            return reclassify.rebuild_rollup_day(self._conn, day)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot rebuild the daily counts of {day}: {exc}") from exc
