"""The chunked DATA reader (:mod:`smtp_tracker.smtp.payload`) against aiosmtpd's line reader.

Both read the same octets, arriving in the same pieces, from a StreamReader
with aiosmtpd's stream limit: the content handed on, the refusal, and what is
left unread after the end of data (pipelined commands) must be the same
(issue 15; the SMTP smuggling defences of smtp/server.py depend on it).
"""

from __future__ import annotations

import asyncio
import itertools
import tracemalloc
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_tracker.smtp.payload import DataState, Payload, read_payload, wire_form, wire_pieces

LINE_LIMIT = SMTP.line_length_limit  # 1001, aiosmtpd's stream limit too
AFTER = b"QUIT\r\n"

#: Pieces that make the smuggling and limit cases likely: bare CR/LF variants of
#: the end of data, stuffed dots, and runs near the 1,000-octet line limit.
BLOCKS = st.one_of(
    st.sampled_from(
        [
            b"a",
            b".",
            b"..",
            b"\r",
            b"\n",
            b"\r\n",
            b".\r\n",
            b"\n.\n",
            b"\r.\r",
            b"\n.\r\n",
            b"\r\n.\n",
        ]
    ),
    st.integers(min_value=995, max_value=1006).map(lambda n: b"x" * n),
    st.binary(max_size=40),
)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


class _Transport:
    def is_closing(self) -> bool:
        return False


class _Capture:
    def __init__(self) -> None:
        self.content: bytes | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.content = envelope.original_content
        return "250 OK"


async def _feed(reader: asyncio.StreamReader, pieces: list[bytes]) -> None:
    for piece in pieces:
        reader.feed_data(piece)
        for _ in range(3):
            await asyncio.sleep(0)
    reader.feed_eof()


def _cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points) if b > a]


async def _aiosmtpd(pieces: list[bytes], size_limit: int) -> tuple[Payload, bytes]:
    """aiosmtpd 1.4's own smtp_DATA over the pieces; its outcome as a Payload."""
    capture = _Capture()
    server = SMTP(capture, data_size_limit=size_limit, decode_data=False, enable_SMTPUTF8=True)
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    writer = _Writer()
    server._reader = reader
    server._writer = writer  # type: ignore[assignment]
    server.transport = _Transport()  # type: ignore[assignment]
    server.session = Session(asyncio.get_running_loop())
    server.session.host_name = "client.example"
    server.envelope = Envelope()
    server.envelope.rcpt_tos = ["reader@example.net"]
    feeding = asyncio.create_task(_feed(reader, pieces))
    await server.smtp_DATA("")
    await feeding
    reply = writer.lines[-1]
    if reply.startswith(b"250"):
        assert capture.content is not None
        outcome = Payload(DataState.NOMINAL, capture.content)
    elif reply.startswith(b"552"):
        outcome = Payload(DataState.TOO_MUCH, b"")
    else:
        assert reply.startswith(b"500 Line too long"), reply
        outcome = Payload(DataState.TOO_LONG, b"")
    return outcome, await reader.read()


async def _ours(pieces: list[bytes], size_limit: int) -> tuple[Payload, bytes]:
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    feeding = asyncio.create_task(_feed(reader, pieces))
    outcome = await read_payload(reader, size_limit=size_limit, line_limit=LINE_LIMIT)
    await feeding
    assert reader._limit == LINE_LIMIT  # type: ignore[attr-defined]  # put back
    return outcome, await reader.read()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(BLOCKS, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=12),
    size_limit=st.sampled_from([0, 1, 5, 64, 1000, 1003, 2000, 10_000]),
)
def test_same_bytes_refusals_and_leftover_as_aiosmtpd(
    blocks: list[bytes], cuts: list[int], size_limit: int
) -> None:
    stream = b"".join(blocks) + b"\r\n.\r\n" + AFTER
    pieces = _cut(stream, cuts)

    async def both() -> tuple[tuple[Payload, bytes], tuple[Payload, bytes]]:
        return await _aiosmtpd(pieces, size_limit), await _ours(pieces, size_limit)

    theirs, ours = asyncio.run(both())
    assert ours == theirs


async def test_empty_message_and_pipelined_command_left_unread() -> None:
    outcome, left = await _ours([b".\r\nMAIL FROM:<a@example.org>\r\n"], 100)
    assert outcome == Payload(DataState.NOMINAL, b"")
    assert left == b"MAIL FROM:<a@example.org>\r\n"


async def test_bare_lf_dot_does_not_end_the_payload() -> None:
    smuggled = b"a\r\n\n.\nMAIL FROM:<x@example.org>\r\n\r\n.\r\nQUIT\r\n"
    outcome, left = await _ours([smuggled], 0)
    assert outcome == Payload(DataState.NOMINAL, b"a\r\n\n.\nMAIL FROM:<x@example.org>\r\n\r\n")
    assert left == b"QUIT\r\n"


