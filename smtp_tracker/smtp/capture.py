"""Debug capture files: the conversation and the DATA of a transaction, on disk.

For each captured transaction, under ``DATA_DIR/capture/YYYY-MM-DD/`` (UTC date):

- ``<queueid>.session.log``: both sides' commands and replies, AUTH redacted;
- ``<queueid>.downstream.eml``: DATA as received from the client (after dot-unstuffing);
- ``<queueid>.upstream.eml``: DATA as sent to the upstream (trace header, pixel).

Directories are created 0700 and files 0600: they hold whole messages.  Writes
happen in a worker thread, never in the event loop; at most ``max_pending``
captures wait at once, and captures beyond that are dropped and counted
rather than letting memory grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Literal

__all__ = [
    "CAPTURE_SUFFIXES",
    "Capture",
    "CaptureWriter",
    "captures_before",
    "captures_of",
    "remove_files",
]

log = logging.getLogger("smtp_tracker.capture")


@dataclass(frozen=True, slots=True)
class Capture:
    """What one transaction leaves on disk; ``None`` parts are not written."""

    queue_id: str
    at: datetime
    session_lines: list[str]
    downstream: bytes | None
    upstream: bytes | None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_capture(root: Path, capture: Capture) -> Path:
    """Write one capture's files (blocking; call it in a thread).

    :returns: the day directory written to.
    :raises OSError: when the directory or a file cannot be created.
    """
    day = root / capture.at.strftime("%Y-%m-%d")
    # The modes are given to mkdir/open, never through the process-wide umask:
    # two threads saving and restoring it at once can leave it at 077 for
    # good (one restores the other's temporary value).  A mode given to mkdir
    # can only lose bits to the umask, so these stay 0700 whatever it is.
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    day.mkdir(mode=0o700, exist_ok=True)
    stem = day / capture.queue_id
    text = "\n".join(capture.session_lines) + "\n"
    _write_private(stem.with_suffix(".session.log"), text.encode("utf-8", "replace"))
    if capture.downstream is not None:
        _write_private(stem.with_suffix(".downstream.eml"), capture.downstream)
    if capture.upstream is not None:
        _write_private(stem.with_suffix(".upstream.eml"), capture.upstream)
    return day


class CaptureWriter:
    """Writes captures per the ``capture`` setting, off the event loop.

    :param root: ``DATA_DIR/capture``.
    :param mode: ``"off"``, ``"errors"`` (only transactions that did not end 2xx)
        or ``"all"``.
    :param max_pending: captures allowed to wait for the disk at once.
    """

    def __init__(
        self,
        root: Path,
        *,
        mode: Literal["off", "errors", "all"],
        max_pending: int = 64,
    ) -> None:
        self.root = root
        self.mode = mode
        self.dropped = 0
        self.failed = 0
        self._max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        """Whether anything is ever captured (so callers keep transcripts at all)."""
        return self.mode != "off"

    def wanted(self, *, ended_positive: bool) -> bool:
        """Whether a transaction that ended so is to be captured."""
        return self.mode == "all" or (self.mode == "errors" and not ended_positive)

    def submit(self, capture: Capture) -> None:
        """Queue a capture for writing; drop and count it when too many are waiting."""
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            log.warning(
                "%s: capture dropped: %d captures already waiting for the disk",
                capture.queue_id,
                len(self._pending),
            )
            return
        task = asyncio.get_running_loop().create_task(self._write(capture))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, capture: Capture) -> None:
        try:
            await asyncio.to_thread(write_capture, self.root, capture)
        except OSError as exc:
            self.failed += 1
            log.warning("%s: capture not written: %s", capture.queue_id, exc.strerror or exc)

    async def drain(self) -> None:
        """Wait until every queued capture is written (at shutdown, and in tests)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


# -- retention: removing capture files (prune, forget) -----------------------------------

#: The files one captured transaction may leave, by suffix.
CAPTURE_SUFFIXES = (".session.log", ".downstream.eml", ".upstream.eml")


def _day_directories(root: Path) -> list[tuple[date, Path]]:
    """The ``YYYY-MM-DD`` directories under ``root`` with their dates; others are ignored."""
    days: list[tuple[date, Path]] = []
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return days
    for entry in entries:
        try:
            day = datetime.strptime(entry.name, "%Y-%m-%d").date()
        except ValueError:
            continue
        if entry.is_dir() and not entry.is_symlink():
            days.append((day, entry))
    return sorted(days)


def _transaction_files(directory: Path) -> list[Path]:
    return [
        path
        for path in directory.iterdir()
        if path.is_file() and path.name.endswith(CAPTURE_SUFFIXES)
    ]


def captures_before(root: Path, day: date) -> list[Path]:
    """Capture files in day directories older than ``day`` (whole days, UTC)."""
    return [
        path
        for directory_day, directory in _day_directories(root)
        if directory_day < day
        for path in _transaction_files(directory)
    ]


def captures_of(root: Path, queue_ids: Iterable[str], mentioning: Iterable[str] = ()) -> list[Path]:
    """Capture files of the transactions ``queue_ids``, and of those whose session mentions a path.

    :param mentioning: addresses (lower case) looked for as ``<address>`` in
        each ``.session.log`` (MAIL FROM, RCPT TO), case-insensitively: it
        finds the transactions that were not recorded (refused upstream,
        ``capture = "errors"``) too.
    """
    wanted = set(queue_ids)
    needles = [f"<{address.lower()}>" for address in mentioning]
    found: list[Path] = []
    for _day, directory in _day_directories(root):
        files = _transaction_files(directory)
        queue_ids_here = set(wanted)
        if needles:
            for path in files:
                if path.name.endswith(".session.log"):
                    text = path.read_text("utf-8", "replace").lower()
                    if any(needle in text for needle in needles):
                        queue_ids_here.add(path.name.removesuffix(".session.log"))
        found += [p for p in files if p.name.split(".", 1)[0] in queue_ids_here]
    return found


def remove_files(paths: Iterable[Path]) -> int:
    """Delete ``paths`` (already gone is fine) and day directories left empty; the count deleted.

    :raises OSError: when a file cannot be deleted.
    """
    removed = 0
    parents: set[Path] = set()
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        parents.add(path.parent)
    for parent in parents:
        with contextlib.suppress(OSError):  # not empty: other files stay
            parent.rmdir()
    return removed
