"""The upstream DATA written by us (issue 15): the octets, the replies, the lock, the memory.

:meth:`UpstreamSession.data` writes the message as
:func:`~smtp_tracker.smtp.payload.wire_pieces` makes it (the octets of
:func:`~smtp_tracker.smtp.payload.wire_form`, in windows) instead of through
aiosmtplib's ``data()``.  A raw upstream on loopback records every octet it
receives, so the bytes can be compared with what ``data()`` itself sends for
the same message on the same kind of connection.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiosmtplib
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from smtp_tracker.errors import UpstreamUnavailable
from smtp_tracker.smtp import replies
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.upstream import UpstreamSession, UpstreamSettings

END = b"\r\n.\r\n"


@dataclass
class RawUpstream:
    """An SMTP server that records raw octets: 220, 250 to all, 354 to DATA.

    :ivar data_reply: the reply to DATA (354 goes on to read the message).
    :ivar final_reply: the reply to the end of data; None: say nothing (a timeout).
    :ivar drop_after_354: close the connection right after the 354.
    :ivar hold_final: when set, the final reply waits until this event is set.
    """

    data_reply: bytes = b"354 go ahead"
    final_reply: bytes | None = b"250 2.0.0 queued"
    drop_after_354: bool = False
    hold_final: asyncio.Event | None = None
    #: False: each message is read and dropped, only its size kept (as ``b"<N octets>"``)
    keep_messages: bool = True
    #: the octets after each 354, up to and including the end of data
    messages: list[bytes] = field(default_factory=list)
    #: every octet received, and b"<sent NNN>" markers where replies went out
    log: list[bytes] = field(default_factory=list)
    message_seen: asyncio.Event = field(default_factory=asyncio.Event)
    quit_seen: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(reply: bytes) -> None:
            self.log.append(b"<sent " + reply[:3] + b">")
            writer.write(reply + b"\r\n")
            await writer.drain()

        try:
            await say(b"220 raw.test ESMTP")
            early: asyncio.Task[bytes] | None = None
            while line := await (early or reader.readline()):
                early = None
                if line[:4].upper() == b"QUIT":
                    self.quit_seen.set()
                self.log.append(line)
                verb = line[:4].upper()
                if verb == b"QUIT":
                    await say(b"221 bye")
                    break
                if verb != b"DATA":
                    await say(
                        b"250 raw.test" if verb != b"EHLO" else b"250-raw.test\r\n250 8BITMIME"
                    )
                    continue
                await say(self.data_reply)
                if not self.data_reply.startswith(b"354"):
                    continue
                if self.drop_after_354:
                    break
                message = await (
                    self._read_message(reader) if self.keep_messages else self._drop_message(reader)
                )
                self.log.append(message)
                self.messages.append(message)
                self.message_seen.set()
                if self.final_reply is None:
                    await reader.read()  # silent until the client hangs up
                    break
                if self.hold_final is not None:
                    # go on reading meanwhile: a command written now is seen now
                    early = asyncio.create_task(reader.readline())
                    early.add_done_callback(self._seen_early)
                    await self.hold_final.wait()
                await say(self.final_reply)
        finally:
            writer.close()

    def _seen_early(self, task: asyncio.Task[bytes]) -> None:
        if not task.cancelled() and task.exception() is None:
            if self.hold_final is not None and not self.hold_final.is_set():
                self.log.append(b"<before the final reply>")
            if task.result()[:4].upper() == b"QUIT":
                self.quit_seen.set()

    @staticmethod
    async def _drop_message(reader: asyncio.StreamReader) -> bytes:
        """Read a message up to its end of data (the first one, after the 354), keep its size."""
        tail, size = b"\r\n", 0
        while not tail.endswith(END):
            piece = await reader.read(4 * 1024 * 1024)
            if not piece:
                raise ConnectionError("closed in the message")
            size += len(piece)
            tail = (tail + piece)[-len(END) :]
        return b"<%d octets>" % size

    @staticmethod
    async def _read_message(reader: asyncio.StreamReader) -> bytes:
        message = b""
        while message != b".\r\n" and not message.endswith(END):
            message += await reader.readuntil(b".\r\n")
        return message


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0, limit=4 * 1024 * 1024)
    upstream.port = server.sockets[0].getsockname()[1]
    yield upstream
    server.close()
    await server.wait_closed()


def _settings(port: int, *, data_timeout_s: float = 5.0) -> UpstreamSettings:
    return UpstreamSettings(
        host="127.0.0.1",
        port=port,
        tls="none",
        tls_context=None,
        helo_name="relay.test",
        connect_timeout_s=5.0,
        command_timeout_s=5.0,
        data_timeout_s=data_timeout_s,
    )


async def _ours(upstream: RawUpstream, content: bytes) -> bytes:
    session = UpstreamSession(_settings(upstream.port))
    await session.ensure_open()
    reply = await session.data(content)
    assert (reply.code, session.reusable) == (250, True)
    await session.close()
    return upstream.messages[-1]


async def _aiosmtplib(upstream: RawUpstream, content: bytes) -> bytes:
    """What aiosmtplib's ``data()`` sends for ``content`` (the path before issue 15)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=upstream.port, start_tls=False)
    await client.connect()
    await client.ehlo()
    await client.data(content)
    await client.quit()
    return upstream.messages[-1]


