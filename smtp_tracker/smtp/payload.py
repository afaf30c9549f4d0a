"""The DATA payload read in chunks, with the outcome of aiosmtpd's line reader.

aiosmtpd 1.4 reads a payload with one ``StreamReader.readuntil(b"\\r\\n")`` per
line; for a 15 KB HTML message that is some 300 awaits, and it was the largest
part of the relay's own cost (issue 15's profile).  :func:`read_payload` reads
up to the end of data in chunks of up to :data:`CHUNK_BYTES` with
``readuntil(b"\\r\\n.\\r\\n")``, and then applies the line reader's rules to what
it read, so that the bytes and the refusals are the same for every input and
every way the input arrives in pieces (``tests/perf/test_payload.py`` checks
this against aiosmtpd itself with Hypothesis):

- only ``<CRLF>.<CRLF>`` ends the payload (RFC 5321 §4.1.1.4), including at its
  very start (the empty message); ``<LF>.<LF>`` and the other bare-CR/LF
  variants are content (SMTP smuggling, CVE-2023-51764);
- not one octet past the end of data is consumed: pipelined commands after it
  stay in the reader;
- the payload is counted line by line, stuffing dots included, against the
  size limit (``552``, RFC 1870 §6.3), and a line (CRLF included) over the line
  limit refuses it (``500``, RFC 5321 §4.5.3.1.6); when both happen, the one the
  line reader meets first decides, with its thresholds (a line of
  ``line_limit + 3`` octets or more overruns aiosmtpd's stream limit before it
  is counted);
- a leading dot is removed from every line (RFC 5321 §4.5.2).

Past the size limit nothing more is kept: the rest is read and dropped.
"""

from __future__ import annotations

import asyncio
import enum
import io
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "CHUNK_BYTES",
    "END_OF_DATA",
    "WIRE_CHUNK_BYTES",
    "DataState",
    "Payload",
    "judge",
    "normalize_line_endings",
    "read_payload",
    "wire_form",
    "wire_pieces",
]

#: RFC 5321 §4.1.1.4: the end of mail data, with the CRLF that ends the last line.
END_OF_DATA = b"\r\n.\r\n"
#: The most read at once (the stream limit while a payload is read), in octets.
CHUNK_BYTES = 64 * 1024
#: About the most of a message's wire form made at once (:func:`wire_pieces`), in octets.
WIRE_CHUNK_BYTES = 256 * 1024


class DataState(enum.Enum):
    """The outcome, as aiosmtpd's ``_DataState`` names it."""

    NOMINAL = "nominal"
    TOO_LONG = "too long"  # 500 5.5.2, RFC 5321 §4.5.3.1.6
    TOO_MUCH = "too much"  # 552 5.3.4, RFC 1870 §6.3


@dataclass(frozen=True, slots=True)
class Payload:
    """What DATA brought: the unstuffed content when nominal, else empty."""

    state: DataState
    content: bytes


def _partial_end(tail: bytes) -> int:
    """The length of the longest suffix of ``tail`` that begins :data:`END_OF_DATA` (0-4)."""
    for size in range(min(len(tail), len(END_OF_DATA) - 1), 0, -1):
        if tail.endswith(END_OF_DATA[:size]):
            return size
    return 0


def judge(
    data: bytes, *, size_limit: int | None, line_limit: int, complete: bool
) -> DataState | None:
    """What aiosmtpd's line reader decides for ``data`` (lines before the end of data).

    :param data: the payload as sent (stuffing dots in), from its first octet.
    :param size_limit: the SIZE limit in octets; None or 0 for none.
    :param line_limit: aiosmtpd's ``line_length_limit`` (its stream limit too), in octets.
    :param complete: whether ``data`` is all of it; if not, a last line without
        its CRLF may leave the outcome open.
    :returns: the state, or None when an incomplete ``data`` does not decide it yet.
    """
    # The common case at C speed: with no bare LF, every run of octets between
    # LFs is one line and its CR.
    if (
        complete
        and (not size_limit or len(data) <= size_limit)
        and data.count(b"\n") == data.count(b"\r\n")
        and _runs_shorter_than(data, line_limit)
    ):
        return DataState.NOMINAL
    overrun = line_limit + 3  # readuntil raises before the line is counted
    position = counted = 0
    while position < len(data):
        end = data.find(b"\r\n", position)
        if end < 0:
            return DataState.TOO_LONG if len(data) - position >= overrun else None
        size = end + 2 - position
        if size >= overrun:
            return DataState.TOO_LONG
        counted += size
        if size_limit and counted > size_limit:
            return DataState.TOO_MUCH
        if size > line_limit:
            return DataState.TOO_LONG
        position = end + 2
    return DataState.NOMINAL if complete else None


