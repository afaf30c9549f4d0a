"""Issue 15's six figures, each beside its peer, with the ratio, in one run.

Run (as root, with Debian's postfix, nginx and wrk installed; npm for Haraka)::

    python bench/compare.py [--messages 2000] [--sessions 20] [--only relay,pipeline,...]

Sections (``--only`` picks some; all run by default, in this order):

``relay``
    ``smtp-source -> smtp-tracker -> smtp-sink`` (tracking on: pixel injected,
    record written) beside ``smtp-source -> Postfix -> smtp-sink`` (queue, fsync)
    and Haraka 3.1.1's ``queue/smtp_proxy`` (no tracking at all); the loopback
    limit ``smtp-source -> smtp-sink`` for scale.  ``--messages`` messages of a
    real HTML template (``--template``, about 15 KB), ``--sessions`` sessions, a
    new connection per message as ``smtp-source`` makes them.  Target: >= 1.0x
    Postfix and >= 2x Haraka.
``pipeline``
    ``smtp-source -> Postfix -> smtp-tracker -> smtp-sink`` (the real
    deployment) beside Postfix alone: target >= 0.9x.  Postfix legs are timed
    from the first injection until Postfix's queue is empty again.
``latency``
    What smtp-tracker adds per transaction, end of DATA to the final reply, at
    half the relay's maximum rate, minus smtp-sink's own time under the same
    load (a 20 KB HTML message, sessions kept open): p50 <= 1 ms, p99 <= 5 ms.
``rewrite``
    The pixel rewrite over the corpus (``$SMTP_TRACKER_CORPUS``) beside parsing
    it with ``email``: >= 20 MB/s and within 2x of parsing.
``pixel``
    The HTTPS pixel endpoint recording opens under ``wrk`` (keep-alive, 50
    connections) beside nginx (one worker) serving the static GIF: >= 0.25x;
    p99 at half that load <= 10 ms; opens dropped at full and half load.
``memory``
    smtp-tracker's RSS with 500 concurrent SMTP sessions in DATA and a 50 MB
    message in flight (< 150 MB, peak ``VmHWM``), and its RSS sampled over
    ``--memory-messages`` messages (flat: the last sample within 10% of the one
    after the first tenth).

Haraka is installed from the npm registry into ``--haraka-dir`` (kept between
runs; ``overrides`` pin ``encoding-japanese`` 2.4.0 and ``libqp`` 2.1.2, without
which 3.1.1 does not install); if that fails its row says so and the run goes on.

``--profile DIR`` samples smtp-tracker with ``py-spy record`` during the relay
section and prints the functions with the most samples (self and total); the
sampling takes CPU from the machine, so take figures from a run without it.

Not a test: figures depend on the machine and its load; only the ratios count.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import json
import os
import pwd
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.support (Postfix), as the other benches do

SECTIONS = ("relay", "pipeline", "latency", "rewrite", "pixel", "memory")
DEFAULT_TEMPLATE = Path("/work/shared/corpus/html/postmark/inlined_basic-full_password-reset.html")
HARAKA_VERSION = "3.1.1"
HARAKA_OVERRIDES = {"encoding-japanese": "2.4.0", "libqp": "2.1.2"}
#: smtp-tracker's relay flags shared by every leg: tracking on, no web listeners.
TRACKER_FLAGS = (
    "--upstream-tls",
    "none",
    "--hostname",
    "localhost",
    "--tracking",
    "--pixel-base-url",
    "https://track.example.org",
    "--no-pixel",
    "--no-reports",
    "--log-level",
    "warning",
)


@dataclass
class Row:
    """One printed figure: ours beside the peer's, and the target it is held to."""

    figure: str
    ours: str
    peer: str
    ratio: str
    target: str
    met: bool | None


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, *args: object) -> None:
        self.rows.append(Row(*args))  # type: ignore[arg-type]