TRICKY = {
    "bare-cr": b"Subject: a\rb\r\n\r\nline\rnext\r\n",
    "bare-lf": b"Subject: a\n\nline one\nline two\n",
    "mixed": b"a\r\n\n\r\r\n\r\n\rz",
    "dots": b".\r\n..\r\n.x\r\nSubject: .\r\n\r\n.\r\n. \r\n.",
    "dot-after-bare-lf": b"a\n.\nb\r.\r",
    "smuggling": b"Subject: s\r\n\r\nbody\n.\nMAIL FROM:<x@y>\r\n\r.\r\nRCPT TO:<z@y>\r\n",
    "no-final-crlf": b"Subject: x\r\n\r\nno line end",
    "ends-in-cr": b"Subject: x\r\n\r\nbody\r",
    "single-dot": b".",
    "eight-bit": "Subject: é\r\n\r\nçà\r\n.ü\r\n".encode(),
    "one-mb": b"".join(
        b".line %d\r\n" % i
        if i % 7 == 0
        else b"line %d ends bare\n" % i
        if i % 11 == 0
        else b"x" * 70 + b"\r\n"
        for i in range(17_000)
    )
    + b"tail without end",
}


@pytest.mark.parametrize("name", sorted(TRICKY))
async def test_the_upstream_receives_what_aiosmtplib_data_sent(
    raw_upstream: RawUpstream, name: str
) -> None:
    content = TRICKY[name]
    ours = await _ours(raw_upstream, content)
    theirs = await _aiosmtplib(raw_upstream, content)
    assert ours == theirs
    # and aiosmtplib's own normalisation of the same input
    assert ours == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"
    assert ours.endswith(END)


def test_the_one_megabyte_payload_is_one_megabyte() -> None:
    assert len(TRICKY["one-mb"]) > 1_000_000


async def test_an_empty_message_is_the_end_of_data_alone(raw_upstream: RawUpstream) -> None:
    # As before issue 15 (and as Postfix relays one); aiosmtplib's data() would
    # send an empty line first.
    assert await _ours(raw_upstream, b"") == b".\r\n"
    assert raw_upstream.log.count(b"DATA\r\n") == 1


@pytest.mark.parametrize("content", [b"", b"Subject: x\r\n\r\nbody\r\n"], ids=["empty", "message"])
async def test_a_421_to_data_is_returned_and_the_connection_is_not_reused(
    raw_upstream: RawUpstream, content: bytes
) -> None:
    raw_upstream.data_reply = b"421 4.3.2 going down"
    session = UpstreamSession(_settings(raw_upstream.port))
    await session.ensure_open()
    reply = await session.data(content)
    assert reply == Reply(421, "4.3.2", "going down")
    assert session.closing and not session.reusable
    assert raw_upstream.messages == []
    session.abort()


async def test_a_refused_data_is_the_upstreams_reply_and_the_connection_stays(
    raw_upstream: RawUpstream,
) -> None:
    raw_upstream.data_reply = b"554 5.5.1 no valid recipients"
    session = UpstreamSession(_settings(raw_upstream.port))
    await session.ensure_open()
    reply = await session.data(b"Subject: x\r\n\r\nbody\r\n")
    assert reply == Reply(554, "5.5.1", "no valid recipients")
    assert session.reusable
    assert raw_upstream.messages == []  # nothing of the message was written
    assert await session.rset()  # and the connection is in step
    await session.close()


