"""Hostile input on the SMTP side: what a careless or malicious client meets.

Each case talks raw SMTP (an asyncio stream, so that it can send what no SMTP
library would) to smtp-tracker started in the test's loop, relaying to the
scripted upstream, and checks the exact reply (code and RFC 3463 enhanced
status) and what reached the upstream.  The smuggling stance is argued in the
docstring of :mod:`smtp_tracker.smtp.server`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import ssl
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from smtp_tracker.smtp.payload import normalize_line_endings
from tests.support.waiting import wait_until

#: A bare CR or a bare LF: what must never reach the upstream.
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")

OUTER = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: outer\r\n\r\nhello"
#: What an attacker hides after a fake end of data, hoping for a second transaction.
SMUGGLED = (
    b"MAIL FROM:<ceo@victim.test>\r\n"
    b"RCPT TO:<target@example.net>\r\n"
    b"DATA\r\n"
    b"From: ceo@victim.test\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"pay the invoice\r\n"
)


class Raw:
    """A raw SMTP client: bytes out exactly as given, replies read line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, address: tuple[str, int]) -> Raw:
        reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def reply(self, timeout_s: float = 10.0) -> str:
        """The last line of the next reply (``"250 2.0.0 OK"``); ``""`` at end of stream."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout_s)
            if not line:
                return ""
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text[3:4] != "-":
                return text

    async def lines(self, timeout_s: float = 10.0) -> list[str]:
        """Every line of the next (multi-line) reply."""
        found = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout_s)
            text = line.decode().rstrip("\r\n")
            found.append(text)
            if not line or text[3:4] != "-":
                return found

    async def command(self, line: bytes | str) -> str:
        data = line.encode() if isinstance(line, str) else line
        self.writer.write(data + b"\r\n")
        return await self.reply()

    async def closed(self, timeout_s: float = 10.0) -> bool:
        """Whether the server closes the connection (nothing more is said)."""
        return await asyncio.wait_for(self.reader.read(), timeout_s) == b""

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()


@asynccontextmanager
async def greeted(app: Application, *, ehlo: bool = True) -> AsyncIterator[Raw]:
    """A raw client past the greeting (and EHLO); closed at the end."""
    client = await Raw.open(app.smtp_address)
    try:
        assert (await client.reply()).startswith("220 relay.test ")
        if ehlo:
            assert (await client.command("EHLO postfix.test")).startswith("250 ")
        yield client
    finally:
        await client.close()


async def open_transaction(client: Raw, recipients: int = 1) -> None:
    assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
    for n in range(recipients):
        assert await client.command(f"RCPT TO:<bob{n}@example.net>") == "250 2.1.5 Ok"


def upstream_commands(upstream: Any, verb: str) -> list[str]:
    return [c for c in upstream.commands if c.upper().startswith(verb)]


# -- SMTP smuggling -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fake_end", "arrives_as"),
    [
        # RFC 5321 §4.5.2: a line that starts with a dot and has more on it loses the
        # dot; so after a real CRLF, ".<LF>..." is a stuffed line, not an end.
        (b"\n.\n", b"hello\r\n.\r\n"),
        (b"\n.\r\n", b"hello\r\n.\r\n"),
        (b"\r\n.\n", b"hello\r\n\r\n"),
        (b"\r.\r", b"hello\r\n.\r\n"),
        (b"\r.\n", b"hello\r\n.\r\n"),
        (b"\r\n.\r", b"hello\r\n\r\n"),
        (b"\n.\r", b"hello\r\n.\r\n"),
        (b"\r.\r\n", b"hello\r\n.\r\n"),
    ],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CR", "CR.LF", "CRLF.CR", "LF.CR", "CR.CRLF"],
)
async def test_a_fake_end_of_data_does_not_end_the_message(
    relay: Application, upstream: Any, fake_end: bytes, arrives_as: bytes
) -> None:
    """SEC Consult's smuggling: one message reaches the upstream, all CRLF, nothing smuggled."""
    async with greeted(relay) as client:
        await open_transaction(client)
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(OUTER + fake_end + SMUGGLED + b".\r\n")
        assert re.fullmatch(r"250 2\.0\.0 Ok: queued as UP\w+", await client.reply())
        assert await client.command("QUIT") == "221 2.0.0 Bye"
    (delivered,) = await upstream.wait_for_transactions(1)
    assert (delivered.mail_from, delivered.rcpt_tos) == ("alice@example.org", ["bob0@example.net"])
    assert BARE.search(delivered.data) is None
    assert delivered.data.endswith(OUTER[:-5] + arrives_as + SMUGGLED)
    assert upstream_commands(upstream, "MAIL") == ["MAIL FROM:<alice@example.org>"]
    assert len(upstream_commands(upstream, "DATA")) == 1
    assert not any("victim" in c or "target" in c for c in upstream.commands)
    assert relay.handler.counters["bare_line_endings"] == 1
    assert relay.handler.counters["relayed"] == 1


