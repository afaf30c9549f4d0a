"""``smtp-tracker serve`` as a real process: swaks → smtp-tracker → upstream, logs, SIGTERM."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.process import Running
from tests.support.serve import launch_serve

TRANSACTION = re.compile(
    r"smtp-tracker/relay\[\d+\]: (?P<queue_id>[0-9A-F]{12}): from=<alice@example\.org>, "
    r"to=<bob@example\.net>, size=\d+, relay=127\.0\.0\.1:\d+, delay=[\d.]+, "
    r"status=sent \(250 2\.0\.0 [^)]*\)"
)

swaks_missing = pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks is not installed (apt-get install swaks)"
)


@pytest.fixture
async def served(upstream: Any, ca_pem_path: Path, tmp_path: Path) -> AsyncIterator[Running]:
    running = await launch_serve(upstream, ca_pem_path, tmp_path / "data")
    yield running
    await running.finish()


async def swaks(port: int, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        f"127.0.0.1:{port}",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        "--helo",
        "postfix.test",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode()


@swaks_missing
async def test_swaks_through_serve_reaches_the_upstream_and_logs_like_postfix(
    served: Running, upstream: Any
) -> None:
    code, transcript = await swaks(served.port, "--body", "Hello from swaks")
    assert code == 0, transcript
    assert re.search(r"<-  250 2\.0\.0 .*\n -> QUIT", transcript), transcript
    await upstream.wait_for_transactions(1, timeout_s=10)
    (delivered,) = upstream.transactions
    assert b"Hello from swaks" in delivered.data
    assert delivered.tls and delivered.auth_user == upstream.user

    served.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0
    assert served.reader is not None
    await served.reader
    text = "".join(served.log)
    match = TRANSACTION.search(text)
    assert match, text
    # the queue id in the log is the one in the Received: header the upstream got
    assert f"with ESMTP id {match['queue_id']}".encode() in delivered.data
    assert upstream.password not in text
    assert "stopped" in served.log[-1]


@swaks_missing
@pytest.mark.upstream(delay_s={"DATA": 2.0})
async def test_sigterm_lets_the_transaction_in_flight_finish(
    served: Running, upstream: Any
) -> None:
    sending = asyncio.create_task(swaks(served.port))
    # wait until the message is on its way upstream, then ask serve to stop
    from tests.support.waiting import wait_until

    await wait_until(
        lambda: any(line.startswith("DATA") for line in upstream.transcript),
        timeout_s=20,
        message="the message never reached the upstream",
    )
    served.process.send_signal(signal.SIGTERM)
    code, transcript = await sending
    assert code == 0, transcript
    assert re.search(r"<-  250 2\.0\.0 ", transcript), transcript
    assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0
    assert len(upstream.transactions) == 1
