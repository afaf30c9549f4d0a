"""Milter cost: smtp-source → Postfix (+ smtp-tracker milter) → smtp-sink, against no milter.

Run (as root, with Debian's postfix installed)::

    python bench/milter.py [--messages 2000] [--sessions 20] [--profile]

Both runs happen in one invocation, on the same private Postfix: first without
a milter, then with ``smtpd_milters = inet:127.0.0.1:PORT`` pointing at a real
``smtp-tracker milter`` process (tracking on, pixel endpoint on loopback, the
store in a temporary data directory), ``milter_default_action = tempfail`` so
that a message the milter did not see would show as deferred, not as speed.
Each run injects ``--messages`` copies of a 15 KB HTML message over
``--sessions`` parallel SMTP sessions with Postfix's ``smtp-source`` (``-d``:
sessions are reused), and ends when Postfix's queue is empty, that is when
every message has reached ``smtp-sink``.

Reported: seconds and messages per second for each run, the ratio
(with / without; the target is >= 0.8), the milter's CPU seconds per message,
its counters, and, with ``--profile`` and ``py-spy`` on the PATH, the functions
most often on top of the milter's stacks (all threads: libmilter's, the rewrite
pool, the event loop).  Exit 1 if not every message was tracked.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import pwd
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.postfix import Postfix, free_port, missing_reason
from tests.support.process import launch

#: One message of about 15 KB: an HTML newsletter with a text alternative.
_PARAGRAPH = (
    '<p>Lorem ipsum dolor sit amet, <a href="https://example.com/article">consectetur</a> '
    "adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua.</p>\r\n"
)


def template(size_bytes: int = 15_000) -> bytes:
    head = (
        "From: News <news@example.org>\r\n"
        "To: reader@example.net\r\n"
        "Subject: The weekly milter bench\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="bench-boundary"\r\n'
        "\r\n"
        "--bench-boundary\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        "The weekly bench, in plain text.\r\n"
        "--bench-boundary\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n"
        "<html><head><title>Bench</title></head><body>\r\n"
    )
    tail = "</body></html>\r\n--bench-boundary--\r\n"
    body = ""
    while len(head) + len(body) + len(tail) < size_bytes:
        body += _PARAGRAPH
    return (head + body + tail).encode()


def workspace() -> tuple[Path, Path]:
    """A directory Postfix's users can read, with the message file in it."""
    work = Path(tempfile.mkdtemp(prefix="bench-milter-", dir="/tmp"))
    work.chmod(0o755)
    message = work / "message.eml"
    message.write_bytes(template())
    return work, message


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def run_source(postfix: Postfix, message: Path, messages: int, sessions: int) -> float:
    """Inject with smtp-source; seconds until Postfix's queue is empty again."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        "smtp-source",
        "-d",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-f",
        "news@example.org",
        "-t",
        "reader@example.net",
        "-F",
        str(message),
        postfix.smtpd_address,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"smtp-source failed: {stderr.decode(errors='replace')}")
    await postfix.wait_until_queue_empty(timeout_s=max(120.0, messages / 5))
    return time.monotonic() - started


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="sample the milter with py-spy")
    parser.add_argument(
        "--milter-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="an extra flag for smtp-tracker milter (repeat), e.g. --milter-flag=--no-tracking",
    )
    args = parser.parse_args()
    reason = missing_reason()
    if reason is not None or shutil.which("smtp-source") is None:
        raise SystemExit(f"cannot run: {reason or 'smtp-source is not installed'}")

    work, message = workspace()
    sink_port = free_port()
    sink = await asyncio.create_subprocess_exec(
        "smtp-sink",
        "-u",
        pwd.getpwnam("postfix").pw_name,
        f"127.0.0.1:{sink_port}",
        "256",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    postfix = await Postfix.create(
        sink_port,
        {
            "default_process_limit": 200,
            "default_destination_concurrency_limit": 50,
            "initial_destination_concurrency": 50,
            "in_flow_delay": "0s",
            "smtp_tls_security_level": "none",
            "smtpd_client_connection_count_limit": 0,
            "smtpd_client_message_rate_limit": 0,
        },
    )
    milter = None
    sampler = None
    try:
        await run_source(postfix, message, min(100, args.messages), args.sessions)  # warm-up
        without = await run_source(postfix, message, args.messages, args.sessions)

        milter_port = free_port()
        milter = await launch(
            "milter",
            "--milter-listen",
            f"127.0.0.1:{milter_port}",
            "--data-dir",
            str(work / "data"),
            "--hostname",
            "localhost",
            "--pixel-plain-http",
            "--pixel-listen",
            "127.0.0.1:0",
            "--pixel-base-url",
            "https://track.example.org",
            "--no-reports",
            *args.milter_flag,
            env=dict(os.environ),
            ready="listening for milter connections",
        )
        await postfix.reload(
            smtpd_milters=f"inet:127.0.0.1:{milter_port}",
            milter_default_action="tempfail",
            milter_protocol="6",
        )
        await run_source(postfix, message, min(100, args.messages), args.sessions)  # warm-up
        pid = milter.process.pid
        cpu_before = cpu_seconds(pid)
        if args.profile and shutil.which("py-spy"):
            sampler = await asyncio.create_subprocess_exec(
                "py-spy",
                "record",
                "--pid",
                str(pid),
                "--threads",
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(work / "profile.txt"),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        with_milter = await run_source(postfix, message, args.messages, args.sessions)
        cpu = cpu_seconds(pid) - cpu_before
        if sampler is not None:
            with contextlib.suppress(ProcessLookupError):
                sampler.send_signal(2)  # SIGINT: py-spy writes its file and exits
            await sampler.wait()
        milter.process.send_signal(15)
        await milter.process.wait()
        await milter.finish()
        log = "".join(milter.log)
    finally:
        if milter is not None:
            await milter.finish()
        await postfix.destroy()
        with contextlib.suppress(ProcessLookupError):
            sink.kill()
        await sink.wait()

    n = args.messages
    print(f"messages: {n} x {message.stat().st_size} bytes, {args.sessions} sessions")
    print(f"without milter: {without:7.2f} s  {n / without:8.1f} msg/s")
    print(f"with milter:    {with_milter:7.2f} s  {n / with_milter:8.1f} msg/s")
    print(f"ratio (with / without throughput): {without / with_milter:.2f}  (target >= 0.80)")
    print(f"milter CPU: {cpu:.2f} s, {1000 * cpu / n:.2f} ms per message")
    counters = re.findall(r"(milter|tracking) counters: (.*)", log)
    for name, text in counters:
        print(f"{name} counters: {text}")
    profile_file = work / "profile.txt"
    if profile_file.exists():
        print("profile (py-spy, functions most often on top of a stack, all threads):")
        for function, count in top_functions(profile_file, 15):
            print(f"  {count:7d}  {function}")
    elif args.profile:
        print("profile: py-spy is not on the PATH (pip install py-spy)")
    shutil.rmtree(work, ignore_errors=True)
    tracked = re.search(r"tracked=(\d+)", " ".join(t for _, t in counters))
    if "--no-tracking" in args.milter_flag:
        return 0
    return 0 if tracked is not None and int(tracked.group(1)) >= n else 1


def top_functions(path: Path, count: int) -> list[tuple[str, int]]:
    """From py-spy's raw (collapsed) stacks: the innermost Python frames, by samples."""
    totals: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        frames = [f for f in stack.split(";") if ".py" in f]
        leaf = frames[-1] if frames else stack.split(";")[-1]
        totals[leaf] += int(samples)
    return totals.most_common(count)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
