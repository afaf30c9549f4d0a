"""A message built to make the rewrite slow cannot hold ``serve`` past its shutdown.

Issue 12, item 2: with ``track_clicks``, an HTML part of about 0.7 MB of
repeated ``<a`` kept a rewrite thread busy for minutes (html.parser's
quadratic end-of-input handling); after SIGTERM the process logged
"stopped" and went on running until SIGKILL.  Here two such messages are in
flight when SIGTERM arrives: both are relayed and the process exits 0 within
``shutdown_grace_s`` + ``rewrite_timeout_s`` + a margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.process import Running
from tests.support.serve import launch_serve, tracking_args
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

GRACE_S = 2.0
REWRITE_TIMEOUT_S = 3.0
#: Time to start the Python process's shutdown and leave; generous for a busy machine.
MARGIN_S = 20.0
LINE = b"<a" * 400 + b"\r\n"
HOSTILE = (
    b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hostile\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><a href="https://shop.example.com/sale">sale</a></body></html>\r\n'
    + LINE
    * 900  # 0.7 MB after the end, with no ">": 93 s per 256 KiB for html.parser
)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(reader.readline(), 60)
        assert line, "the relay closed the connection"
        if line[3:4] != b"-":
            return line


async def _send(port: int, message: bytes) -> bytes:
    """One SMTP transaction written to its end (``.``); the relay's final reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await _reply(reader)).startswith(b"220 ")
        for command in (b"EHLO postfix.test", b"MAIL FROM:<alice@example.org>",
                        b"RCPT TO:<bob@example.net>", b"DATA"):  # fmt: skip
            writer.write(command + b"\r\n")
            assert (await _reply(reader))[:1] in (b"2", b"3")
        writer.write(message + b".\r\n")
        await writer.drain()
        return await _reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.fixture
async def launched() -> AsyncIterator[list[Running]]:
    processes: list[Running] = []
    yield processes
    for served in processes:
        await served.finish()


async def test_sigterm_with_two_hostile_rewrites_in_flight_exits_in_bounded_time(
    upstream: UpstreamServer,
    ca_pem_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    tmp_path: Path,
    launched: list[Running],
) -> None:
    served = await launch_serve(
        upstream,
        ca_pem_path,
        tmp_path / "data",
        *tracking_args(cert_pem_path, key_pem_path, pixel_base_url="https://localhost:1"),
        "--track-clicks",
        "--shutdown-grace-s",
        str(GRACE_S),
        "--rewrite-timeout-s",
        str(REWRITE_TIMEOUT_S),
    )
    launched.append(served)
    sending = [asyncio.create_task(_send(served.port, HOSTILE)) for _ in range(2)]
    # both transactions are with the relay (the upstream has their recipients)
    await wait_until(
        lambda: sum("RCPT TO:<bob@example.net>" in line for line in upstream.transcript) >= 2,
        timeout_s=30,
        message="the two transactions never reached RCPT at the upstream",
    )
    served.process.send_signal(signal.SIGTERM)
    replies = await asyncio.wait_for(asyncio.gather(*sending), GRACE_S + MARGIN_S)
    status = await asyncio.wait_for(served.process.wait(), GRACE_S + REWRITE_TIMEOUT_S + MARGIN_S)
    assert status == 0, "".join(served.log)
    assert served.reader is not None
    await served.reader
    assert [r[:4] for r in replies] == [b"250 ", b"250 "], replies
    relayed = await upstream.wait_for_transactions(2)
    for transaction in relayed:  # the pixel alone: no link wrapped
        assert b"/o/" in transaction.data and b"https://shop.example.com/sale" in transaction.data
    assert "stopped" in served.log[-1]
