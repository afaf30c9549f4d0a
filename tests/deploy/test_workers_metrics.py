"""``workers = 2`` with ``metrics``: the supervisor's ``metrics_listen`` sums both workers.

Real processes: ``python -m smtp_tracker serve --workers 2 --metrics`` relaying
to the upstream test server; each message over a new connection, so that
SO_REUSEPORT spreads them over both workers.  Each worker's own ``/metrics``
(on the loopback port the supervisor gave it, from its log line) counts its
share; one scrape of ``metrics_listen`` shows the total.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiosmtplib

from smtp_tracker.metrics import merge_families
from tests.support.metrics import SUPERVISOR_METRICS, WORKER_METRICS, scrape
from tests.support.process import run_cli
from tests.support.serve import launch_serve
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

MESSAGES = 40


async def send(port: int, number: int) -> None:
    await aiosmtplib.send(
        f"From: <a@example.org>\r\nTo: <b@example.net>\r\nSubject: {number}\r\n\r\nbody\r\n",
        sender="a@example.org",
        recipients=["b@example.net"],
        hostname="127.0.0.1",
        port=port,
        start_tls=False,
        timeout=30,
    )


async def test_one_scrape_of_metrics_listen_counts_both_workers(
    upstream: UpstreamServer, ca_pem_path: Path, tmp_path: Path
) -> None:
    running = await launch_serve(
        upstream,
        ca_pem_path,
        tmp_path / "data",
        "--workers",
        "2",
        "--metrics",
        "--metrics-listen",
        "127.0.0.1:0",
        "--log-level",
        "info",
    )
    try:
        await wait_until(
            lambda: (
                sum(bool(WORKER_METRICS.search(line)) for line in running.log) >= 2
                and sum("listening for SMTP" in line for line in running.log) >= 2
            ),
            timeout_s=30,
            message="both workers did not serve SMTP and metrics",
        )
        (total_port,) = {
            int(m.group(1)) for line in running.log if (m := SUPERVISOR_METRICS.search(line))
        }
        worker_ports = {
            int(m.group(1)): int(m.group(2))
            for line in running.log
            if (m := WORKER_METRICS.search(line))
        }
        assert len(worker_ports) == 2 and total_port not in worker_ports.values()

        await asyncio.gather(*(send(running.port, n) for n in range(MESSAGES)))
        assert len(upstream.transactions) == MESSAGES

        per_worker = [await scrape(port) for port in worker_ports.values()]
        shares = [
            answer.value("smtp_tracker_transactions_total", outcome="relayed")
            for answer in per_worker
        ]
        assert all(share > 0 for share in shares), shares  # SO_REUSEPORT spread them
        assert sum(shares) == MESSAGES

        total = await scrape(total_port)
        assert total.value("smtp_tracker_transactions_total", outcome="relayed") == MESSAGES
        assert total.value("smtp_tracker_workers") == 2
        assert total.value("smtp_tracker_worker_up", worker="0") == 1
        assert total.value("smtp_tracker_worker_up", worker="1") == 1
        # the build info is one series of value 1, not summed to 2
        (build,) = [v for (name, _), v in total.samples.items() if name.endswith("_build_info")]
        assert build == 1
        # every other counter of the workers is their sum too
        connects = "smtp_tracker_upstream_connect_seconds_count"
        assert total.value(connects) == sum(answer.value(connects) for answer in per_worker) > 0
    finally:
        await running.finish()


def test_merge_sums_series_and_histograms_and_keeps_info_once() -> None:
    worker = """# HELP x_total A counter.
# TYPE x_total counter
x_total{k="a"} %d
x_created{k="a"} 1.7e9
# HELP h A histogram.
# TYPE h histogram
h_bucket{le="1.0"} %d
h_bucket{le="+Inf"} %d
h_sum 0.5
h_count %d
# HELP b_info Build.
# TYPE b_info gauge
b_info{version="1"} 1.0
"""
    merged = merge_families([worker % (2, 1, 2, 2), worker % (3, 0, 5, 5)])
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in merged for s in f.samples
    }
    assert samples == {
        ("x_total", (("k", "a"),)): 5,
        ("h_bucket", (("le", "1.0"),)): 1,
        ("h_bucket", (("le", "+Inf"),)): 7,
        ("h_sum", ()): 1.0,
        ("h_count", ()): 7,
        ("b_info", (("version", "1"),)): 1,
    }


def test_a_taken_metrics_listen_ends_the_supervisor_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--upstream-tls",
            "none",
            "--data-dir",
            str(tmp_path / "data"),
            "--no-tracking",
            "--no-pixel",
            "--no-reports",
            "--workers",
            "2",
            "--metrics",
            "--metrics-listen",
            f"127.0.0.1:{port}",
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"smtp-tracker: error: metrics_listen: cannot listen on 127.0.0.1:{port} "
        "(Address already in use); is another process using it? "
        "Set metrics_listen, or --no-metrics"
    ]
