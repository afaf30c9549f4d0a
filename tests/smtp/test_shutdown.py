"""``Application.stop`` is bounded even when a client never reads what we send it."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from smtp_tracker.app import _GOODBYE_TIMEOUT_S


async def test_a_client_that_never_reads_does_not_hold_up_the_stop(relay_factory: Any) -> None:
    relay = await relay_factory()
    host, port = relay.smtp_address
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
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
        await asyncio.wait_for(relay.stop(grace_s=0.5), timeout=0.5 + _GOODBYE_TIMEOUT_S + 10)
    finally:
        sock.close()
    assert time.monotonic() - started < 0.5 + _GOODBYE_TIMEOUT_S + 5
