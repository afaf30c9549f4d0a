"""``workers = N`` with real processes: a supervisor, workers sharing the port, drain, restart.

The relay runs as ``python -m smtp_tracker serve --workers 2`` relaying to the
upstream test server; clients are aiosmtplib, a new connection per message
(as Postfix's ``smtp`` opens them), so SO_REUSEPORT spreads them over workers.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from pathlib import Path

import aiosmtplib

from tests.support.process import Running, run_cli
from tests.support.serve import launch_serve
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
WORKER_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
CONNECT = re.compile(r"\[(\d+)\]: connect from ")
MESSAGE_ID = re.compile(rb"Message-ID: <(w-\d+)@example\.org>")


def message(number: int) -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {number}\r\n"
        f"Message-ID: <w-{number}@example.org>\r\n\r\nmessage {number}\r\n"
    ).encode()


async def send(port: int, number: int) -> bool:
    """One message over a new connection; whether the relay said 250."""
    try:
        await aiosmtplib.send(
            message(number),
            sender=SENDER,
            recipients=[RECIPIENT],
            hostname="127.0.0.1",
            port=port,
            start_tls=False,
            timeout=30,
        )
    except (aiosmtplib.SMTPException, OSError):
        return False
    return True


def workers(running: Running) -> dict[int, int]:
    """Worker index → its latest pid, from the supervisor's log."""
    found: dict[int, int] = {}
    for line in running.log:
        if match := WORKER_STARTED.search(line):
            found[int(match.group(1))] = int(match.group(2))
    return found


def serving_pids(running: Running) -> set[int]:
    return {int(m.group(1)) for line in running.log if (m := CONNECT.search(line))}


def arrived(upstream: UpstreamServer) -> set[str]:
    found = set()
    for transaction in upstream.transactions:
        match = MESSAGE_ID.search(transaction.data)
        assert match is not None
        found.add(match.group(1).decode())
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def start(upstream: UpstreamServer, ca_pem_path: Path, tmp_path: Path) -> Running:
    running = await launch_serve(
        upstream, ca_pem_path, tmp_path / "data", "--workers", "2", "--log-level", "info"
    )
    await wait_until(
        lambda: sum("listening for SMTP" in line for line in running.log) >= 2,
        timeout_s=30,
        message="both workers did not listen",
    )
    return running


async def test_two_workers_share_the_port_and_drain_on_sigterm(
    upstream: UpstreamServer, ca_pem_path: Path, tmp_path: Path
) -> None:
    running = await start(upstream, ca_pem_path, tmp_path)
    try:
        pids = set(workers(running).values())
        assert len(pids) == 2 and running.process.pid not in pids
        results = await asyncio.gather(*(send(running.port, n) for n in range(40)))
        assert all(results)
        assert arrived(upstream) == {f"w-{n}" for n in range(40)}
        # 40 connections hashed over two listening sockets: both workers served
        assert serving_pids(running) == pids

        running.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.process.wait(), timeout=60) == 0
        assert all(gone(pid) for pid in pids)
        stopped = {
            int(m.group(1))
            for line in running.log
            if (m := re.search(r"\[(\d+)\]: stopped$", line))
        }
        assert stopped == pids  # each worker drained and stopped on its own
    finally:
        await running.finish()


async def test_sigkill_of_a_worker_loses_no_acknowledged_mail_and_it_is_restarted(
    upstream: UpstreamServer, ca_pem_path: Path, tmp_path: Path
) -> None:
    running = await start(upstream, ca_pem_path, tmp_path)
    try:
        victim = workers(running)[0]
        accepted: set[str] = set()
        numbers = iter(range(10**6))

        async def sender() -> None:
            for _ in range(15):
                number = next(numbers)
                if await send(running.port, number):
                    accepted.add(f"w-{number}")

        senders = [asyncio.create_task(sender()) for _ in range(6)]
        await wait_until(lambda: len(accepted) >= 10, timeout_s=60, message="no mail flowed")
        os.kill(victim, signal.SIGKILL)
        await asyncio.gather(*senders)

        # What the relay acknowledged reached the upstream; the rest the client keeps.
        assert accepted <= arrived(upstream)
        replacement = await wait_until(
            lambda: workers(running)[0] if workers(running)[0] != victim else None,
            timeout_s=30,
            message="worker 0 was not started again",
        )
        assert any(f"worker 0 (pid {victim}) ended with status -9" in line for line in running.log)

        async def replacement_serves() -> bool:
            await send(running.port, next(numbers))
            return replacement in serving_pids(running)

        await wait_until(replacement_serves, timeout_s=60, message="the new worker serves nothing")
        running.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.process.wait(), timeout=60) == 0
    finally:
        await running.finish()


def test_a_worker_that_cannot_start_ends_the_supervisor_with_its_status(tmp_path: Path) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: the workers cannot bind beside it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(
            "serve",
            "--workers",
            "2",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            "127.0.0.1:9",
            "--upstream-tls",
            "none",
            "--data-dir",
            str(tmp_path / "data"),
            "--no-pixel",
            "--no-reports",
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert re.search(rf"smtp-tracker: error: .*127\.0\.0\.1:{port}", done.stderr), done.stderr