async def test_a_payload_is_read_in_chunks_not_lines() -> None:
    """A 15 KB message of 300 lines takes a handful of reads, not one per line."""
    lines = [b"<p>line %d of an HTML template, forty-odd octets</p>\r\n" % i for i in range(300)]
    stream = b"".join(lines) + b".\r\n"
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    calls = 0
    for name in ("readuntil", "readexactly", "readline", "read"):
        original = getattr(reader, name)

        def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return _original(*args, **kwargs)

        setattr(reader, name, counted)
    reader.feed_data(stream)
    reader.feed_eof()
    outcome = await read_payload(reader, size_limit=10**6, line_limit=LINE_LIMIT)
    assert outcome.content == b"".join(lines)
    assert calls <= 3


async def test_too_big_is_dropped_while_read() -> None:
    """Past the size limit the rest is read and not kept: 552 and nothing held."""
    line = b"y" * 78 + b"\r\n"
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    feeding = asyncio.create_task(_feed(reader, [line * 1000] * 20 + [b".\r\n" + AFTER]))
    outcome = await read_payload(reader, size_limit=100_000, line_limit=LINE_LIMIT)
    await feeding
    assert outcome == Payload(DataState.TOO_MUCH, b"")
    assert await reader.read() == AFTER


def _aiosmtplib_data(message: bytes) -> bytes:
    """What aiosmtplib 5's ``SMTPProtocol.execute_data_command`` writes after the 354."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


@settings(max_examples=500, deadline=None)
@given(st.lists(BLOCKS, max_size=40).map(b"".join))
def test_wire_form_is_what_aiosmtplib_sends(message: bytes) -> None:
    """wire_form() writes the octets aiosmtplib's data() writes (issue 15): bare CR and
    LF made CRLF, every leading dot doubled, the last line ended, then ``.<CRLF>``."""
    if message:
        assert wire_form(message) == _aiosmtplib_data(message)
    else:
        assert wire_form(message) == b".\r\n"  # an empty message stays empty


@settings(max_examples=500, deadline=None)
@given(
    st.lists(BLOCKS, max_size=40).map(b"".join),
    st.lists(BLOCKS, max_size=6).map(b"".join),
    st.integers(min_value=1, max_value=12),
)
def test_wire_pieces_join_to_the_wire_form(message: bytes, head: bytes, chunk_bytes: int) -> None:
    """wire_pieces() gives wire_form(head + message) in pieces, for every window size
    and head, CRLF-ended or not (issue 15: the wire form is never built whole)."""
    pieces = list(wire_pieces(message, head=head, chunk_bytes=chunk_bytes))
    assert b"".join(pieces) == wire_form(head + message)
    # only the last piece ends the data
    assert all(b"\r\n.\r\n" not in b"\r\n" + p for p in pieces[:-1])


def test_wire_pieces_hold_no_whole_copy() -> None:
    """A clean 4 MiB message goes out in pieces of about the window size, none of
    them the whole message (each piece a window, stuffed on its own)."""
    line = b".<p>" + b"x" * 72 + b"</p>\r\n"
    message = line * (4 * 1024 * 1024 // len(line))
    head = b"Received: from x\r\n\tby y; Mon, 7 Dec 2026 15:00:00 +0000\r\n"
    pieces = list(wire_pieces(message, head=head, chunk_bytes=64 * 1024))
    assert max(len(p) for p in pieces) < 2 * 64 * 1024  # a window, its dots doubled
    assert b"".join(pieces) == wire_form(head + message)


def test_wire_form_examples() -> None:
    assert wire_form(b".a\r\n.\r\nb") == b"..a\r\n..\r\nb\r\n.\r\n"
    assert wire_form(b"a\n.\nb\r.\r") == b"a\r\n..\r\nb\r\n..\r\n.\r\n"


class _SlicingReader:
    """What read_payload calls on a StreamReader, over ``data``: each read a new bytes
    object of at most the limit, as a socket's reader gives them (no buffer of its own)."""

    def __init__(self, data: bytes) -> None:
        self._data, self._position, self._limit = data, 0, LINE_LIMIT

    async def readexactly(self, size: int) -> bytes:
        piece = self._data[self._position : self._position + size]
        self._position += size
        return piece

    async def readuntil(self, separator: bytes) -> bytes:
        window = self._position + self._limit
        found = self._data.find(separator, self._position, window + len(separator))
        if found < 0:
            raise asyncio.LimitOverrunError("no separator", window - self._position)
        return await self.readexactly(found + len(separator) - self._position)


async def test_a_large_payload_is_read_into_one_copy() -> None:
    """An 8 MiB payload is read with at most about one copy of it allocated
    (BytesIO grows in place, getvalue() hands it over): the chunks and their
    join were two (issue 15, memory)."""
    line = b"<p>" + b"x" * 72 + b"</p>\r\n"
    payload = line * (8 * 1024 * 1024 // len(line))
    reader = _SlicingReader(payload + b".\r\n" + AFTER)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        read = await read_payload(
            reader,  # type: ignore[arg-type]
            size_limit=16 * 1024 * 1024,
            line_limit=LINE_LIMIT,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read == Payload(DataState.NOMINAL, payload)
    assert await reader.readexactly(len(AFTER)) == AFTER
    assert peak - before < len(payload) * 3 // 2, f"{peak - before} octets for {len(payload)}"