async def test_a_refused_message_is_the_upstreams_reply(raw_upstream: RawUpstream) -> None:
    raw_upstream.final_reply = b"550 5.7.1 content rejected"
    session = UpstreamSession(_settings(raw_upstream.port))
    await session.ensure_open()
    reply = await session.data(b"Subject: x\r\n\r\nbody\r\n")
    assert reply == Reply(550, "5.7.1", "content rejected")
    assert session.reusable
    await session.close()


async def test_a_drop_after_354_is_a_4xx_and_the_connection_is_closed(
    raw_upstream: RawUpstream,
) -> None:
    raw_upstream.drop_after_354 = True
    session = UpstreamSession(_settings(raw_upstream.port))
    await session.ensure_open()
    with pytest.raises(UpstreamUnavailable) as caught:
        await session.data(b"Subject: x\r\n\r\nbody\r\n")
    assert caught.value.reply == replies.R451_UPSTREAM_LOST
    assert not session.is_open and not session.reusable


async def test_no_reply_to_the_end_of_data_is_a_4xx_timeout_and_closes(
    raw_upstream: RawUpstream,
) -> None:
    raw_upstream.final_reply = None
    session = UpstreamSession(_settings(raw_upstream.port, data_timeout_s=0.2))
    await session.ensure_open()
    with pytest.raises(UpstreamUnavailable) as caught:
        await session.data(b"Subject: x\r\n\r\nbody\r\n")
    assert caught.value.reply == replies.R451_UPSTREAM_TIMEOUT
    assert not session.is_open and not session.reusable


@pytest.mark.parametrize("content", [b"", b"Subject: x\r\n\r\nbody\r\n"], ids=["empty", "message"])
async def test_no_command_is_written_between_the_message_and_its_reply(
    raw_upstream: RawUpstream, content: bytes
) -> None:
    """aiosmtplib's command lock is held from DATA to the final reply, as data() holds it:
    a QUIT asked for meanwhile waits, and is not read as part of the transaction."""
    raw_upstream.hold_final = asyncio.Event()
    session = UpstreamSession(_settings(raw_upstream.port))
    await session.ensure_open()
    client = session._client
    assert client is not None and client.protocol is not None
    lock = client.protocol._command_lock
    assert lock is not None
    sending = asyncio.create_task(session.data(content))
    await asyncio.wait_for(raw_upstream.message_seen.wait(), 5.0)
    closing = asyncio.create_task(session.close())
    # Until the QUIT is either written or waiting for the lock.
    for _ in range(1000):
        if raw_upstream.quit_seen.is_set() or (lock.locked() and closing_waits(lock)):
            break
        await asyncio.sleep(0)
    assert not raw_upstream.quit_seen.is_set()
    raw_upstream.hold_final.set()
    reply = await asyncio.wait_for(sending, 5.0)
    await asyncio.wait_for(closing, 5.0)
    assert reply.code == 250
    assert b"<before the final reply>" not in raw_upstream.log
    assert raw_upstream.log[-4:] == [
        raw_upstream.messages[-1],
        b"<sent 250>",
        b"QUIT\r\n",
        b"<sent 221>",
    ]


def closing_waits(lock: asyncio.Lock) -> bool:
    """Whether a task waits for ``lock`` (asyncio keeps its waiters in ``_waiters``)."""
    return bool(getattr(lock, "_waiters", None))


async def test_a_large_message_goes_out_without_a_whole_copy(raw_upstream: RawUpstream) -> None:
    """An 8 MiB message whose every line is dot-stuffed, with a trace head, is sent
    with less than a quarter of its size allocated on top of it (issue 15, memory):
    no head + content, no wire form made whole, no transport buffer holding the
    rest; before, the stuffed copy and its end line alone were twice its size."""
    raw_upstream.keep_messages = False
    line = b".<p>" + b"x" * 72 + b"</p>\r\n"
    content = line * (8 * 1024 * 1024 // len(line))
    head = b"Received: from client.test\r\n\tby relay.test; Mon, 7 Dec 2026 15:00:00 +0000\r\n"
    session = UpstreamSession(_settings(raw_upstream.port))
    await session.ensure_open()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        reply = await session.data(content, head=head)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    await session.close()
    assert reply.code == 250
    stuffed = len(head) + len(content) + len(content) // len(line) + len(b".\r\n")
    assert raw_upstream.messages == [b"<%d octets>" % stuffed]
    assert peak - before < len(content) // 4, f"{peak - before} octets on top of the message"
