"""``Application.stop``: bounded even when a client never reads what we send it, and
it ends each transaction once."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from smtp_tracker.smtp.listener import GOODBYE_TIMEOUT_S
from tests.support.waiting import wait_until


async def test_a_client_that_never_reads_does_not_hold_up_the_stop(relay_factory: Any) -> None:
    relay = await relay_factory()
    host, port = relay.smtp_address
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    # The greeting first: a client that talks before it is refused (554 5.5.0).
    greeting = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)
    assert greeting.startswith(b"220 ")
    # Pipeline NOOPs and never read: the replies fill our socket buffers, and
    # aiosmtpd's push() (which drains) waits for a reader that never comes.
    sent = 0
    try:
        while sent < 4_000_000:
            chunk = b"NOOP\r\n" * 1000
            await asyncio.wait_for(loop.sock_sendall(sock, chunk), 0.5)
            sent += len(chunk)
    except TimeoutError:
        pass  # our sends block too: the relay stopped reading, its writes are stuck
    assert sent > 0
    started = time.monotonic()
    try:
        await asyncio.wait_for(relay.stop(grace_s=0.5), timeout=0.5 + GOODBYE_TIMEOUT_S + 10)
    finally:
        sock.close()
    assert time.monotonic() - started < 0.5 + GOODBYE_TIMEOUT_S + 5


@pytest.mark.upstream(delay_s={"EOM": 3.0})
async def test_a_transaction_ended_by_the_stop_and_by_its_data_hook_is_ended_once(
    relay: Application, client: aiosmtplib.SMTP, upstream: Any
) -> None:
    """``stop()`` ends a cut-off transaction (``close_session``) while its DATA hook
    still waits on the upstream; the hook, failing then, ends it again: once counts."""
    message = b"From: alice@example.org\r\nSubject: cut off\r\n\r\nhello\r\n"
    sending = asyncio.create_task(
        client.sendmail("alice@example.org", ["bob@example.net"], message)
    )
    await wait_until(
        lambda: any(line.startswith("354") for line in upstream.transcript),
        timeout_s=10,
        message="DATA not under way upstream",
    )
    handler = relay.handler
    assert handler.active_transactions == 1
    assert relay.listener is not None
    [protocol] = relay.listener.protocols
    assert protocol.session is not None
    await handler.close_session(protocol.session, quit_upstream=False)  # what stop() does
    with pytest.raises(aiosmtplib.SMTPDataError) as deferred:
        await sending
    assert deferred.value.code == 451
    await handler.drain()
    assert handler.active_transactions == 0
    assert await handler.wait_idle(0)
    assert (handler.counters["aborted"], handler.counters["deferred"]) == (1, 0)