# -- arguments and set-up ---------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``--only`` is checked against :data:`SECTIONS`."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per relay leg")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source sessions")
    parser.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE, help="HTML template")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument(
        "--workers", type=int, default=0, help="smtp-tracker --workers (0: one per core)"
    )
    parser.add_argument(
        "--haraka-dir", type=Path, default=Path(tempfile.gettempdir(), "bench-haraka")
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--memory-sessions", type=int, default=500)
    parser.add_argument("--memory-big-mb", type=int, default=50)
    parser.add_argument("--memory-messages", type=int, default=100_000)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    args = parser.parse_args(argv)
    args.sections = [s for s in args.only.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def bench_module(name: str) -> ModuleType:
    """Another bench script (``bench/NAME.py``), imported without putting bench/ on sys.path.

    (bench/dkim.py on the path would shadow the dkimpy package.)
    """
    loaded = sys.modules.get(f"_bench_{name}")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def html_message(template: Path) -> bytes:
    """A one-part HTML message around ``template``, CRLF line endings."""
    html = template.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head = (
        b"From: News <news@example.org>\r\n"
        b"To: reader@example.net\r\n"
        b"Subject: The comparison bench\r\n"
        b"Message-ID: <bench@example.org>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
    )
    return head + html.rstrip(b"\r\n") + b"\r\n"


def missing_tools() -> list[str]:
    """Debian commands this bench needs that are not on PATH."""
    needed = ("smtp-source", "smtp-sink", "postfix", "nginx", "wrk")
    return [
        name
        for name in needed
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists()
    ]


def raise_fd_limit() -> None:
    """The soft descriptor limit up to the hard one (500 sessions need 1,000+), for children too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """A process's ``VmRSS`` (or ``VmHWM``) in KiB, from ``/proc/PID/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def family(pid: int) -> list[int]:
    """``pid`` and its children (a supervisor's workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat(int(entry.name))[1]) == pid:
                    children.append(int(entry.name))
    return [pid, *children]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its children so far."""
    total = 0
    for member in family(pid):
        with contextlib.suppress(OSError):
            fields = _stat(member)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far, from ``/proc/stat``.

    Busy is user, nice, system, irq, softirq and steal; idle is idle and iowait
    (an fsync's wait is idle: the core could run something else).
    """
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, (idle + iowait) / tick


def machine_cpu_since(before: tuple[float, float]) -> tuple[float, float]:
    """(busy, idle) CPU seconds of the machine since ``before`` (:func:`machine_cpu_seconds`)."""
    busy, idle = machine_cpu_seconds()
    return busy - before[0], idle - before[1]


def program_cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's program name and CPU seconds so far, its own and its reaped
    children's (a Postfix daemon that exits is counted in ``master``'s)."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = (entry / "stat").read_text()
                name = text[text.index("(") + 1 : text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                found[int(entry.name)] = (name, sum(int(f) for f in fields[11:15]) / tick)
    return found


#: Postfix's daemons (``master(8)`` and what it runs), counted as one program.
POSTFIX_DAEMONS = frozenset(
    [
        "master",
        "smtp",
        "smtpd",
        "cleanup",
        "qmgr",
        "scache",
        "postlogd",
        "trivial-rewrite",
        "showq",
        "anvil",
        "tlsmgr",
        "pickup",
        "bounce",
        "local",
        "proxymap",
        "postdrop",
        "sendmail",
        "postqueue",
        "verify",
        "flush",
        "lmtp",
    ]
)


def cpu_by_program(before: dict[int, tuple[str, float]], n: int, tracker: int) -> str:
    """CPU milliseconds per message by program since ``before``, largest first.

    Postfix's daemons are one figure: one that exits is counted again, whole, in
    ``master``'s children's time, so what it had used by ``before`` is taken off.

    :param tracker: smtp-tracker's pid: it and its workers are ``smtp-tracker``;
        other Python processes are this bench (with the ``smtp-source`` it reaped).
    """
    ours = set(family(tracker))

    def program(pid: int, name: str) -> str:
        if pid in ours:
            return "smtp-tracker"
        if name.startswith("python"):
            return "bench+smtp-source"
        if name in POSTFIX_DAEMONS:
            return "Postfix"
        return "kworker" if name.startswith("kworker") else name  # its name follows its work

    now = program_cpu_seconds()
    spent: dict[str, float] = {}
    for pid, (name, seconds) in now.items():
        previous = before.get(pid)
        group = program(pid, name)
        spent[group] = spent.get(group, 0.0) + seconds - (previous[1] if previous else 0.0)
    for pid, (name, seconds) in before.items():
        if pid not in now and name in POSTFIX_DAEMONS:  # exited: in master's total again
            spent["Postfix"] = spent.get("Postfix", 0.0) - seconds
    shown = sorted(((s, name) for name, s in spent.items() if s / n * 1e3 >= 0.01), reverse=True)
    return ", ".join(f"{name} {s / n * 1e3:.2f}" for s, name in shown)


async def wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


def listening_sockets(port: int, table: Path = Path("/proc/net/tcp")) -> int:
    """How many sockets listen on TCP ``port`` of an IPv4 address (Linux's ``table``)."""
    count = 0
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()  # sl local_address rem_address st ...
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
            count += 1
    return count


async def wait_workers(port: int, workers: int, timeout_s: float = 30.0) -> None:
    """Wait until ``workers`` sockets listen on ``port``: every worker, not only the first.

    ``wait_port`` returns as soon as one worker listens; sessions opened then all
    go to that worker (the kernel spreads connections over the sockets listening
    when they arrive), which the latency section's kept sessions then load alone.
    """
    deadline = time.monotonic() + timeout_s
    while listening_sockets(port) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {workers} workers listen on 127.0.0.1:{port}")
        await asyncio.sleep(0.05)


async def start_sink(port: int) -> asyncio.subprocess.Process:
    """smtp-sink on ``port`` (as the postfix user: it refuses root), 2,000 sessions at once."""
    sink = await asyncio.create_subprocess_exec(
        "smtp-sink",
        "-u",
        pwd.getpwnam("postfix").pw_name,
        "-m",
        "2000",  # sessions at once (default 256: the memory section holds 500)
        f"127.0.0.1:{port}",
        "1024",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await wait_port(port)
    return sink


async def start_tracker(
    port: int, upstream_port: int, data_dir: Path, args: argparse.Namespace, *extra: str
) -> asyncio.subprocess.Process:
    """``smtp-tracker serve`` relaying to smtp-sink, tracking on (see :data:`TRACKER_FLAGS`),
    once all its workers listen."""
    from smtp_tracker.workers import worker_count

    command = [
        sys.executable,
        "-m",
        "smtp_tracker",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--data-dir",
        str(data_dir),
        *TRACKER_FLAGS,
        "--workers",
        str(args.workers),
        *extra,
    ]
    process = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.DEVNULL)
    await wait_port(port)
    workers = args.workers
    if "--workers" in extra:  # a section's own count (the memory section: one process)
        workers = int(extra[extra.index("--workers") + 1])
    await wait_workers(port, worker_count(workers))
    return process


async def stop(process: asyncio.subprocess.Process | None) -> None:
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()


def install_haraka(directory: Path) -> Path | None:
    """Haraka from npm into ``directory`` (kept); the ``haraka`` script, or None with a note."""
    script = directory / "node_modules" / "Haraka" / "bin" / "haraka"
    if script.exists():
        return script
    if shutil.which("npm") is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "package.json").write_text(
        json.dumps(
            {
                "name": "bench-haraka",
                "version": "0.0.0",
                "private": True,
                "dependencies": {"Haraka": HARAKA_VERSION},
                "overrides": HARAKA_OVERRIDES,
            }
        )
    )
    import subprocess

    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel", "error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return script if done.returncode == 0 and script.exists() else None


def haraka_config(root: Path, port: int, upstream_port: int, script: Path) -> Path:
    """A Haraka configuration: relaying for loopback, ``queue/smtp_proxy`` to smtp-sink.

    Haraka's own ``config/`` is copied first (it reads ``connection.ini`` and
    others without defaults), then our files replace its.
    """
    config = root / "config"
    shutil.copytree(script.parent.parent / "config", config, dirs_exist_ok=True)
    files = {
        "smtp.ini": f"[main]\nlisten=127.0.0.1:{port}\nnodes=0\n",
        "plugins": "relay\nqueue/smtp_proxy\n",
        "relay.ini": "[relay]\nacl=true\nforce_routing=false\ndest_domains=false\n",
        "relay_acl_allow": "127.0.0.0/8\n",
        "smtp_proxy.ini": (
            f"host=127.0.0.1\nport={upstream_port}\nenable_tls=false\nmax_connections=1000\n"
        ),
        "log.ini": "[main]\nlevel=warn\n",
        "me": "haraka.localhost\n",
        "databytes": str(64 * 1024 * 1024) + "\n",
    }
    for name, text in files.items():
        (config / name).write_text(text)
    # Without DH parameters Haraka starts `openssl dhparam 2048` in the background
    # (half a minute of a core, inside the Haraka and pipeline legs): give it some,
    # made before any leg (DSA-style: well under a second).
    subprocess.run(
        ["openssl", "dhparam", "-dsaparam", "-out", str(config / "dhparams.pem"), "2048"],
        check=True,
        capture_output=True,
    )
    tls = config / "tls.ini"
    tls.write_text(tls.read_text().replace("; dhparam=dhparams.pem", "dhparam=dhparams.pem", 1))
    return root


# -- drivers ------------------------------------------------------------------------


async def smtp_source(port: int, message: Path, messages: int, sessions: int) -> float:
    """``smtp-source -F message`` (a connection per message); seconds to the last reply."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        "smtp-source",
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
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"smtp-source to port {port} failed: {errors.decode(errors='replace')}")
    return time.perf_counter() - started


async def postfix_leg(
    postfix: object,
    message: Path,
    args: argparse.Namespace,
    results: Results,
    tracker_pid: int,
    leg: str,
    label: str,
) -> float:
    """:func:`through_postfix`, measured: its msg/s.

    Into ``results.figures``: ``LEG_machine_cpu_per_msg_ms`` (the whole machine's
    CPU per message, ms), ``LEG_busy`` (the share of the cores busy) and
    ``LEG_tracker_cpu_per_msg_ms`` (smtp-tracker's part); into ``results.notes``
    the CPU by program (:func:`cpu_by_program`).
    """
    machine_before, programs_before = machine_cpu_seconds(), program_cpu_seconds()
    tracker_before = cpu_seconds(tracker_pid)
    seconds = await through_postfix(postfix, message, args)
    busy, idle = machine_cpu_since(machine_before)
    n = args.messages
    results.figures[f"{leg}_machine_cpu_per_msg_ms"] = busy / n * 1e3
    results.figures[f"{leg}_busy"] = busy / (busy + idle)
    results.figures[f"{leg}_tracker_cpu_per_msg_ms"] = (
        (cpu_seconds(tracker_pid) - tracker_before) / n * 1e3
    )
    results.notes.append(
        f"{label}, CPU ms per message by program: "
        + cpu_by_program(programs_before, n, tracker_pid)
    )
    return float(n / seconds)


async def through_postfix(postfix: object, message: Path, args: argparse.Namespace) -> float:
    """smtp-source into Postfix; seconds until Postfix's queue is empty again."""
    started = time.perf_counter()
    await smtp_source(postfix.smtpd_port, message, args.messages, args.sessions)  # type: ignore[attr-defined]
    await postfix.wait_until_queue_empty(timeout_s=max(300.0, args.messages / 5))  # type: ignore[attr-defined]
    return time.perf_counter() - started


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, expect: bytes
) -> None:
    writer.write(line)
    reply = await _reply(reader)
    if not reply.startswith(expect):
        raise RuntimeError(f"{line!r} got {reply!r}")


def dot_stuffed(message: bytes) -> bytes:
    return re.sub(rb"(?m)^\.", b"..", message)


async def paced_transactions(
    port: int, message: bytes, *, rate: float, sessions: int, seconds: float
) -> tuple[list[float], list[float]]:
    """Transactions at ``rate`` per second over kept sessions.

    :returns: end-of-DATA-to-reply times, and MAIL-to-reply times (which would
        show work moved from one transaction's reply to the next one's MAIL).
    """
    payload = dot_stuffed(message)
    per_session = max(1, round(rate * seconds / sessions))
    interval = sessions / rate
    times: list[float] = []
    mail_times: list[float] = []

    async def session(offset: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _reply(reader)
        await _command(reader, writer, b"EHLO bench.localhost\r\n", b"250")
        start = time.perf_counter() + offset
        for k in range(per_session):
            delay = start + k * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            asked = time.perf_counter()
            await _command(reader, writer, b"MAIL FROM:<news@example.org>\r\n", b"250")
            mail_times.append(time.perf_counter() - asked)
            await _command(reader, writer, b"RCPT TO:<reader@example.net>\r\n", b"250")
            await _command(reader, writer, b"DATA\r\n", b"354")
            writer.write(payload)
            await writer.drain()
            writer.write(b".\r\n")
            sent = time.perf_counter()
            reply = await _reply(reader)
            times.append(time.perf_counter() - sent)
            if not reply.startswith(b"250"):
                raise RuntimeError(f"end of data got {reply!r}")
        await _command(reader, writer, b"QUIT\r\n", b"221")
        writer.close()

    await asyncio.gather(*(session(i * interval / sessions) for i in range(sessions)))
    return times, mail_times


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# -- sections -----------------------------------------------------------------------


def ratio_row(
    results: Results, figure: str, ours: float, peer: float, peer_name: str, target: float
) -> None:
    ratio = ours / peer if peer else float("nan")
    results.add(
        figure,
        f"{ours:,.0f} msg/s",
        f"{peer:,.0f} msg/s ({peer_name})",
        f"{ratio:.2f}x",
        f">= {target}x",
        ratio >= target,
    )


async def relay_sections(
    args: argparse.Namespace, work: Path, message_path: Path, results: Results
) -> None:
    from tests.support.postfix import Postfix, free_port, missing_reason

    reason = missing_reason()
    if reason is not None:
        results.notes.append(f"relay, pipeline: skipped: {reason}")
        return
    sink_port, tracker_port, haraka_port = free_port(), free_port(), free_port()
    sink = await start_sink(sink_port)
    tracker = await start_tracker(tracker_port, sink_port, work / "data-relay", args)
    profiler = None
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        profiler = await asyncio.create_subprocess_exec(
            "py-spy",
            "record",
            "--nonblocking",  # never pause smtp-tracker (the default would slow what it measures)
            "-r",
            "250",
            "-f",
            "raw",
            "-o",
            str(args.profile / "relay.txt"),
            "--subprocesses",
            "-p",
            str(tracker.pid),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)  # py-spy attaches
    postfix = await Postfix.create(
        sink_port,
        {
            "default_process_limit": 200,
            "default_destination_concurrency_limit": args.sessions,
            "initial_destination_concurrency": args.sessions,
            "in_flow_delay": "0s",
            "smtp_tls_security_level": "none",
            "smtpd_client_connection_count_limit": 0,
            "smtpd_client_message_rate_limit": 0,
            "smtpd_client_connection_rate_limit": 0,
        },
    )
    haraka = None
    try:
        n: int = args.messages
        s: int = args.sessions

        def rate(seconds: float) -> float:
            return n / seconds

        loopback = rate(await smtp_source(sink_port, message_path, n, s))
        cpu_before = cpu_seconds(tracker.pid)
        tracked = rate(await smtp_source(tracker_port, message_path, n, s))
        results.figures["tracker_cpu_per_msg_ms"] = (
            (cpu_seconds(tracker.pid) - cpu_before) / n * 1e3
        )
        if profiler is not None:
            with contextlib.suppress(ProcessLookupError):
                profiler.send_signal(2)
            await profiler.wait()
            print_profile(args.profile / "relay.txt")
        alone = await postfix_leg(
            postfix, message_path, args, results, tracker.pid, "postfix", "Postfix alone"
        )
        results.figures.update(loopback=loopback, tracked=tracked, postfix=alone)
        if "relay" in args.sections:
            results.add(
                "relay loopback limit (smtp-source -> smtp-sink)",
                f"{loopback:,.0f} msg/s",
                "",
                "",
                "",
                None,
            )
            ratio_row(
                results,
                "1. smtp-source -> smtp-tracker -> smtp-sink",
                tracked,
                alone,
                "Postfix",
                1.0,
            )
            script = await asyncio.to_thread(install_haraka, args.haraka_dir)
            if script is None:
                results.notes.append(
                    f"Haraka {HARAKA_VERSION}: skipped: npm install failed (see {args.haraka_dir})"
                )
            else:
                root = haraka_config(work / "haraka", haraka_port, sink_port, script)
                haraka = await asyncio.create_subprocess_exec(
                    "node",
                    str(script),
                    "-c",
                    str(root),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                await wait_port(haraka_port)
                proxied = rate(await smtp_source(haraka_port, message_path, n, s))
                results.figures["haraka"] = proxied
                ratio_row(
                    results,
                    "1. ... against Haraka smtp_proxy (no tracking)",
                    tracked,
                    proxied,
                    "Haraka",
                    2.0,
                )
        if "pipeline" in args.sections:
            await postfix.reload(
                transport_maps=f"inline:{{ {{*=smtp:[127.0.0.1]:{tracker_port}}} }}"
            )
            pipeline = await postfix_leg(
                postfix, message_path, args, results, tracker.pid, "pipeline", "pipeline"
            )
            results.figures["pipeline"] = pipeline
            ratio_row(
                results,
                "2. smtp-source -> Postfix -> smtp-tracker -> smtp-sink",
                pipeline,
                alone,
                "Postfix alone",
                0.9,
            )
    finally:
        await postfix.destroy()
        for process in (haraka, tracker, sink):
            await stop(process)


async def latency_section(args: argparse.Namespace, work: Path, results: Results) -> None:
    from tests.support.postfix import free_port

    sink_port, tracker_port = free_port(), free_port()
    sink = await start_sink(sink_port)
    tracker = await start_tracker(tracker_port, sink_port, work / "data-latency", args)
    try:
        message = html_message(args.template)
        paragraph = b"<p>" + b"The latency bench pads the template to 20 KB. " * 3 + b"</p>\r\n"
        padding = paragraph * max(0, (20 * 1024 - len(message)) // len(paragraph) + 1)
        message = message.replace(b"</body>", padding + b"</body>", 1)  # a 20 KB HTML message
        maximum = results.figures.get("tracked") or 200.0
        rate = maximum / 2
        sessions = 10
        ours, our_mail = await paced_transactions(
            tracker_port, message, rate=rate, sessions=sessions, seconds=10
        )
        theirs, their_mail = await paced_transactions(
            sink_port, message, rate=rate, sessions=sessions, seconds=10
        )
        results.notes.append(
            "latency: MAIL to its reply (the upstream's MAIL included; the record of the "
            "session's last message is written before it is answered), p50 / p99: "
            f"{percentile(our_mail, 0.5) * 1e3:.2f} / {percentile(our_mail, 0.99) * 1e3:.2f} ms, "
            f"smtp-sink {percentile(their_mail, 0.5) * 1e3:.2f} / "
            f"{percentile(their_mail, 0.99) * 1e3:.2f} ms"
        )
        for name, fraction, target in (("p50", 0.5, 1.0), ("p99", 0.99, 5.0)):
            added = (percentile(ours, fraction) - percentile(theirs, fraction)) * 1e3
            results.add(
                f"3. latency added, {name} ({len(message) // 1024} KB, {rate:.0f} msg/s)",
                f"{percentile(ours, fraction) * 1e3:.2f} ms",
                f"{percentile(theirs, fraction) * 1e3:.2f} ms (smtp-sink)",
                f"+{added:.2f} ms",
                f"<= {target:g} ms",
                added <= target,
            )
    finally:
        await stop(tracker)
        await stop(sink)


def rewrite_section(results: Results) -> None:
    import email
    from email.policy import compat32

    rewrite_bench = bench_module("rewrite")

    from smtp_tracker.mime import RewritePolicy, rewrite
    from tests.corpus import CORPUS_ENV

    corpus = os.environ.get(CORPUS_ENV)
    if not corpus or not Path(corpus, "eml").is_dir():
        results.notes.append(f"rewrite: skipped: set {CORPUS_ENV}")
        return
    messages = rewrite_bench.load(Path(corpus))
    size = sum(len(octets) for _n, octets in messages)
    policy = RewritePolicy()
    parse = rewrite_bench.measure(
        messages, 3, lambda m: email.message_from_bytes(m, policy=compat32)
    )
    ours = rewrite_bench.measure(messages, 3, lambda m: rewrite(m, rewrite_bench.URL, policy))
    parse_mb, ours_mb = size / sum(parse) / 1e6, size / sum(ours) / 1e6
    results.add(
        "4. rewrite over the corpus",
        f"{ours_mb:.1f} MB/s",
        f"{parse_mb:.1f} MB/s (email parse)",
        f"{ours_mb / parse_mb:.2f}x",
        ">= 20 MB/s, >= 0.5x",
        ours_mb >= 20 and ours_mb >= parse_mb / 2,
    )


async def tracker_pixel(
    args: argparse.Namespace,
    options: argparse.Namespace,
    paths: tuple[Path, Path, Path],
    lua: Path,
) -> tuple[object, int]:
    """wrk against ``serve``'s pixel endpoint (a real process, ``--workers``); opens recorded."""
    pixel_bench = bench_module("pixel")

    from tests.support.postfix import free_port

    cert, key, data_dir = paths
    smtp_port, pixel_port = free_port(), free_port()
    before = await asyncio.to_thread(pixel_bench.count_opens, data_dir)
    tracker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtp_tracker",
        "serve",
        "--listen",
        f"127.0.0.1:{smtp_port}",
        "--upstream",
        "127.0.0.1:9",
        "--upstream-tls",
        "none",
        "--hostname",
        "localhost",
        "--data-dir",
        str(data_dir),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--no-tracking",
        "--pixel",
        "--pixel-listen",
        f"127.0.0.1:{pixel_port}",
        "--no-reports",
        "--max-events-per-token-per-min",
        "0",
        "--max-events-per-token-client-per-min",
        "0",
        "--workers",
        str(args.workers),
        "--log-level",
        "warning",
        stderr=(data_dir.parent / "serve.log").open("ab"),
    )
    try:
        await wait_port(pixel_port)
        await asyncio.sleep(1.0)  # every worker listening
        await pixel_bench.check_serves_gif(pixel_port, cert)
        result = await pixel_bench.run_wrk(options, pixel_port, lua)
    finally:
        await stop(tracker)  # SIGTERM: every worker writes what it queued
    recorded = await asyncio.to_thread(pixel_bench.count_opens, data_dir) - before
    return result, recorded


async def pixel_section(args: argparse.Namespace, work: Path, results: Results) -> None:
    pixel_bench = bench_module("pixel")

    options = argparse.Namespace(
        duration=args.duration, connections=50, threads=2, tokens=3000, nginx_workers=1
    )
    (work / "pixel").mkdir()
    cert, key, data_dir, lua, nginx_port = await asyncio.to_thread(
        pixel_bench.prepare, options, work / "pixel"
    )
    static = await pixel_bench.bench_nginx(options, work / "pixel" / "nginx", nginx_port, lua, cert)
    paths = (cert, key, data_dir)
    full, full_recorded = await tracker_pixel(args, options, paths, lua)
    # Half the load: each of the 50 connections waits between requests (wrk's delay()).
    delay_ms = max(1, round(options.connections * 1000 / (full.rps / 2)))  # type: ignore[attr-defined]
    paced = lua.with_name("paced.lua")
    paced.write_text(lua.read_text() + f"\ndelay = function() return {delay_ms} end\n")
    half, half_recorded = await tracker_pixel(args, options, paths, paced)
    ratio = full.rps / static.rps  # type: ignore[attr-defined]
    results.add(
        f"5. pixel opens/s, HTTPS keep-alive, wrk -c50 ({args.workers or os.cpu_count()} workers)",
        f"{full.rps:,.0f} req/s (p99 {full.p99_ms:.1f} ms)",  # type: ignore[attr-defined]
        f"{static.rps:,.0f} req/s (nginx 1 worker)",
        f"{ratio:.2f}x",
        ">= 0.25x",
        ratio >= 0.25,
    )
    results.add(
        f"5. pixel p99 at half load ({half.rps:,.0f} req/s)",  # type: ignore[attr-defined]
        f"{half.p99_ms:.2f} ms",  # type: ignore[attr-defined]
        f"{static.p99_ms:.2f} ms (nginx, full load)",
        "",
        "<= 10 ms",
        half.p99_ms <= 10,  # type: ignore[attr-defined]
    )
    full_missing = max(0, full.requests - full_recorded)  # type: ignore[attr-defined]
    half_missing = max(0, half.requests - half_recorded)  # type: ignore[attr-defined]
    results.add(
        "5. opens not recorded (full / half load)",
        f"{full_missing:,} of {full.requests:,} / {half_missing:,} of {half.requests:,}",  # type: ignore[attr-defined]
        "",
        "",
        "0 below the queue limit",
        half_missing == 0,
    )


async def hold_session(
    port: int, chunk: bytes, ready: asyncio.Event, release: asyncio.Event, chunks: int
) -> bytes:
    """One session in DATA: ``chunks`` chunks sent, then held until ``release``; the final reply.

    A session refused on the way (a 4xx at MAIL) is set ready too; its reply
    is what it got.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        await _command(reader, writer, b"EHLO bench.localhost\r\n", b"250")
        await _command(reader, writer, b"MAIL FROM:<news@example.org>\r\n", b"250")
        await _command(reader, writer, b"RCPT TO:<reader@example.net>\r\n", b"250")
        await _command(reader, writer, b"DATA\r\n", b"354")
        for _ in range(chunks):
            writer.write(chunk)
            await writer.drain()
    except (RuntimeError, OSError) as exc:
        ready.set()
        return str(exc).encode()
    finally:
        ready.set()
    try:
        await release.wait()
        writer.write(b".\r\n")
        return await _reply(reader)
    finally:
        writer.close()


async def memory_section(
    args: argparse.Namespace, work: Path, message_path: Path, results: Results
) -> None:
    from tests.support.postfix import free_port

    sink_port, tracker_port = free_port(), free_port()
    sink = await start_sink(sink_port)
    limit = (args.memory_big_mb + 8) * 1024 * 1024
    tracker = await start_tracker(
        tracker_port,
        sink_port,
        work / "data-memory",
        args,
        "--workers",
        "1",  # the target is one process's memory
        "--max-connections",
        str(args.memory_sessions + 50),
        "--max-message-bytes",
        str(limit),
    )
    try:
        idle = rss_kib(tracker.pid)
        small = html_message(args.template)
        half = dot_stuffed(small[: len(small) // 2].rsplit(b"\r\n", 1)[0] + b"\r\n")
        line = b"<p>" + b"x" * 72 + b"</p>\r\n"
        big_chunk = line * (1024 * 1024 // len(line))
        release = asyncio.Event()
        readies = [asyncio.Event() for _ in range(args.memory_sessions)]
        sessions = []
        for i in range(args.memory_sessions - 1):  # 25 at a time: no connection storm
            sessions.append(
                asyncio.create_task(hold_session(tracker_port, half, readies[i], release, 1))
            )
            if i % 25 == 24:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies[: i + 1])), 120)
        sessions.append(
            asyncio.create_task(
                hold_session(tracker_port, big_chunk, readies[-1], release, args.memory_big_mb)
            )
        )
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 600)
        in_flight = rss_kib(tracker.pid)
        release.set()
        replies = await asyncio.gather(*sessions, return_exceptions=True)
        accepted = sum(1 for r in replies if isinstance(r, bytes) and r.startswith(b"250"))
        outcomes = collections.Counter(
            r[:40].decode(errors="replace").strip() if isinstance(r, bytes) else type(r).__name__
            for r in replies
        )
        results.notes.append(f"memory: end-of-data replies: {dict(outcomes.most_common(5))}")
        peak = rss_kib(tracker.pid, "VmHWM")
        results.add(
            f"6. RSS, {args.memory_sessions} sessions in DATA + {args.memory_big_mb} MB in flight",
            f"{in_flight / 1024:.0f} MiB",
            f"{idle / 1024:.0f} MiB idle",
            "",
            "< 150 MB",
            in_flight * 1024 < 150e6,
        )
        results.add(
            "6. RSS peak (VmHWM) once they are all relayed",
            f"{peak / 1024:.0f} MiB",
            f"{accepted} of {len(replies)} relayed",
            "",
            "< 150 MB",
            peak * 1024 < 150e6,
        )
        # Flat over many messages: sample RSS while smtp-source runs.
        samples: list[int] = []
        run = asyncio.create_task(
            smtp_source(tracker_port, message_path, args.memory_messages, args.sessions)
        )
        while not run.done():
            samples.append(rss_kib(tracker.pid))
            await asyncio.sleep(1.0)
        await run
        samples.append(rss_kib(tracker.pid))
        early = samples[max(0, len(samples) // 10)]
        results.add(
            f"6. RSS over {args.memory_messages:,} messages",
            f"{early / 1024:.0f} -> {samples[-1] / 1024:.0f} MiB (max {max(samples) / 1024:.0f})",
            "",
            "",
            "flat (last <= 1.1x after the first tenth)",
            samples[-1] <= early * 1.1,
        )
    finally:
        await stop(tracker)
        await stop(sink)


# -- profile ------------------------------------------------------------------------


def print_profile(path: Path, top: int = 15) -> None:
    """The functions with the most py-spy samples in a ``--format raw`` file: self and total."""
    if not path.exists():
        print(f"profile: {path} was not written")
        return
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            re.sub(r" \(.*?/(?:site-packages|lib/python3\.\d+|work/main)/", " (", f)
            for f in stack.split(";")
        ]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    print(f"profile: {samples} samples ({path})")
    print("  self:")
    for frame, count in own.most_common(top):
        print(f"    {count / samples:6.1%}  {frame}")
    print("  total:")
    for frame, count in total.most_common(top):
        print(f"    {count / samples:6.1%}  {frame}")


# -- main ---------------------------------------------------------------------------


def print_results(results: Results, args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.messages} messages of {args.template.name} per relay leg, "
        f"{args.sessions} sessions, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    widths = (50, 36, 36, 10, 26)
    header = ("figure", "smtp-tracker", "peer", "ratio", "target")
    print("  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True)) + "  met")
    for row in results.rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        cells = (row.figure, row.ours, row.peer, row.ratio, row.target)
        print("  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)) + f"  {met}")
    if "tracker_cpu_per_msg_ms" in results.figures:
        cpu_ms = results.figures["tracker_cpu_per_msg_ms"]
        print(f"smtp-tracker CPU per relayed message: {cpu_ms:.2f} ms (all workers)")
    figures = results.figures
    if "pipeline_machine_cpu_per_msg_ms" in figures and "postfix_machine_cpu_per_msg_ms" in figures:
        cores = os.cpu_count() or 1
        alone_ms = figures["postfix_machine_cpu_per_msg_ms"]
        tracker_ms = figures["pipeline_tracker_cpu_per_msg_ms"]
        print(
            f"machine CPU per message (all processes): Postfix alone {alone_ms:.2f} ms "
            f"(cores {figures['postfix_busy']:.0%} busy); the pipeline "
            f"{figures['pipeline_machine_cpu_per_msg_ms']:.2f} ms (cores "
            f"{figures['pipeline_busy']:.0%} busy), smtp-tracker's part {tracker_ms:.2f} ms"
        )
        bound = cores * 1e3 / (alone_ms + tracker_ms)
        print(
            f"pipeline bound by CPU: {cores} cores / ({alone_ms:.2f} + {tracker_ms:.2f}) ms "
            f"= {bound:,.0f} msg/s ({bound / figures['postfix']:.2f}x Postfix alone); "
            f"0.9x needs smtp-tracker at "
            f"{max(0.0, cores * 1e3 / (0.9 * figures['postfix']) - alone_ms):.2f} ms per message"
        )
    for note in results.notes:
        print(note)


async def run(args: argparse.Namespace) -> Results:
    results = Results()
    work = Path(tempfile.mkdtemp(prefix="bench-compare-", dir="/tmp"))
    work.chmod(0o755)  # noqa: ASYNC240  # Postfix's users read the message file
    try:
        message_path = work / "message.eml"
        # LF line ends: smtp-source -F sends each line with CRLF itself (a CRLF
        # file would arrive with a bare CR at every line end).
        message_path.write_bytes(html_message(args.template).replace(b"\r\n", b"\n"))
        message_path.chmod(0o644)
        steps = [
            (
                "relay",
                {"relay", "pipeline", "latency"},
                relay_sections(args, work, message_path, results),
            ),
            ("latency", {"latency"}, latency_section(args, work, results)),
            ("rewrite", {"rewrite"}, asyncio.to_thread(rewrite_section, results)),
            ("pixel", {"pixel"}, pixel_section(args, work, results)),
            ("memory", {"memory"}, memory_section(args, work, message_path, results)),
        ]
        for name, wanted, step in steps:
            if not wanted & set(args.sections):
                step.close()  # never awaited: no warning
                continue
            try:
                await step
            except Exception as exc:  # one section failing leaves the others' figures
                results.notes.append(f"{name}: failed: {type(exc).__name__}: {exc}")
            print(f"bench: {name} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_tools()
    if missing:
        print(
            f"bench: missing {', '.join(missing)} (apt-get install postfix nginx wrk)",
            file=sys.stderr,
        )
        return 2
    if os.geteuid() != 0:
        print(
            "bench: run as root (a private Postfix switches to the postfix user)", file=sys.stderr
        )
        return 2
    raise_fd_limit()
    results = asyncio.run(run(args))
    print_results(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
