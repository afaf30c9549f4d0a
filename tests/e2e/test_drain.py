"""SIGTERM drains ``smtp-tracker serve`` (a real process) within ``shutdown_grace_s``.

* A client in the middle of its message when SIGTERM arrives: new connections
  are refused at once, the client finishes its message and hears the
  upstream's own 250, and the process exits 0.
* A transaction that outlasts the grace period (the upstream sits on its reply
  to the payload): the client is told ``421 4.3.2`` (it keeps the message and
  retries), the upstream never gets to accept it, the process exits 0 soon
  after the grace period.

``tests/e2e/test_serve.py`` has the simpler case of a swaks transaction
finishing after SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.process import Running
from tests.support.serve import launch_serve
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

HEAD = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: drain\r\n\r\n"
BODY = b"".join(b"line %d of a message sent while the relay stops\r\n" % n for n in range(200))


class Client:
    """A bare SMTP client that can stop anywhere, even half-way through the payload."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        assert (await client.reply()).startswith("220 ")
        return client

    async def reply(self, timeout_s: float = 30.0) -> str:
        """The next reply's last line (multi-line replies are read to their end)."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout_s)
            assert line, "the relay closed the connection"
            if line[3:4] != b"-":
                return line.decode().rstrip("\r\n")

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def start_message(self) -> None:
        """EHLO, MAIL, RCPT, DATA: the transaction is in flight once MAIL is accepted."""
        assert (await self.command("EHLO postfix.test")).startswith("250 ")
        assert (await self.command("MAIL FROM:<alice@example.org>")).startswith("250 ")
        assert (await self.command("RCPT TO:<bob@example.net>")).startswith("250 ")
        assert (await self.command("DATA")).startswith("354 ")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def refused(port: int) -> bool:
    """Whether a new connection to the relay is refused (one that is not is closed again)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return False


async def stopping(served: Running) -> None:
    await wait_until(
        lambda: any("stopping: draining" in line for line in served.log),
        timeout_s=10,
        message="serve did not log that it is stopping",
    )


async def exit_status(served: Running, timeout_s: float) -> int:
    status = await asyncio.wait_for(served.process.wait(), timeout_s)
    assert served.reader is not None
    await served.reader
    return status


@pytest.fixture
async def launched(tmp_path: Path) -> AsyncIterator[list[Running]]:
    """Processes to kill at teardown if a test left them running."""
    processes: list[Running] = []
    yield processes
    for served in processes:
        await served.finish()


async def test_sigterm_refuses_new_connections_and_lets_the_message_in_flight_finish(
    upstream: UpstreamServer, ca_pem_path: Path, tmp_path: Path, launched: list[Running]
) -> None:
    served = await launch_serve(
        upstream, ca_pem_path, tmp_path / "data", "--shutdown-grace-s", "20"
    )
    launched.append(served)
    client = await Client.connect(served.port)
    await client.start_message()
    await client.send(HEAD + BODY[: len(BODY) // 2])  # half the message, and a pause

    served.process.send_signal(signal.SIGTERM)
    await stopping(served)
    await wait_until(
        lambda: refused(served.port), timeout_s=2, message="new connections still accepted"
    )
    assert served.process.returncode is None  # still draining: the message is not done

    await client.send(BODY[len(BODY) // 2 :] + b".\r\n")
    reply = await client.reply()
    (delivered,) = await upstream.wait_for_transactions(1)
    assert reply == f"250 2.0.0 Ok: queued as {delivered.queue_id}"  # the upstream's own
    assert delivered.data.endswith(HEAD + BODY)
    await client.close()

    assert await exit_status(served, timeout_s=20) == 0, "".join(served.log)
    log = "".join(served.log)
    assert "status=sent" in log and "unfinished" not in log
    assert "stopped" in served.log[-1]


@pytest.mark.upstream(delay_s={"EOM": 60.0})
async def test_a_transaction_outlasting_the_grace_period_gets_421_and_serve_still_exits_0(
    upstream: UpstreamServer, ca_pem_path: Path, tmp_path: Path, launched: list[Running]
) -> None:
    grace_s = 1.5
    served = await launch_serve(
        upstream, ca_pem_path, tmp_path / "data", "--shutdown-grace-s", str(grace_s)
    )
    launched.append(served)
    client = await Client.connect(served.port)
    await client.start_message()
    await client.send(HEAD + BODY + b".\r\n")
    # the whole message is with the upstream, which sits on its reply
    await wait_until(
        lambda: any(line.startswith("354 ") for line in upstream.transcript),
        timeout_s=10,
        message="the message never reached the upstream",
    )

    signalled = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    reply = await client.reply(timeout_s=grace_s + 10)
    waited_s = time.monotonic() - signalled
    assert reply == "421 4.3.2 smtp-tracker shutting down"
    assert grace_s <= waited_s < grace_s + 3, waited_s
    await client.close()

    assert await exit_status(served, timeout_s=grace_s + 5) == 0, "".join(served.log)
    exited_s = time.monotonic() - signalled
    assert exited_s < grace_s + 3, exited_s
    print(f"\ngrace {grace_s} s: 421 after {waited_s:.2f} s, exit 0 after {exited_s:.2f} s")
    assert "1 transactions unfinished" in "".join(served.log)
    assert upstream.transactions == []  # it never said 250: the client's retry is the only copy
