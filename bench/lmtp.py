"""A pixel per recipient: Postfix → LMTP → smtp-tracker, against SMTP with recipient_limit = 1.

Run (as root, with Debian's postfix installed)::

    python bench/lmtp.py [--messages 1000] [--recipients 10] [--sessions 10] [--parallel 4]

One invocation, one private Postfix, one ``smtp-tracker serve`` process with
both listeners (tracking on, ``--upstream-tls none`` to ``smtp-sink``):

1. **LMTP**: ``transport_maps = lmtp:[127.0.0.1]:LMTP_PORT``; each message goes
   to smtp-tracker as one LMTP delivery with all its recipients, which
   smtp-tracker splits into one tracked copy per recipient
   (``lmtp_parallel_copies = --parallel``).
2. **SMTP, one recipient per delivery**: ``transport_maps =
   smtp:[127.0.0.1]:SMTP_PORT`` with ``smtp_destination_recipient_limit = 1``,
   the way to get a pixel per recipient without LMTP.

Each leg injects ``--messages`` HTML messages of ``--recipients`` recipients with
``smtp-source -r`` and ends when Postfix's queue is empty (every recipient has
reached ``smtp-sink``).  Reported per leg: seconds, recipients delivered per
second, connections Postfix opened to smtp-tracker, delivery transactions
Postfix made (its queue work: one per delivery request to a delivery agent),
and smtp-tracker's CPU seconds.  Counted from smtp-tracker's log
(``connect from``, one line per copy), so the figures are what happened.
"""

from __future__ import annotations

import argparse
import asyncio
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
from tests.support.process import Running, launch

_PARAGRAPH = (
    '<p>Lorem ipsum dolor sit amet, <a href="https://example.com/article">consectetur</a> '
    "adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua.</p>\r\n"
)


def workspace() -> tuple[Path, Path]:
    """A directory Postfix's users can read, with the message file in it."""
    work = Path(tempfile.mkdtemp(prefix="bench-lmtp-", dir="/tmp"))
    work.chmod(0o755)
    return work, message_file(work)


def message_file(directory: Path) -> Path:
    """An HTML message of about 5 KB, readable by Postfix's users."""
    body = _PARAGRAPH * 20
    text = (
        "From: News <news@example.org>\r\n"
        "To: readers@example.net\r\n"
        "Subject: The LMTP bench\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "\r\n"
        f"<html><body>\r\n{body}</body></html>\r\n"
    )
    path = directory / "message.eml"
    path.write_text(text)
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def inject(postfix: Postfix, message: Path, args: argparse.Namespace) -> float:
    """smtp-source into Postfix; seconds until Postfix's queue is empty again."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        "smtp-source",
        "-d",
        "-s",
        str(args.sessions),
        "-m",
        str(args.messages),
        "-r",
        str(args.recipients),
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
    await postfix.wait_until_queue_empty(timeout_s=max(300.0, args.messages))
    return time.monotonic() - started


def count(log: str, pattern: str) -> int:
    return len(re.findall(pattern, log, re.MULTILINE))


async def leg(
    name: str, postfix: Postfix, relay: Running, message: Path, args: argparse.Namespace
) -> dict[str, float]:
    start_line = len(relay.log)
    cpu_before = cpu_seconds(relay.process.pid)
    seconds = await inject(postfix, message, args)
    cpu = cpu_seconds(relay.process.pid) - cpu_before
    log = "".join(relay.log[start_line:])
    recipients = count(log, r"status=sent")
    # one LMTP delivery per parent queue id; over SMTP, one delivery per recipient
    parents = set(re.findall(r"lmtp=([0-9A-F]+)", log))
    deliveries = len(parents) if name == "lmtp" else recipients
    return {
        "seconds": seconds,
        "recipients": recipients,
        "connections": count(log, r"connect from \["),
        "deliveries": deliveries,
        "cpu": cpu,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--recipients", type=int, default=10, help="recipients per message")
    parser.add_argument("--sessions", type=int, default=10, help="smtp-source sessions")
    parser.add_argument("--parallel", type=int, default=4, help="lmtp_parallel_copies")
    args = parser.parse_args()
    reason = missing_reason()
    if reason is not None or shutil.which("smtp-source") is None:
        raise SystemExit(f"cannot run: {reason or 'smtp-source is not installed'}")

    work, message = workspace()
    sink_port, smtp_port, lmtp_port = free_port(), free_port(), free_port()
    sink = await asyncio.create_subprocess_exec(
        "smtp-sink",
        "-u",
        pwd.getpwnam("postfix").pw_name,
        f"127.0.0.1:{sink_port}",
        "256",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    relay = await launch(
        "serve",
        "--listen",
        f"127.0.0.1:{smtp_port}",
        "--lmtp",
        "--lmtp-listen",
        f"127.0.0.1:{lmtp_port}",
        "--lmtp-parallel-copies",
        str(args.parallel),
        "--upstream",
        f"127.0.0.1:{sink_port}",
        "--upstream-tls",
        "none",
        "--data-dir",
        str(work / "data"),
        "--hostname",
        "localhost",
        "--tracking",
        "--pixel-base-url",
        "https://track.example.org",
        "--no-pixel",
        "--no-reports",
        "--max-connections",
        "300",
        env=dict(os.environ),
        ready="listening for LMTP",
    )
    postfix = await Postfix.create(
        smtp_port,
        {
            "default_process_limit": 200,
            "default_destination_concurrency_limit": 20,
            "initial_destination_concurrency": 20,
            "in_flow_delay": "0s",
            "smtp_tls_security_level": "none",
            "smtpd_client_connection_count_limit": 0,
            "smtpd_client_message_rate_limit": 0,
            "transport_maps": f"inline:{{ {{*=lmtp:[127.0.0.1]:{lmtp_port}}} }}",
        },
    )
    results: dict[str, dict[str, float]] = {}
    try:
        results["lmtp"] = await leg("lmtp", postfix, relay, message, args)
        await postfix.reload(
            transport_maps=f"inline:{{ {{*=smtp:[127.0.0.1]:{smtp_port}}} }}",
            smtp_destination_recipient_limit=1,
        )
        results["smtp"] = await leg("smtp", postfix, relay, message, args)
    finally:
        await relay.finish()
        await postfix.destroy()
        with contextlib.suppress(ProcessLookupError):
            sink.kill()
        await sink.wait()
        shutil.rmtree(work, ignore_errors=True)

    expected = args.messages * args.recipients
    print(
        f"{args.messages} messages x {args.recipients} recipients = {expected} recipients, "
        f"{args.sessions} smtp-source sessions, lmtp_parallel_copies = {args.parallel}, "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'leg':<34} {'seconds':>8} {'rcpt/s':>8} {'delivered':>9} {'conns':>6} "
        f"{'deliveries':>10} {'cpu s':>6}"
    )
    names = {
        "lmtp": "Postfix -> LMTP -> smtp-tracker",
        "smtp": "Postfix -> SMTP (recipient_limit=1)",
    }
    for key, figures in results.items():
        print(
            f"{names[key]:<34} {figures['seconds']:8.1f} "
            f"{figures['recipients'] / figures['seconds']:8.1f} {figures['recipients']:9.0f} "
            f"{figures['connections']:6.0f} {figures['deliveries']:10.0f} {figures['cpu']:6.1f}"
        )
    return 0 if all(f["recipients"] == expected for f in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
