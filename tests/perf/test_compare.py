"""bench/compare.py is not run in CI (it needs minutes and a quiet machine); its set-up is.

Importing it, parsing its command line and building its message and profile
summary catch the breakage that would otherwise show only when someone runs it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "compare.py"


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_sections_default_to_all_six_figures_in_order(compare: ModuleType) -> None:
    args = compare.parse_args([])
    assert args.sections == ["relay", "pipeline", "latency", "rewrite", "pixel", "memory"]
    assert (args.messages, args.sessions, args.workers) == (2000, 20, 0)


def test_only_picks_sections_and_refuses_unknown_ones(
    compare: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert compare.parse_args(["--only", "pixel,relay"]).sections == ["pixel", "relay"]
    with pytest.raises(SystemExit) as exited:
        compare.parse_args(["--only", "relay,speed"])
    assert exited.value.code == 2
    assert "unknown sections ['speed']" in capsys.readouterr().err


def test_the_message_is_the_template_as_html_with_crlf_lines(
    compare: ModuleType, tmp_path: Path
) -> None:
    template = tmp_path / "t.html"
    template.write_bytes(b"<html>\n<body><p>hi</p>\n</body></html>\n")
    message = compare.html_message(template)
    head, _, body = message.partition(b"\r\n\r\n")
    assert b"Content-Type: text/html; charset=utf-8" in head.split(b"\r\n")
    assert body == b"<html>\r\n<body><p>hi</p>\r\n</body></html>\r\n"
    assert b"\n" not in message.replace(b"\r\n", b"")


def test_profile_summary_counts_self_and_total_samples(
    compare: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "relay.txt"
    raw.write_text("main (a.py:1);read (b.py:2) 3\nmain (a.py:1);write (c.py:3) 1\n")
    compare.print_profile(raw)
    out = capsys.readouterr().out
    assert "4 samples" in out
    assert "75.0%  read (b.py:2)" in out
    assert "100.0%  main (a.py:1)" in out


def test_dot_stuffing_doubles_a_leading_dot_only(compare: ModuleType) -> None:
    assert compare.dot_stuffed(b".a\r\nb.\r\n..c\r\n") == b"..a\r\nb.\r\n...c\r\n"


def test_listening_sockets_counts_each_listener_on_the_port_only(
    compare: ModuleType, tmp_path: Path
) -> None:
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        "   0: 0100007F:2729 00000000:0000 0A 00000000:00000000\n"  # 10025, LISTEN
        "   1: 0100007F:2729 00000000:0000 0A 00000000:00000000\n"  # a second worker
        "   2: 0100007F:2729 0100007F:C350 01 00000000:00000000\n"  # a connection
        "   3: 0100007F:272A 00000000:0000 0A 00000000:00000000\n"  # 10026
    )
    assert compare.listening_sockets(10025, table) == 2
    assert compare.listening_sockets(10026, table) == 1
    assert compare.listening_sockets(10027, table) == 0


def test_machine_cpu_counts_this_process_as_busy(compare: ModuleType) -> None:
    before, cpu_before = compare.machine_cpu_seconds(), time.process_time()
    while time.process_time() - cpu_before < 0.3:  # bounded by CPU time, not the clock
        sum(range(1000))
    busy, idle = compare.machine_cpu_since(before)
    used = time.process_time() - cpu_before
    assert busy >= used - 0.05  # /proc/stat counts in ticks of 10 ms, per core
    assert idle >= 0


def test_the_pipeline_bound_is_printed_from_the_measured_cpu(
    compare: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    results = compare.Results()
    results.figures.update(
        postfix=500.0,
        postfix_machine_cpu_per_msg_ms=3.0,
        postfix_busy=0.75,
        pipeline=300.0,
        pipeline_machine_cpu_per_msg_ms=4.0,
        pipeline_busy=1.0,
        pipeline_tracker_cpu_per_msg_ms=1.0,
    )
    compare.print_results(results, compare.parse_args([]))
    out = capsys.readouterr().out
    cores = os.cpu_count() or 1
    bound = cores * 1e3 / 4.0
    assert f"= {bound:,.0f} msg/s ({bound / 500:.2f}x Postfix alone)" in out
    assert f"0.9x needs smtp-tracker at {max(0.0, cores * 1e3 / 450 - 3.0):.2f} ms" in out
