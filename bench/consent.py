"""The consent check's cost: relay throughput with a 100,000-address registry against without.

Run: ``python bench/consent.py [--addresses 100000] [--messages 2000] [--rounds 3]``

Two ``smtp-tracker serve`` processes (tracking on, the pixel listener off)
relay to one ``smtp-sink``: one over an empty objection registry, one over a
registry of ``--addresses`` denied addresses imported with ``smtp-tracker
consent import``.  ``smtp-source`` sends the same messages through each, in
alternating rounds (so that the load of a shared machine falls on both), and
the median of the rounds is compared; the target is at most 2 % slower.  The
recipient is not in the registry, so both relay tracked mail: what is measured
is the look-up every transaction makes.  Then the look-up alone
(:func:`smtp_tracker.store.consent.states_of`, three recipients) is timed in
process over both registries.  Needs Debian's ``postfix`` package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.relay import free_port, run_source, wait_listening
from smtp_tracker.store import DB_FILENAME, SqliteDatabase, consent


def serve(port: int, sink_port: int, data_dir: Path) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "smtp_tracker",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{sink_port}",
        "--upstream-tls",
        "none",
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
        "--no-pixel",
        "--no-reports",
        "--no-metrics",
        "--tracking",
        "--pixel-base-url",
        "https://track.example.test",
    ]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def lookup_us(data_dir: Path, calls: int) -> float:
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        recipients = ["sink@example.net", "reader@example.com", "person.77@example.org"]
        started = time.perf_counter()
        for _ in range(calls):
            consent.states_of(conn, recipients)
        return (time.perf_counter() - started) / calls * 1e6
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addresses", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--bytes", type=int, default=20480)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found; install Debian's postfix package")
    work = Path(tempfile.mkdtemp(prefix="bench-consent-"))
    empty_dir, full_dir = work / "empty", work / "full"
    for data_dir in (empty_dir, full_dir):
        SqliteDatabase.open(data_dir).close()
    csv_file = work / "objections.csv"
    csv_file.write_text("".join(f"person.{i}@example.org\n" for i in range(args.addresses)))
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "smtp_tracker",
            "consent",
            "import",
            str(csv_file),
            "--state",
            "denied",
            "--data-dir",
            str(full_dir),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    import_s = time.perf_counter() - started

    sink_port, empty_port, full_port = free_port(), free_port(), free_port()
    privileges = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(
        ["smtp-sink", *privileges, "-c", f"127.0.0.1:{sink_port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    relays = [serve(empty_port, sink_port, empty_dir), serve(full_port, sink_port, full_dir)]
    times: dict[str, list[float]] = {"empty": [], "full": []}
    try:
        for port in (sink_port, empty_port, full_port):
            wait_listening(port)
        kwargs = dict(messages=args.messages, size=args.bytes, sessions=args.sessions)
        run_source(empty_port, **kwargs)  # warm both up
        run_source(full_port, **kwargs)
        for number in range(args.rounds):
            order = ("empty", "full") if number % 2 == 0 else ("full", "empty")
            for name in order:
                port = empty_port if name == "empty" else full_port
                times[name].append(run_source(port, **kwargs))
    finally:
        for relay in relays:
            relay.terminate()
            _, errors = relay.communicate(timeout=60)
            if relay.returncode not in (0, -15):
                print(errors, file=sys.stderr)
        sink.terminate()
        sink.wait(timeout=10)
    empty_us, full_us = lookup_us(empty_dir, 20_000), lookup_us(full_dir, 20_000)
    shutil.rmtree(work, ignore_errors=True)

    print(
        f"{args.messages} messages of {args.bytes} bytes, {args.sessions} sessions, "
        f"{args.rounds} rounds, {os.cpu_count()} cores"
    )
    print(f"import of {args.addresses} addresses: {import_s:.2f} s")
    print(f"{'registry':<28} {'median s':>9} {'msg/s':>8}   rounds")
    medians = {}
    for name, label in (("empty", "empty"), ("full", f"{args.addresses} addresses")):
        medians[name] = statistics.median(times[name])
        rounds = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{label:<28} {medians[name]:9.2f} {args.messages / medians[name]:8.0f}   {rounds}")
    slower = (medians["full"] / medians["empty"] - 1) * 100
    print(f"with the registry: {slower:+.1f} % time (target: at most +2 %)")
    print(f"one look-up of 3 recipients: {empty_us:.1f} us empty, {full_us:.1f} us full")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
