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
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import lxml.html
import pytest

from smtp_tracker.config import Config
from smtp_tracker.tokens import new_tracking_id
from smtp_tracker.workers import usable_cores, worker_count
from tests.support.certificates import CertificateFiles
from tests.support.metrics import SUPERVISOR_METRICS, WORKER_METRICS, scrape
from tests.support.process import Running, one_worker, run_cli
from tests.support.serve import launch_serve, tracking_args
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


# --- the default count, and the reports listener in one worker only -----------------


def test_the_default_is_one_worker_per_usable_core(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Config.__dataclass_fields__["workers"].default == 0
    # the affinity mask (taskset, a cpuset), not the host's cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cores() == 3
    assert worker_count(0) == 3
    assert worker_count(2) == 2  # a count given is kept
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1}, raising=False)
    assert worker_count(0) == 1  # one usable core: serve runs alone, no supervisor


def test_without_an_affinity_mask_the_host_cores_count(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(pid: int) -> set[int]:
        raise OSError("not here")

    monkeypatch.setattr(os, "sched_getaffinity", refused, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert worker_count(0) == 6
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert worker_count(0) == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert worker_count(0) == 1


def test_the_test_launcher_runs_one_worker_unless_told() -> None:
    assert one_worker(["serve", "--listen", "x"]) == ["serve", "--workers", "1", "--listen", "x"]
    assert one_worker(["serve", "--workers", "2"]) == ["serve", "--workers", "2"]
    assert one_worker(["serve", "--workers=3"]) == ["serve", "--workers=3"]
    assert one_worker(["pixel", "--no-tls"]) == ["pixel", "--no-tls"]


REPORTS_LISTENING = re.compile(r"\[(\d+)\]: listening for HTTPS \(reports\) on 127\.0\.0\.1:(\d+)")
PIXEL_LISTENING = re.compile(r"listening for HTTPS \(pixel\) on 127\.0\.0\.1:(\d+)")
USER = "carol"
PASSWORD = "a long enough password"


def reports_listeners(running: Running) -> list[tuple[int, int]]:
    """(pid, port) of each ``listening for HTTPS (reports)`` line, in order."""
    return [
        (int(m.group(1)), int(m.group(2)))
        for line in running.log
        if (m := REPORTS_LISTENING.search(line))
    ]


async def start_with_reports(
    upstream: UpstreamServer, certificate_files: CertificateFiles, data_dir: Path
) -> Running:
    """``serve --workers 2`` with SMTP, the pixel, the reports and metrics; a user to sign in."""
    added = run_cli(
        "user", "add", USER, "--password-stdin", "--data-dir", str(data_dir), input=PASSWORD
    )
    assert added.returncode == 0, added.stderr
    running = await launch_serve(
        upstream,
        certificate_files.ca,
        data_dir,
        *tracking_args(
            certificate_files.cert, certificate_files.key, pixel_base_url="https://localhost"
        ),
        "--reports",
        "--reports-listen",
        "127.0.0.1:0",
        "--metrics",
        "--metrics-listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--log-level",
        "info",
    )
    await wait_until(
        lambda: (
            sum("listening for SMTP" in line for line in running.log) >= 2
            and sum(bool(PIXEL_LISTENING.search(line)) for line in running.log) >= 2
            and sum(bool(WORKER_METRICS.search(line)) for line in running.log) >= 2
            and reports_listeners(running)
        ),
        timeout_s=30,
        message="the workers did not listen",
    )
    return running


async def sign_in(client: aiohttp.ClientSession, base: str) -> None:
    async with client.get(base + "/login", allow_redirects=False) as response:
        assert response.status == 200
        form: Any = lxml.html.fromstring(await response.text())
    fields = {
        "csrf_token": form.xpath("//input[@name='csrf_token']/@value")[0],
        "next": form.xpath("//input[@name='next']/@value")[0],
        "username": USER,
        "password": PASSWORD,
    }
    async with client.post(base + "/login", data=fields, allow_redirects=False) as response:
        assert response.status == 303, response.status
        assert response.headers["Location"] == "/"


PIXELS_SEEN: tuple[tuple[str, dict[str, str]], ...] = (
    ("smtp_tracker_events_offered_total", {}),
    ("smtp_tracker_events_limited_total", {"limit": "client"}),
    ("smtp_tracker_events_limited_total", {"limit": "token"}),
)


async def test_with_two_workers_the_reports_are_served_by_one_and_the_rest_by_both(
    upstream: UpstreamServer,
    certificate_files: CertificateFiles,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    running = await start_with_reports(upstream, certificate_files, tmp_path / "data")
    try:
        pids = workers(running)
        reports_port = reports_listeners(running)[0][1]

        # a new connection per request, as SO_REUSEPORT would spread over listeners:
        # every one reaches the worker that holds the session
        connector = aiohttp.TCPConnector(ssl=client_ssl_context, force_close=True)
        jar = aiohttp.CookieJar()
        base = f"https://localhost:{reports_port}"
        async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as client:
            await sign_in(client, base)
            statuses = []
            for _ in range(20):
                async with client.get(base + "/", allow_redirects=False) as response:
                    statuses.append((response.status, response.headers.get("Location")))
        assert statuses == [(200, None)] * 20
        # the first worker listens for reports, and it alone
        assert reports_listeners(running) == [(pids[0], reports_port)]

        # SMTP: both workers
        assert all(await asyncio.gather(*(send(running.port, n) for n in range(20))))
        assert serving_pids(running) == set(pids.values())

        # the pixel: both workers (each one's own counter moves), and the merged view sums them
        (pixel_port,) = {
            int(m.group(1)) for line in running.log if (m := PIXEL_LISTENING.search(line))
        }
        pixel = aiohttp.TCPConnector(ssl=client_ssl_context, force_close=True)
        async with aiohttp.ClientSession(connector=pixel) as client:
            for _ in range(20):
                url = f"https://localhost:{pixel_port}/o/{new_tracking_id()}.gif"
                async with client.get(url) as response:
                    assert response.status == 200
                    assert response.headers["Content-Type"] == "image/gif"
        worker_ports = [
            int(m.group(2)) for line in running.log if (m := WORKER_METRICS.search(line))
        ]
        shares = [
            sum(answer.value(name, **labels) for name, labels in PIXELS_SEEN)
            for answer in [await scrape(port) for port in worker_ports]
        ]
        assert len(shares) == 2 and all(share > 0 for share in shares), shares
        assert sum(shares) == 20
        (total_port,) = {
            int(m.group(1)) for line in running.log if (m := SUPERVISOR_METRICS.search(line))
        }
        total = await scrape(total_port)
        assert sum(total.value(name, **labels) for name, labels in PIXELS_SEEN) == 20
        assert total.value("smtp_tracker_workers") == 2
    finally:
        await running.finish()


async def test_the_reports_worker_killed_is_started_again_with_the_reports_listener(
    upstream: UpstreamServer,
    certificate_files: CertificateFiles,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    running = await start_with_reports(upstream, certificate_files, tmp_path / "data")
    try:
        [(victim, reports_port)] = reports_listeners(running)
        other = workers(running)[1]
        os.kill(victim, signal.SIGKILL)

        def restarted_listener() -> list[tuple[int, int]] | None:
            return reports_listeners(running)[1:] or None

        restarted = await wait_until(
            restarted_listener,
            timeout_s=60,
            message="the reports listener did not come back",
        )
        assert restarted is not None
        [(pid, port)] = restarted
        assert pid == workers(running)[0] != victim
        assert port == reports_port  # the same port, held by the supervisor
        assert workers(running)[1] == other  # the other worker was left alone

        connector = aiohttp.TCPConnector(ssl=client_ssl_context, force_close=True)
        base = f"https://localhost:{reports_port}"
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar()) as c:
            await sign_in(c, base)  # sessions were lost with the process: sign in again
            for _ in range(10):
                async with c.get(base + "/", allow_redirects=False) as response:
                    assert response.status == 200
        running.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.process.wait(), timeout=60) == 0
    finally:
        await running.finish()