async def test_bare_cr_and_lf_inside_lines_reach_the_upstream_as_crlf(
    relay: Application, upstream: Any
) -> None:
    body = b"Subject: mixed\r\n\r\none\ntwo\rthree\r\n..four\r\n"
    async with greeted(relay) as client:
        await open_transaction(client)
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(body + b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as UP")
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.data.endswith(b"Subject: mixed\r\n\r\none\r\ntwo\r\nthree\r\n.four\r\n")
    assert BARE.search(delivered.data) is None
    assert relay.handler.counters["bare_line_endings"] == 1


def test_normalize_line_endings_leaves_crlf_alone_and_fixes_the_rest() -> None:
    assert normalize_line_endings(b"a\r\nb\r\n") is None
    assert normalize_line_endings(b"") is None
    assert normalize_line_endings(b"a\nb\rc\r\n\r\r\n") == b"a\r\nb\r\nc\r\n\r\n\r\n"
    assert normalize_line_endings(b"\n\r") == b"\r\n\r\n"


async def test_control_characters_in_commands_are_refused_and_never_forwarded(
    relay: Application, upstream: Any
) -> None:
    async with greeted(relay) as client:
        refused = "501 5.5.2 control character in command"
        assert await client.command(b"MAIL FROM:<ev\ril@example.org>") == refused
        assert await client.command(b"MAIL FROM:<alice@example.org>\rRCPT TO:<x@y.test>") == refused
        assert await client.command(b"EHLO evil\rBcc: victim@example.net") == refused
        assert await client.command(b"NOOP \x00") == refused
        await open_transaction(client)
        assert await client.command(b"RCPT TO:<carol@example.net>\x1b[2J") == refused
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(b"Subject: ok\r\n\r\nok\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok")
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.rcpt_tos == ["bob0@example.net"]
    assert not any(re.search(r"[\x00-\x1f]", c) for c in upstream.commands)


# -- limits -----------------------------------------------------------------------------


async def test_overlong_command_lines_get_500_and_the_connection_stays_usable(
    relay: Application, upstream: Any
) -> None:
    """RFC 5321 §4.5.3.1.4: 512 octets; past aiosmtpd's reader limit (1001) as well."""
    too_long = "500 5.5.2 command line too long"
    async with greeted(relay) as client:
        assert await client.command("NOOP " + "x" * 600) == too_long
        assert await client.command("NOOP " + "x" * 100_000) == too_long
        assert await client.command(f"MAIL FROM:<{'a' * 600}@example.org>") == too_long
        assert await client.command("NOOP") == "250 2.0.0 OK"
        await open_transaction(client)
        assert await client.command(f"RCPT TO:<{'b' * 2000}@example.net>") == too_long
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(b"Subject: still here\r\n\r\nok\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok")
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.rcpt_tos == ["bob0@example.net"]
    assert upstream_commands(upstream, "MAIL") == ["MAIL FROM:<alice@example.org>"]


async def test_recipients_beyond_max_recipients_get_452_and_never_reach_the_upstream(
    relay_factory: Any, upstream: Any
) -> None:
    app = await relay_factory(max_recipients=3)
    async with greeted(app) as client:
        await open_transaction(client, recipients=3)
        for n in range(3, 6):
            assert await client.command(f"RCPT TO:<bob{n}@example.net>") == (
                "452 4.5.3 too many recipients"
            )
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(b"Subject: three\r\n\r\nthree of six\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok")
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.rcpt_tos == ["bob0@example.net", "bob1@example.net", "bob2@example.net"]
    assert len(upstream_commands(upstream, "RCPT")) == 3


async def test_declared_size_over_the_limit_is_552_before_the_upstream_hears_of_it(
    relay_factory: Any, upstream: Any
) -> None:
    app = await relay_factory(max_message_bytes=10_000)
    async with greeted(app) as client:
        assert await client.command("MAIL FROM:<alice@example.org> SIZE=10001") == (
            "552 5.3.4 message size exceeds fixed maximum message size"
        )
        assert upstream_commands(upstream, "MAIL") == []
        assert await client.command("MAIL FROM:<alice@example.org> SIZE=10000") == "250 2.1.0 Ok"
    assert upstream_commands(upstream, "MAIL") == ["MAIL FROM:<alice@example.org> SIZE=10000"]


@pytest.mark.parametrize(
    ("payload", "reply"),
    [
        (
            b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 200,
            "552 5.3.4 message size exceeds fixed maximum message size",
        ),
        (
            b"Subject: long line\r\n\r\n" + b"y" * 5000 + b"\r\n",
            "500 5.5.2 line too long (RFC 5321 §4.5.3.1.6)",
        ),
    ],
    ids=["too-big", "line-too-long"],
)
async def test_a_payload_refused_after_data_is_never_relayed_and_the_upstream_is_reset(
    relay_factory: Any, upstream: Any, payload: bytes, reply: str
) -> None:
    """No SIZE declared: the payload itself is refused, the upstream transaction aborted."""
    app = await relay_factory(max_message_bytes=10_000)
    async with greeted(app) as client:
        await open_transaction(client)
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(payload + b".\r\n")
        assert await client.reply() == reply
        await wait_until(
            lambda: upstream.commands[-1:] == ["RSET"],
            timeout_s=10,
            message="the upstream transaction was not reset",
        )
        assert upstream_commands(upstream, "DATA") == []
        assert app.handler.active_transactions == 0
        # the same connection carries the next message, with no nested MAIL upstream
        await open_transaction(client)
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(b"Subject: small\r\n\r\nsmall\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok")
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.data.endswith(b"small\r\n")
    assert not any(r.startswith("503") for r in upstream.transcript)


async def test_commands_out_of_order_get_503_5_5_1(relay: Application, upstream: Any) -> None:
    async with greeted(relay, ehlo=False) as client:
        assert await client.command("MAIL FROM:<alice@example.org>") == (
            "503 5.5.1 send HELO or EHLO first"
        )
        assert (await client.command("EHLO postfix.test")).startswith("250 ")
        assert await client.command("RCPT TO:<bob@example.net>") == "503 5.5.1 need MAIL command"
        assert await client.command("DATA") == "503 5.5.1 need RCPT command"
        assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
        assert await client.command("DATA") == "503 5.5.1 need RCPT command"
        assert await client.command("MAIL FROM:<mallory@example.org>") == (
            "503 5.5.1 nested MAIL command"
        )
        assert await client.command("RSET") == "250 2.0.0 OK"
    assert upstream_commands(upstream, "MAIL") == ["MAIL FROM:<alice@example.org>"]
    assert upstream_commands(upstream, "RCPT") == upstream_commands(upstream, "DATA") == []
    assert upstream.transactions == []


@pytest.mark.parametrize("where", ["idle", "in-transaction", "in-data"])
async def test_a_silent_client_gets_421_4_4_2_and_is_disconnected(
    relay_factory: Any, upstream: Any, where: str
) -> None:
    app = await relay_factory(client_timeout_s=0.5)
    async with greeted(app) as client:
        if where != "idle":
            await open_transaction(client)
        if where == "in-data":
            assert (await client.command("DATA")).startswith("354 ")
            client.writer.write(b"Subject: half a message\r\n\r\nand then")
        started = time.monotonic()
        assert await client.reply() == "421 4.4.2 timeout exceeded, closing connection"
        waited = time.monotonic() - started
        assert await client.closed()
    assert 0.4 <= waited < 5.0, waited
    await wait_until(
        lambda: app.handler.active_transactions == 0 and not upstream.connections,
        timeout_s=10,
        message="the transaction or the upstream connection outlived the client",
    )
    assert upstream.transactions == []
    assert upstream_commands(upstream, "DATA") == []


async def test_auth_is_refused_with_502_and_its_continuation_is_not_echoed(
    relay: Application, upstream: Any
) -> None:
    async with greeted(relay, ehlo=False) as client:
        assert await client.command("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == (
            "502 5.5.1 AUTH not offered"
        )
        client.writer.write(b"EHLO postfix.test\r\n")
        ehlo = await client.lines()
        assert ehlo[-1].startswith("250 ") and not any("AUTH" in line for line in ehlo)
        assert await client.command("AUTH LOGIN") == "502 5.5.1 AUTH not offered"
        assert await client.command("YWxpY2U=") == "500 5.5.1 command not recognized"
        for _ in range(3):
            assert await client.command("c2VjcmV0") == "500 5.5.1 command not recognized"
        assert await client.command("c2VjcmV0") == (
            "502 5.5.1 Too many unrecognized commands, goodbye."
        )
        assert await client.closed()
    assert upstream.transcript == []


# -- many connections -----------------------------------------------------------------


async def test_a_connection_upgraded_with_starttls_holds_one_slot(
    relay_factory: Any,
    upstream: Any,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
) -> None:
    """STARTTLS makes aiosmtpd see a second connection_made: it must not take a second slot."""
    app = await relay_factory(
        max_connections=1, tls_cert=str(cert_pem_path), tls_key=str(key_pem_path)
    )
    host, port = app.smtp_address
    smtp = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, tls_context=client_ssl_context, timeout=10
    )
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await smtp.ehlo(hostname="postfix.test")
    assert app.connection_slots.active == 1
    errors = await smtp.sendmail(
        "alice@example.org", ["bob@example.net"], b"Subject: tls\r\n\r\nok\r\n"
    )
    assert errors[0] == {}
    await smtp.quit()
    await wait_until(
        lambda: app.connection_slots.active == 0, timeout_s=10, message="slot not given back"
    )
    assert app.connection_slots.refused == 0
    assert len(await upstream.wait_for_transactions(1)) == 1


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def many_files() -> Iterator[Callable[[int], None]]:
    """Raise RLIMIT_NOFILE's soft limit to at least ``n`` for the test; restored after."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)

    def need(n: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < n:
            if hard != resource.RLIM_INFINITY and hard < n:
                pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))

    yield need
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


async def test_a_thousand_idle_connections_are_bounded_and_others_are_still_served(
    relay: Application,
    upstream: Any,
    many_files: Callable[[int], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """max_connections (default 100): the rest get 421 4.3.2 and are closed; no fd leaks."""
    caplog.set_level(logging.WARNING, logger="smtp_tracker.smtpd")
    many_files(2 * 1000 + 512)  # both ends of every connection live in this process
    slots = relay.connection_slots
    assert slots.limit == 100
    baseline = _fd_count()

    async def connect() -> tuple[Raw, str, float]:
        started = time.monotonic()
        client = await Raw.open(relay.smtp_address)
        return client, await client.reply(), time.monotonic() - started

    began = time.monotonic()
    results: list[tuple[Raw, str, float]] = []
    for _ in range(0, 1000, 50):
        results += await asyncio.gather(*(connect() for _ in range(50)))
    greeted_clients = [c for c, reply, _ in results if reply.startswith("220 relay.test ")]
    too_many = "421 4.3.2 Too many connections, try again later"
    refused = [(c, s) for c, reply, s in results if reply == too_many]
    assert len(greeted_clients) == 100 and len(refused) == 900
    assert all(await asyncio.gather(*(c.closed() for c, _ in refused)))
    assert (slots.active, slots.refused) == (100, 900)
    refusal_s = sorted(s for _, s in refused)
    opened_in_s = time.monotonic() - began
    logged = [r for r in caplog.records if "too many connections" in r.getMessage()]
    assert 1 <= len(logged) <= 1 + opened_in_s // 10
    assert re.fullmatch(
        r"reject: connect from \[127\.0\.0\.1\]:\d+: too many connections "
        r"\(max_connections=100\); \d+ refused since the last report, \d+ in all",
        logged[0].getMessage(),
    )

    # full: one more is refused; after ten leave, a well-behaved client relays a message
    late = await Raw.open(relay.smtp_address)
    assert await late.reply() == too_many
    assert await late.closed()
    assert slots.refused == 901
    for client in greeted_clients[:10]:
        assert await client.command("QUIT") == "221 2.0.0 Bye"
        await client.close()
    await wait_until(lambda: slots.active == 90, timeout_s=10, message="slots not given back")
    async with greeted(relay) as fresh:
        await open_transaction(fresh)
        assert (await fresh.command("DATA")).startswith("354 ")
        fresh.writer.write(b"Subject: still served\r\n\r\nok\r\n.\r\n")
        assert (await fresh.reply()).startswith("250 2.0.0 Ok: queued as UP")
        assert await fresh.command("QUIT") == "221 2.0.0 Bye"
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.data.endswith(b"Subject: still served\r\n\r\nok\r\n")

    await asyncio.gather(*(c.close() for c, _, _ in results), late.close())
    await wait_until(lambda: slots.active == 0, timeout_s=10, message="slots not given back")
    await relay.handler.drain()
    assert relay.upstreams is not None
    await relay.upstreams.pool.close()  # the upstream connection kept for reuse is no leak
    await wait_until(
        lambda: _fd_count() <= baseline,
        timeout_s=10,
        message=f"file descriptors leaked: {baseline} before, now {_fd_count()}",
    )
    print(
        f"\n1000 connections opened in {opened_in_s:.2f} s; 421 after "
        f"median {statistics.median(refusal_s) * 1000:.1f} ms, "
        f"max {refusal_s[-1] * 1000:.1f} ms; fds {baseline} before, {_fd_count()} after"
    )