def _runs_shorter_than(data: bytes, limit: int) -> bool:
    """Whether every run of octets without LF in ``data`` is shorter than ``limit``.

    A window of ``limit`` octets without LF is such a run; otherwise the next
    window starts after the window's last LF, so that a run of ``limit`` octets
    or more always fills a window of its own.  About ``len(data) / limit``
    searches at C speed for short lines (a list of every line took a
    hundredth of the relay's CPU per message, issue 15).
    """
    position = 0
    while len(data) - position >= limit:
        last = data.rfind(b"\n", position, position + limit)
        if last < 0:
            return False
        position = last + 1
    return True


def unstuff(data: bytes) -> bytes:
    """Remove each line's leading dot (RFC 5321 §4.5.2); ``data`` ends with CRLF or is empty."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


def normalize_line_endings(content: bytes) -> bytes | None:
    """``content`` with every bare CR and bare LF made CRLF, or None if it has none.

    RFC 5321 §2.3.8: in SMTP, CR and LF appear only together, as CRLF.  The
    check is two byte counts; the rewrite runs only for a payload that needs it.

    :param content: a received payload (after dot-unstuffing).
    """
    crlf = content.count(b"\r\n")
    if content.count(b"\r") == crlf and content.count(b"\n") == crlf:
        return None
    # Every line end to LF, then every LF to CRLF: bytes.replace, not a regex (5-10x faster).
    return content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def wire_form(content: bytes) -> bytes:
    """A message as DATA carries it: every line ending CRLF, dot-stuffed, with the end of data.

    RFC 5321 §2.3.8 (bare CR and bare LF become CRLF), §4.5.2 (a line's leading
    dot is doubled), §4.1.1.4 (``.<CRLF>`` after the last line's CRLF, which is
    added when missing).  The same octets aiosmtplib's ``data()`` writes after
    the 354 (``tests/perf/test_payload.py`` checks it against aiosmtplib with
    Hypothesis), made with ``bytes`` methods instead of its two regular
    expressions: a payload we received and normalised needs no line-ending
    change, and then only the byte counts run (issue 15).  An empty message is
    the end-of-data line alone, as Postfix relays one (aiosmtplib would send
    an empty line first).

    :param content: the message, header and body; any line endings.
    :returns: the octets to write after the upstream's 354.
    """
    if not content:
        return b".\r\n"
    normalized = normalize_line_endings(content)
    if normalized is not None:
        content = normalized
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def wire_pieces(
    content: bytes, *, head: bytes = b"", chunk_bytes: int = WIRE_CHUNK_BYTES
) -> Iterator[bytes]:
    """:func:`wire_form` of ``head + content``, in pieces, never made whole.

    The pieces joined are ``wire_form(head + content)``, octet for octet
    (``tests/perf/test_payload.py`` checks it with Hypothesis), but neither
    that nor ``head + content`` is ever built: each piece is one window of
    about ``chunk_bytes`` octets, cut after a line's LF (or longer, for a
    longer line), dot-stuffed on its own, so that sending a large message
    upstream holds it once, not three more times (issue 15, the memory
    target).  A window starts a line, so its leading dot is doubled as any
    other line's (RFC 5321 §4.5.2).  Content with a bare CR or LF is first
    normalised whole (a copy), as :func:`wire_form` does.

    :param content: the message, header and body; any line endings.
    :param head: header fields to send before ``content`` (our trace field);
        when it does not end with CRLF or has a bare CR or LF, it is joined to
        ``content`` first (a copy) so that the octets stay those of
        :func:`wire_form`.
    :param chunk_bytes: about the size of each piece, in octets (at least 1).
    :returns: the octets to write after the upstream's 354, piece by piece.
    """
    if head and (not head.endswith(b"\r\n") or normalize_line_endings(head) is not None):
        content, head = head + content, b""
    if head:
        yield _stuffed(head)
    if not content:
        yield b".\r\n"
        return
    normalized = normalize_line_endings(content)
    if normalized is not None:
        content = normalized
    size = len(content)
    start = 0
    while start < size:
        end = start + max(chunk_bytes, 1)
        if end < size:
            cut = content.rfind(b"\n", start, end)
            if cut < 0:  # a line longer than a window: to its end
                cut = content.find(b"\n", end)
            end = size if cut < 0 else cut + 1
        yield _stuffed(content[start:end] if start or end < size else content)
        start = end
    yield b".\r\n" if content.endswith(b"\r\n") else b"\r\n.\r\n"


def _stuffed(lines: bytes) -> bytes:
    """``lines`` (starting a line; CRLF line ends) with each line's leading dot doubled."""
    stuffed = lines.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


