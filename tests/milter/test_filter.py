"""The milter callbacks against a recording MTA context: fail open when the stage is late or fails.

libmilter is not involved (it can run once per process): the context object
stands in for ``SMFICTX`` and records what the milter asks the MTA for.  The
stage runs in this test's event loop, the callbacks in a worker thread, as
libmilter's threads call them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import Milter  # type: ignore[import-untyped]

from smtp_tracker.milter.filter import MilterContext, MilterFilter
from smtp_tracker.smtp.handler import Prepared
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.session import Transaction
from tests.support.waiting import wait_until


class RecordingCtx:
    """What the milter asked the MTA for; ``{i}`` is the queue id."""

    def __init__(self) -> None:
        self.actions: list[tuple[Any, ...]] = []
        self.priv: Any = None

    def getsymval(self, name: str) -> str | None:
        return {"{i}": "4ABCDEF0123"}.get(name)

    def setpriv(self, priv: Any) -> None:
        self.priv = priv

    def getpriv(self) -> Any:
        return self.priv

    def chgheader(self, *args: Any) -> None:
        self.actions.append(("chgheader", *args))

    def addheader(self, *args: Any) -> None:
        self.actions.append(("addheader", *args))

    def replacebody(self, *args: Any) -> None:
        self.actions.append(("replacebody", *args))


class NeverDone:
    """A stage whose rewrite never finishes."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def prepare(self, content: bytes, transaction: Transaction) -> Prepared:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")

    async def record(
        self, transaction: Transaction, prepared: Prepared, reply: Reply, size_bytes: int
    ) -> None:
        raise AssertionError("a message that was not rewritten is not recorded")


class Broken:
    """A stage that hands back something that is not a message at all."""

    async def prepare(self, content: bytes, transaction: Transaction) -> Prepared:
        return Prepared(b"no header section, no colon", "t", True, None)

    async def record(
        self, transaction: Transaction, prepared: Prepared, reply: Reply, size_bytes: int
    ) -> None:
        raise AssertionError("not reached")


def run_message(milter: MilterFilter) -> list[int]:
    """One transaction through the callbacks, as libmilter would call them."""
    return [
        milter.envfrom("<a@example.org>"),
        milter.envrcpt("<b@example.net>"),
        milter.header(b"Content-Type", b" text/html"),
        milter.body(b"<html><body>x</body></html>\r\n"),
        milter.eom(),
        milter.close(),
    ]


def make(context: MilterContext) -> tuple[MilterFilter, RecordingCtx]:
    ctx = RecordingCtx()
    milter = MilterFilter(context)
    milter._setctx(ctx)
    return milter, ctx


async def test_a_stage_past_milter_timeout_passes_the_message_on_unchanged() -> None:
    stage = NeverDone()
    context = MilterContext(
        loop=asyncio.get_running_loop(), stage=stage, max_message_bytes=10_000, timeout_s=0.2
    )
    milter, ctx = make(context)
    replies = await asyncio.to_thread(run_message, milter)
    assert replies[-2] == Milter.CONTINUE
    assert ctx.actions == []
    assert stage.started.is_set()
    await wait_until(lambda: stage.cancelled, timeout_s=5, message="the rewrite went on")
    assert (context.counters.timeouts, context.counters.unchanged) == (1, 1)
    assert context.busy == 0


async def test_our_own_error_at_end_of_message_passes_the_message_on_unchanged() -> None:
    context = MilterContext(
        loop=asyncio.get_running_loop(), stage=Broken(), max_message_bytes=10_000, timeout_s=5
    )
    milter, ctx = make(context)
    replies = await asyncio.to_thread(run_message, milter)
    assert replies[-2] == Milter.CONTINUE
    assert ctx.actions == []  # nothing asked for before the edits were all known
    assert (context.counters.failures, context.counters.unchanged) == (1, 1)
    assert context.busy == 0


async def test_oversized_body_is_accepted_at_once_and_counted() -> None:
    context = MilterContext(
        loop=asyncio.get_running_loop(), stage=NeverDone(), max_message_bytes=50, timeout_s=5
    )
    milter, ctx = make(context)
    assert milter.envfrom("<a@example.org>") == Milter.CONTINUE
    assert milter.header(b"Subject", b" hello") == Milter.CONTINUE
    assert milter.body(b"x" * 60) == Milter.ACCEPT  # libmilter sends no more of this message
    assert ctx.actions == []
    assert (context.counters.oversized, context.counters.messages) == (1, 1)
    assert context.busy == 0


class Untouchable:
    """A stage that must not be asked: it notes the call."""

    def __init__(self) -> None:
        self.asked = False

    async def prepare(self, content: bytes, transaction: Transaction) -> Prepared:
        self.asked = True
        return Prepared(content, "t", False, "asked")

    async def record(
        self, transaction: Transaction, prepared: Prepared, reply: Reply, size_bytes: int
    ) -> None:
        self.asked = True


async def test_a_header_we_could_not_keep_means_no_rewrite_from_a_partial_view() -> None:
    stage = Untouchable()
    context = MilterContext(
        loop=asyncio.get_running_loop(), stage=stage, max_message_bytes=10_000, timeout_s=5
    )
    milter, ctx = make(context)

    def run() -> list[int]:
        return [
            milter.envfrom("<a@example.org>"),
            milter.header(b"Content-Type", 12345),  # not octets: add_field raises
            milter.header(b"Subject", b" kept"),
            milter.body(b"<html><body>x</body></html>\r\n"),
            milter.eom(),
        ]

    replies = await asyncio.to_thread(run)
    assert replies[-1] == Milter.CONTINUE
    assert ctx.actions == []
    assert not stage.asked
    counters = context.counters
    assert (counters.messages, counters.failures, counters.unchanged) == (1, 1, 1)
    assert context.busy == 0
