"""Relay throughput: smtp-source → smtp-tracker → smtp-sink, beside smtp-source → smtp-sink.

Run: ``python bench/relay.py [--messages 2000] [--bytes 20480] [--sessions 10]``

Both legs run in the same invocation on loopback, so the figures compare on the
same machine and moment. smtp-sink speaks no TLS, so smtp-tracker relays with
``--upstream-tls none`` here; ``--tracking`` adds the rewrite stage (smtp-source
sends plain text, so it measures the decision, not a splice).
Needs Debian's ``postfix`` package (smtp-source, smtp-sink).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listening on 127.0.0.1:{port} after {timeout_s} s")


def run_source(port: int, *, messages: int, size: int, sessions: int) -> float:
    command = [
        "smtp-source",
        "-s",
        str(sessions),
        "-l",
        str(size),
        "-m",
        str(messages),
        "-f",
        "bench@example.org",
        "-t",
        "sink@example.net",
        f"127.0.0.1:{port}",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, timeout=600)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--bytes", type=int, default=20480, help="message size (smtp-source -l)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions")
    parser.add_argument("--tracking", action="store_true", help="turn the rewrite stage on")
    args = parser.parse_args()
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found; install Debian's postfix package")

    sink_port, relay_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    # smtp-sink refuses to run as root without a user to drop privileges to.
    privileges = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(
        ["smtp-sink", *privileges, "-c", f"127.0.0.1:{sink_port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    relay_command = [
        sys.executable,
        "-m",
        "smtp_tracker",
        "serve",
        "--listen",
        f"127.0.0.1:{relay_port}",
        "--upstream",
        f"127.0.0.1:{sink_port}",
        "--upstream-tls",
        "none",
        "--data-dir",
        str(work / "data"),
        "--log-level",
        "warning",
        "--no-pixel",
    ]
    relay_command += (
        ["--tracking", "--pixel-base-url", "https://track.example.test"]
        if args.tracking
        else ["--no-tracking"]
    )
    relay = subprocess.Popen(relay_command, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(sink_port)
        wait_listening(relay_port)
        kwargs = dict(messages=args.messages, size=args.bytes, sessions=args.sessions)
        direct = run_source(sink_port, **kwargs)
        relayed = run_source(relay_port, **kwargs)
    finally:
        relay.terminate()
        _, errors = relay.communicate(timeout=60)
        sink.terminate()
        sink.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    problems = [line for line in errors.splitlines() if re.search(r"(warning|error|fatal):", line)]
    print(
        f"{args.messages} messages of {args.bytes} bytes, {args.sessions} sessions, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'leg':<40} {'seconds':>8} {'msg/s':>8} {'MB/s':>7}")
    for name, seconds in (
        ("smtp-source -> smtp-sink", direct),
        ("smtp-source -> smtp-tracker -> smtp-sink", relayed),
    ):
        rate = args.messages / seconds
        print(f"{name:<40} {seconds:8.2f} {rate:8.0f} {rate * args.bytes / 1e6:7.1f}")
    print(f"relay overhead: {relayed / direct:.1f}x the direct time")
    if problems:
        print(f"smtp-tracker logged {len(problems)} warnings/errors, first: {problems[0]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
