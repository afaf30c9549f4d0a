"""The tracking stage's rewrite threads: a message waits for one, for a bounded time.

The rewrite runs in a thread pool with two slots per thread (the rewrite it
runs and one submitted behind it).  A message that finds every slot taken
waits for one in the event loop, without blocking it, and goes out untracked,
counted as ``rewrite_busy``, only if no thread has started its rewrite within
``rewrite_queue_wait_s``; a slot stays taken until its thread has really
finished, even when the message was given up after ``rewrite_timeout_s``.

The worker is held busy by a gate around the module's rewrite function, so
that which message waits is certain, not a matter of timing.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_tracker.mime import RewritePolicy, deadline
from smtp_tracker.smtp.handler import Prepared
from smtp_tracker.smtp.session import Transaction
from smtp_tracker.tracking import stage as tracking
from smtp_tracker.tracking.stage import Tracker
from tests.support.waiting import wait_until

#: the module (the package's ``rewrite`` is the function of that name)
mime_rewrite = importlib.import_module("smtp_tracker.mime.rewrite")

HTML_MESSAGE = (
    b"From: alice@example.org\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<html><body><p>Hello Bob</p></body></html>\r\n"
)


class Gate:
    """Blocks every rewrite thread until :meth:`open` (or the test's end)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = 0

    def wrap(self, rewrite: Callable[..., Any]) -> Callable[..., Any]:
        def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered += 1
            assert self.opened.wait(30), "gate never opened"
            return rewrite(*args, **kwargs)

        return gated

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    monkeypatch.setattr(tracking, "_rewrite", gate.wrap(tracking._rewrite))
    yield gate
    gate.open()  # never leave a worker thread blocked


def _tracker(**overrides: Any) -> Tracker:
    values: dict[str, Any] = {
        "policy": RewritePolicy(),
        "pixel_base_url": "https://pixel.test",
        "workers": 1,
        "rewrite_timeout_s": 10.0,
        "rewrite_queue_wait_s": 10.0,
        "inline_rewrite_bytes": 0,  # these small messages go to the thread too
    }
    values.update(overrides)
    return Tracker(**values)


def _transaction() -> Transaction:
    return Transaction("alice@example.org", (), False)


async def _prepare_three(tracker: Tracker) -> list[asyncio.Task[Prepared]]:
    return [asyncio.create_task(tracker.prepare(HTML_MESSAGE, _transaction())) for _ in range(3)]


async def test_messages_wait_for_the_one_thread_and_all_are_tracked(gate: Gate) -> None:
    tracker = _tracker()
    try:
        tasks = await _prepare_three(tracker)
        await wait_until(
            lambda: gate.entered == 1 and tracker.counters.rewrite_queued == 1,
            timeout_s=10,
            message="one rewrite running, one submitted behind it, one waiting for a slot",
        )
        assert not any(task.done() for task in tasks)
        gate.open()
        prepared = await asyncio.gather(*tasks)
    finally:
        await asyncio.to_thread(tracker.close)
    assert [p.tracked for p in prepared] == [True, True, True]
    assert all(b"https://pixel.test/" in p.data for p in prepared)
    assert len({p.tracking_id for p in prepared}) == 3
    assert tracker.counters.tracked == 3
    assert tracker.counters.rewrite_busy == 0
    assert tracker.counters.rewrite_queued == 1
    assert gate.entered == 3


async def test_a_message_that_waits_too_long_goes_out_untracked_and_counted(gate: Gate) -> None:
    tracker = _tracker(rewrite_queue_wait_s=0.05)
    try:
        tasks = await _prepare_three(tracker)
        done, _ = await asyncio.wait(tasks[1:], timeout=10)
        # given up while the first still runs: the second unstarted behind it,
        # the third without a slot
        assert done == set(tasks[1:])
        assert not tasks[0].done()
        gate.open()
        first = await tasks[0]
    finally:
        await asyncio.to_thread(tracker.close)
    assert first.tracked
    for task in tasks[1:]:
        busy = task.result()
        assert (busy.tracked, busy.reason, busy.data) == (False, "rewrite-busy", HTML_MESSAGE)
        assert busy.tracking_id is not None  # still recorded, as relayed untracked
    assert (tracker.counters.rewrite_busy, tracker.counters.tracked) == (2, 1)
    assert gate.entered == 1


async def test_a_thread_stays_taken_until_its_timed_out_rewrite_really_ends(gate: Gate) -> None:
    """After ``rewrite_timeout_s`` the message goes out unchanged, but the thread
    still runs: the next message waits behind it and is given up, unstarted,
    after ``rewrite_queue_wait_s``."""
    tracker = _tracker(rewrite_timeout_s=0.05, rewrite_queue_wait_s=0.2)
    try:
        first = await tracker.prepare(HTML_MESSAGE, _transaction())
        assert (first.tracked, first.reason) == (False, "rewrite-timeout")
        second = await tracker.prepare(HTML_MESSAGE, _transaction())
        assert (second.tracked, second.reason) == (False, "rewrite-busy")
        gate.open()
        third = await tracker.prepare(HTML_MESSAGE, _transaction())
    finally:
        await asyncio.to_thread(tracker.close)
    assert third.tracked
    assert tracker.counters.rewrite_timeouts == 1
    assert tracker.counters.rewrite_busy == 1
    assert gate.entered == 2  # the second message never reached a thread


def _parsed_fields(message: bytes) -> tuple[str | None, str | None]:
    """header_fields() as it was: every header section through email's compat32 parser."""
    ends = [i for i in (message.find(sep, 0, 1 << 20) for sep in (b"\r\n\r\n", b"\n\n")) if i >= 0]
    head = message[: min(ends)] if ends else message[: 1 << 20]
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    message_id, subject = headers.get("Message-ID"), headers.get("Subject")
    decoded = None
    if subject is not None:
        try:
            decoded = str(make_header(decode_header(str(subject))))[:998]
        except (ValueError, LookupError, UnicodeError):
            decoded = str(subject)[:998]
    return (str(message_id).strip() if message_id is not None else None, decoded)


#: Header lines and pieces of them: the wanted fields in any case, continuations,
#: encoded words, the parser's odd cases (From_, a line that is no field, bare
#: CR/LF, 8-bit octets, an empty name).
_HEADER_PIECES = st.sampled_from(
    [
        b"Subject:",
        b"subject: ",
        b"SUBJECT:\t",
        b"Message-ID: ",
        b"message-id:",
        b"X-Other: ",
        b":",
        b"From ",
        b"From: ",
        b"no field",
        b"Subject : ",
        b" ",
        b"\t",
        b"\r\n",
        b"\r\n ",
        b"\r\n\t",
        b"\r",
        b"\n",
        b"<id@example.org>",
        b"=?utf-8?q?caf=C3=A9?=",
        b"=?bogus?x?y?=",
        b"plain words",
        b"\xc3\xa9",
        b"\xff",
        b"=?",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_HEADER_PIECES, max_size=16).map(b"".join), st.sampled_from([b"", b"\r\n\r\nbody"]))
def test_header_fields_are_what_the_email_parser_reads(head: bytes, rest: bytes) -> None:
    """header_fields() reads simple header sections itself (issue 15): the same
    Message-ID and Subject as the compat32 parser for any section."""
    assert tracking.header_fields(head + rest) == _parsed_fields(head + rest)


def test_header_fields_read_no_further_than_the_parser_does() -> None:
    """A message without a header section (its first line no field) is not split
    into lines for the parser (issue 15, memory: 9 MiB for a 50 MB message's first
    MiB); one with fields stops at its first line that is no field."""
    line = b"<p>" + b"x" * 72 + b"</p>\r\n"
    body = line * (2 * 1024 * 1024 // len(line))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fields = tracking.header_fields(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fields == (None, None) == _parsed_fields(body)
    assert peak - before < 64 * 1024, f"{peak - before} octets"
    message = b"Subject: s\r\nMessage-ID: <i@d>\r\n" + body + b"Subject: not this\r\n"
    assert tracking.header_fields(message) == ("<i@d>", "s") == _parsed_fields(message)


def test_header_fields_of_a_folded_subject() -> None:
    message = (
        b"From: a@example.org\r\nSubject: one\r\n two\r\nsubject: not this\r\n"
        b"Message-ID:  <x@y>\r\n\r\nbody"
    )
    assert tracking.header_fields(message) == ("<x@y>", "one\r\n two")


class _Threads:
    """Records the thread each rewrite ran in."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def wrap(self, rewrite: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.names.append(threading.current_thread().name)
            return rewrite(*args, **kwargs)

        return recorded


async def test_a_small_message_is_rewritten_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads = _Threads()
    monkeypatch.setattr(tracking, "_rewrite", threads.wrap(tracking._rewrite))
    tracker = _tracker(inline_rewrite_bytes=len(HTML_MESSAGE))
    try:
        small = await tracker.prepare(HTML_MESSAGE, _transaction())
        large = await tracker.prepare(HTML_MESSAGE + b"<p>x</p>\r\n", _transaction())
    finally:
        await asyncio.to_thread(tracker.close)
    assert (small.tracked, large.tracked) == (True, True)
    assert threads.names[0] == threading.current_thread().name
    assert threads.names[1].startswith("rewrite")
    assert len(threads.names) == 2


async def test_with_click_tracking_a_small_message_is_rewritten_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads = _Threads()
    monkeypatch.setattr(tracking, "_rewrite", threads.wrap(tracking._rewrite))
    tracker = _tracker(policy=RewritePolicy(track_clicks=True), inline_rewrite_bytes=1 << 20)
    try:
        prepared = await tracker.prepare(HTML_MESSAGE, _transaction())
    finally:
        await asyncio.to_thread(tracker.close)
    assert prepared.tracked
    assert len(threads.names) == 1
    assert threads.names[0].startswith("rewrite")


async def test_a_small_message_slow_to_rewrite_is_started_over_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On the loop the rewrite stops at INLINE_REWRITE_BUDGET_S (its cooperative
    deadline); the message is then rewritten in a thread, under rewrite_timeout_s,
    and the rewrite's "relaying the original" line for the stop is not logged."""
    loop_thread = threading.current_thread()
    real_run = mime_rewrite._Rewrite.run
    runs: list[str] = []

    def slow_on_the_loop(self: Any) -> Any:
        runs.append(threading.current_thread().name)
        while threading.current_thread() is loop_thread:
            deadline.check()  # raises once the budget has passed
        return real_run(self)

    monkeypatch.setattr(mime_rewrite._Rewrite, "run", slow_on_the_loop)
    tracker = _tracker(inline_rewrite_bytes=1 << 20)
    try:
        with caplog.at_level(logging.WARNING, logger="smtp_tracker.mime"):
            prepared = await tracker.prepare(HTML_MESSAGE, _transaction())
    finally:
        await asyncio.to_thread(tracker.close)
    assert (prepared.tracked, prepared.reason) == (True, None)
    assert runs[0] == loop_thread.name
    assert runs[1].startswith("rewrite")
    assert len(runs) == 2
    assert tracker.counters.rewrite_timeouts == 0
    assert not [r for r in caplog.records if "stopped after" in r.getMessage()]
