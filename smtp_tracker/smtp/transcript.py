"""A bounded record of an SMTP conversation, both sides, for debug capture files.

Lines are kept as they were said, except SMTP AUTH payloads, which are replaced
by ``AUTH <redacted>`` before they are ever stored (they carry credentials,
RFC 4954 §4).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

__all__ = ["Transcript", "TranscriptLine"]

#: Directions, as written in the capture file.
CLIENT_SAID = "C>"
WE_SAID_TO_CLIENT = "C<"
WE_SAID_TO_UPSTREAM = "U>"
UPSTREAM_SAID = "U<"
NOTE = "--"


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    """One line: wall-clock time (seconds since the epoch), direction, text."""

    at: float
    direction: str
    text: str

    def render(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.gmtime(self.at))
        millis = int((self.at % 1) * 1000)
        return f"{stamp}.{millis:03d} {self.direction} {self.text}"


def redact(line: str) -> str:
    """Hide credentials: ``AUTH PLAIN xxx`` → ``AUTH <redacted>``.

    Continuation lines of an AUTH exchange are redacted by the caller, which
    knows it is inside one.
    """
    head = line[:5].upper()
    if head == "AUTH " or head == "AUTH":
        return "AUTH <redacted>"
    return line


class Transcript:
    """The lines of one SMTP session, at most ``max_lines`` (oldest dropped first).

    :param max_lines: bound on memory; a session that talks more keeps its tail.
    :param max_line_chars: each line is cut to this many characters.
    """

    def __init__(self, *, max_lines: int = 2000, max_line_chars: int = 1000) -> None:
        self._lines: deque[TranscriptLine] = deque(maxlen=max_lines)
        self._max_line_chars = max_line_chars
        self._mark = 0
        self._dropped = 0

    def add(self, direction: str, text: str) -> None:
        """Record one line said in ``direction`` (one of the direction constants)."""
        if len(self._lines) == self._lines.maxlen:
            self._dropped += 1
        line = redact(text.rstrip("\r\n"))[: self._max_line_chars]
        self._lines.append(TranscriptLine(time.time(), direction, line))

    def take(self) -> list[str]:
        """The rendered lines said since the last :meth:`take`, which starts a new segment.

        Each transaction's capture gets the lines since the previous one ended,
        so the first transaction also shows the greeting, EHLO and STARTTLS.
        """
        lines = [line.render() for line in self._lines]
        if self._dropped:
            lines.insert(0, f"-- {self._dropped} earlier lines not kept")
        self._lines.clear()
        self._dropped = 0
        return lines
