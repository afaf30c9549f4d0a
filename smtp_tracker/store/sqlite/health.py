"""Whether a SQLite store keeps what it is given: suspended at start, checked while open.

Mail must not depend on the store (issue 12, item 8).  A ``tracker.sqlite3``
that cannot be opened at start gives a *suspended* store
(:func:`opened_or_suspended`), whose every call is refused and counted; an
open store is checked at once and every :data:`DEFAULT_HEALTH_INTERVAL_S`
seconds (:class:`StoreHealth`) and says it is *degraded* while a check finds
it damaged or losing writes.  :class:`~.store.SqliteStore` uses both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from smtp_tracker.errors import StoreError
from smtp_tracker.store.integrity import header_problem, open_held, probe

__all__ = [
    "DEFAULT_HEALTH_INTERVAL_S",
    "StoreCounters",
    "StoreHealth",
    "SuspendedDatabase",
    "opened_or_suspended",
]

log = logging.getLogger("smtp_tracker.store")

#: Seconds between two health checks of an open store (:meth:`StoreHealth.check`).
DEFAULT_HEALTH_INTERVAL_S = 300.0

_S = TypeVar("_S")


@dataclass
class StoreCounters:
    """What the store counts about its own health (plain ints; logged when it closes degraded).

    :ivar suspended_calls: calls refused because the store is suspended
        (records and look-ups that did not happen).
    :ivar health_checks: health checks run.
    :ivar health_failures: health checks that found the store damaged or losing writes.
    """

    suspended_calls: int = 0
    health_checks: int = 0
    health_failures: int = 0


class SuspendedDatabase:
    """Stands for both connections of a suspended store: closes, and nothing else."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.last_message_rowid: int | None = None

    def close(self) -> None:
        pass


async def opened_or_suspended(
    db_path: Path, open_store: Callable[[], Awaitable[_S]], suspended: Callable[[str], _S]
) -> _S:
    """``await open_store()``, or, when the database *db_path* cannot be opened,
    ``suspended(reason)`` (*reason* one line, ``"store suspended: ..."``).

    A damaged header is found before any connection is made (one could lose
    the log's writes); the suspension is logged as an error, with the commands
    that check and recover the store.

    :raises StoreError: only for what is not the database's fault: when
        *open_store* raises it and *db_path* is not a file (the data directory
        cannot be created).
    """
    try:
        # damaged headers: no connection at all, which could lose the log's writes
        problem = await asyncio.to_thread(header_problem, db_path)
        if problem is not None:
            raise StoreError(problem)
        return await open_store()
    except StoreError as exc:
        if not await asyncio.to_thread(db_path.is_file):
            raise
        log.error(
            "TRACKING SUSPENDED: the tracking store %s cannot be opened (%s); mail is "
            "relayed untracked and unrecorded until it is repaired: stop smtp-tracker, "
            "run 'smtp-tracker store check' and 'smtp-tracker store recover', start again",
            db_path,
            exc.__cause__ or exc,
        )
        return suspended(f"store suspended: {exc.__cause__ or exc}")


class StoreHealth:
    """The health of one store's database file *db_path*.

    :ivar suspended: why records are suspended (the store could not be opened
        at start), or None.
    :ivar counters: what it counts (:class:`StoreCounters`).
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.suspended: str | None = None
        self.counters = StoreCounters()
        self._degraded: str | None = None
        self._task: asyncio.Task[None] | None = None
        #: the database file, held open until the connections close: the health check
        #: reads its header through it (closing a descriptor drops the process's locks)
        self._held_fd: int | None = None

    @property
    def degraded(self) -> str | None:
        """None when the store is sound; else why records are not being kept (one line).

        Set when the store was suspended at start, or when a health check
        (:meth:`check`) found it damaged or not keeping what it was given;
        cleared by a later check that finds it sound again.
        """
        return self.suspended or self._degraded

    async def check(
        self, last: int | None, still_there: Callable[[int], Awaitable[bool]], *, closed: bool
    ) -> str | None:
        """Check the database on disk now; :attr:`degraded` follows the answer.

        :func:`.integrity.probe` on a connection of its own (``PRAGMA
        quick_check``; the last message row written, *last*, must read back),
        in a thread of its own.  A row that does not read back but is gone for
        the writer too (``await still_there(last)`` is false: pruned,
        forgotten) is not a lost write.  The file is held open from the first
        check on, unless the store is *closed*.  A change either way is logged
        (an error when it goes bad).

        :returns: None when sound, else what is wrong (one line).
        """
        if self.suspended is not None:
            return self.suspended
        self.counters.health_checks += 1
        db_path = self.db_path
        try:
            if self._held_fd is None and not closed:
                self._held_fd = open_held(db_path)
        except OSError as exc:
            problem: str | None = f"cannot read {db_path}: {exc.strerror}"
        else:
            problem = await asyncio.to_thread(probe, db_path, last, db_fd=self._held_fd)
        if (
            problem is not None
            and last is not None
            and "read back" in problem
            and not await still_there(last)
        ):
            problem = None  # gone for the writer too (pruned, forgotten): not a lost write
        if problem is not None:
            self.counters.health_failures += 1
            if self._degraded is None:
                log.error(
                    "TRACKING STORE DEGRADED: %s; records may be lost: stop smtp-tracker and run "
                    "'smtp-tracker store check'",
                    problem,
                )
        elif self._degraded is not None:
            log.warning("tracking store sound again")
        self._degraded = problem and f"store: {problem}"
        return self._degraded

    def start(self, check: Callable[[], Awaitable[object]], interval_s: float) -> None:
        """Run *check* now and every *interval_s* seconds, until :meth:`stop`."""
        self._task = asyncio.create_task(
            self._every(check, interval_s), name="smtp-tracker-store-health"
        )

    async def _every(self, check: Callable[[], Awaitable[object]], interval_s: float) -> None:
        while True:
            with contextlib.suppress(StoreError):  # closed under us
                await check()
            await asyncio.sleep(interval_s)

    async def stop(self) -> None:
        """Stop the checks :meth:`start` began (none running: nothing)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def release(self) -> None:
        """Close the held database file; only once the store's connections are closed
        (closing it drops the process's locks on the file)."""
        if self._held_fd is not None:
            os.close(self._held_fd)
            self._held_fd = None