async def read_payload(
    reader: asyncio.StreamReader, *, size_limit: int | None, line_limit: int
) -> Payload:
    """Read one DATA payload, up to and including its end of data and not one octet more.

    :param reader: the connection's reader, its stream limit ``line_limit``
        (aiosmtpd's); raised to :data:`CHUNK_BYTES` while this reads, then put back.
    :param size_limit: the SIZE limit (RFC 1870), in octets; None or 0 for none.
    :param line_limit: the longest line, CRLF included, in octets (aiosmtpd's 1001).
    :returns: the state and, when nominal, the content with its dots unstuffed.
    :raises asyncio.IncompleteReadError: the client closed the connection first.
    :raises asyncio.CancelledError: the connection was lost (aiosmtpd cancels the loop).
    """
    # One growing buffer, not a list of chunks joined at the end (the chunks and
    # their join were two whole copies at once): BytesIO grows its bytes object in
    # place and getvalue() hands it over without a copy (issue 15, memory).
    kept = io.BytesIO()
    state: DataState | None = None  # decided early once past the size limit
    # The end of data may start the payload (an empty message): read as if a CRLF
    # came first, a few octets at a time while what was read could begin an end of
    # data, so that a chunked read below never has to look behind it.
    tail = b"\r\n"
    while (partial := _partial_end(tail)) > 0:
        piece = await reader.readexactly(len(END_OF_DATA) - partial)
        kept.write(piece)
        tail = (tail + piece)[-len(END_OF_DATA) :]
        if tail == END_OF_DATA:
            return _finish(kept, size_limit=size_limit, line_limit=line_limit)
    stream_limit = reader._limit  # type: ignore[attr-defined]  # aiosmtpd's line limit
    reader._limit = max(stream_limit, CHUNK_BYTES)  # type: ignore[attr-defined]
    try:
        while True:
            try:
                piece = await reader.readuntil(END_OF_DATA)
                ended = True
            except asyncio.LimitOverrunError as exc:  # no end of data in the chunk
                piece = await reader.readexactly(exc.consumed)
                ended = False
            if state is None:
                kept.write(piece)
                if not ended and size_limit and kept.tell() > size_limit + line_limit + 4:
                    # The line that crosses the limit is in, or is known to be too long.
                    state = judge(
                        kept.getvalue(),
                        size_limit=size_limit,
                        line_limit=line_limit,
                        complete=False,
                    )
                    if state is not None:
                        kept = io.BytesIO()
            if ended:
                break
    finally:
        reader._limit = stream_limit  # type: ignore[attr-defined]
    if state is not None:
        return Payload(state, b"")
    return _finish(kept, size_limit=size_limit, line_limit=line_limit)


def _finish(kept: io.BytesIO, *, size_limit: int | None, line_limit: int) -> Payload:
    """The payload from everything read, which ends with the end of data (its ``.<CRLF>``).

    The buffer is cut before the ``.<CRLF>`` and its bytes taken over, not copied.
    """
    kept.truncate(kept.tell() - len(b".\r\n"))
    data = kept.getvalue()
    kept.close()
    state = judge(data, size_limit=size_limit, line_limit=line_limit, complete=True)
    assert state is not None
    if state is not DataState.NOMINAL:
        return Payload(state, b"")
    return Payload(state, unstuff(data))
