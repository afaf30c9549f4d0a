"""``events_log``: the events as JSON lines (NDJSON), for Vector, Fluent Bit or Filebeat.

The file is opened for appending (created mode 0640) and reopened by name
after :meth:`EventLog.reopen` (SIGHUP), so logrotate can move it away and
signal.  Lines are written by the webhook sender from the outbox, so a line is
written only for an event committed with its record, and again after a crash
between the write and the outbox's deletion (at least once, like the webhooks).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

__all__ = ["EventLog"]


class EventLog:
    """An append-only NDJSON file; :meth:`write` is blocking (call it in a thread).

    :param path: the file; its directory must exist.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._reopen = False
        self._lock = threading.Lock()
        #: lines written
        self.lines = 0

    def reopen(self) -> None:
        """Close the file before the next write and open it again by name (SIGHUP)."""
        self._reopen = True

    def write(self, bodies: Sequence[str]) -> None:
        """Append one line per JSON text in *bodies* and flush.

        :raises OSError: when the file cannot be opened or written.
        """
        data = "".join(body + "\n" for body in bodies).encode("utf-8")
        with self._lock:
            if self._reopen:
                self._reopen = False
                self._close()
            if self._file is None:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self._file = os.fdopen(fd, "ab")
            try:
                self._file.write(data)
                self._file.flush()
            except OSError:
                self._close()  # open again on the next try
                raise
            self.lines += len(bodies)

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
