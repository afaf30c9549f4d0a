"""Retention across the data directory: the store's records and the debug capture files.

``retention_days`` counts from a message's relay time: a record older than
that goes whole (its opens, clicks, links and recipient rows with it, see
:mod:`smtp_tracker.store.retention`), and so do capture day directories
(``DATA_DIR/capture/YYYY-MM-DD/``) whose whole day is older.  The
``daily_stats`` rollup stays: counts per day and sender domain, nothing about
a person.

``smtp-tracker prune`` and ``forget`` call :func:`prune_data_dir` and
:func:`forget_recipient` (blocking, from the command line); ``serve`` runs a
:class:`Pruner`, which prunes shortly after start and then once a day, in
batches on the store's writer thread, never in the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from smtp_tracker.errors import StoreError
from smtp_tracker.smtp.capture import captures_before, captures_of, remove_files
from smtp_tracker.store.base import Database, ReportingStore
from smtp_tracker.store.retention import DEFAULT_BATCH_ROWS, Removed, recipient_forms

__all__ = ["Outcome", "Pruner", "cutoff", "forget_recipient", "prune_data_dir"]

log = logging.getLogger("smtp_tracker.pruner")

#: Seconds after start before serve's first prune (lets start-up finish first).
FIRST_PRUNE_DELAY_S = 60.0
#: Seconds between two prunes in serve.
PRUNE_INTERVAL_S = 86_400.0


def cutoff(retention_days: int, now: datetime | None = None) -> datetime | None:
    """The relay time before which records go, or None when ``retention_days`` is 0 (forever)."""
    if retention_days <= 0:
        return None
    return (now or datetime.now(UTC)) - timedelta(days=retention_days)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a prune or forget removed (or, for a dry run, would remove).

    :param removed: store rows per table.
    :param capture_files: capture files deleted (or to be).
    """

    removed: Removed
    capture_files: int

    def summary(self) -> str:
        """``5 messages, 15 opens, 4 clicks, 10 links, 10 recipients, 3 capture files``."""
        parts = [f"{count} {name}" for name, count in self.removed.counts().items()]
        return ", ".join([*parts, f"{self.capture_files} capture files"])


def prune_data_dir(
    database: Database,
    capture_root: Path,
    before: datetime,
    *,
    dry_run: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Outcome:
    """Remove records relayed before ``before`` and capture days older than its day.

    :raises StoreError: when the store cannot be read or written.
    :raises OSError: when a capture file cannot be deleted.
    """
    files = captures_before(capture_root, before.astimezone(UTC).date())
    if dry_run:
        return Outcome(database.count_prunable(before), len(files))
    removed = database.prune(before, batch_rows=batch_rows)
    return Outcome(removed, remove_files(files))


def forget_recipient(
    database: Database,
    capture_root: Path,
    address: str,
    *,
    dry_run: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Outcome:
    """Remove every record of a message sent to ``address``, and the capture files about it.

    Capture files go for the removed messages' queue ids and for every
    captured transaction whose conversation names ``<address>``.

    :raises StoreError: when the store cannot be read or written.
    :raises OSError: when a capture file cannot be read or deleted.
    """
    forms = recipient_forms(address)
    if dry_run:
        planned = database.count_recipient(address)
        return Outcome(planned, len(captures_of(capture_root, planned.queue_ids, forms)))
    removed = database.forget_recipient(address, batch_rows=batch_rows)
    files = captures_of(capture_root, removed.queue_ids, forms)
    return Outcome(removed, remove_files(files))


class Pruner:
    """``serve``'s automatic prune: once shortly after start, then every day.

    :param store: the open store (each batch runs on its writer thread).
    :param capture_root: ``DATA_DIR/capture``.
    :param retention_days: days records are kept (> 0).
    :param first_delay_s: seconds from :meth:`start` to the first prune.
    :param interval_s: seconds between prunes.
    :param batch_rows: rows deleted per transaction (whole messages, at least one).
    """

    def __init__(
        self,
        store: ReportingStore,
        capture_root: Path,
        retention_days: int,
        *,
        first_delay_s: float = FIRST_PRUNE_DELAY_S,
        interval_s: float = PRUNE_INTERVAL_S,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> None:
        if retention_days <= 0:
            raise ValueError("retention_days must be positive for a Pruner")
        self._store = store
        self._capture_root = capture_root
        self._retention_days = retention_days
        self._first_delay_s = first_delay_s
        self._interval_s = interval_s
        self._batch_rows = batch_rows
        self._task: asyncio.Task[None] | None = None
        #: Completed prunes (for the logs at shutdown and for tests).
        self.runs = 0
        self.failures = 0

    def start(self) -> None:
        """Schedule the prunes in the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="pruner")

    async def stop(self) -> None:
        """Cancel the schedule; a batch already running on the writer thread completes."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def prune_once(self) -> Outcome | None:
        """Prune now; failures are logged and counted, not raised."""
        before = cutoff(self._retention_days)
        assert before is not None
        try:
            removed = await self._store.prune(before, batch_rows=self._batch_rows)
            day = before.date()
            files = await asyncio.to_thread(
                lambda: remove_files(captures_before(self._capture_root, day))
            )
        except (StoreError, OSError) as exc:
            self.failures += 1
            log.warning("prune failed: %s; next try in %.0f s", exc, self._interval_s)
            return None
        self.runs += 1
        outcome = Outcome(removed, files)
        log.info(
            "pruned records relayed before %s (retention_days=%d): %s",
            before.isoformat(timespec="seconds"),
            self._retention_days,
            outcome.summary(),
        )
        return outcome

    async def _loop(self) -> None:
        await asyncio.sleep(self._first_delay_s)
        while True:
            await self.prune_once()
            await asyncio.sleep(self._interval_s)
