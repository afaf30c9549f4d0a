"""Load: corpus messages through Postfix → ``smtp-tracker serve`` → a counting upstream.

Run (as root, with Debian's postfix installed and the corpus set)::

    SMTP_TRACKER_CORPUS=../shared/corpus python bench/load.py [--messages 10000] [--connections 50]

Messages are drawn at random (``--seed``) from the corpus's ``eml/`` and
``html/`` (wrapped as messages), so sizes are mixed as real mail is: most a
few KB, one in fifty over 300 KB, up to 3 MB.  Each gets its own Message-ID
and is injected into a private Postfix over ``--connections`` SMTP sessions;
Postfix delivers to smtp-tracker (a real process, tracking and the pixel
endpoint on, STARTTLS from Postfix and to the upstream) over up to
``--connections`` connections; the upstream, an aiosmtpd sink in a process of
its own, counts arrivals by Message-ID.

Reported: messages accepted by Postfix and received upstream (lost and
duplicated, by Message-ID), elapsed seconds from the first injection to the
last arrival, messages and MB per second, smtp-tracker's peak RSS
(``VmHWM``) and RSS along the way, and its open descriptors before, at the
peak and after (once Postfix has closed its cached connections).  Exit 1 when
a message was lost or duplicated or descriptors did not come back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.corpus import CORPUS_ENV, corpus_root
from tests.support.load import (
    POSTFIX_LOAD_SETTINGS,
    CountingSink,
    ProcessSampler,
    fd_count,
    inject,
    message_pool,
    numbered,
    status_kib,
)
from tests.support.postfix import Postfix, missing_reason
from tests.support.process import launch
from tests.support.serve import tracking_args
from tests.support.waiting import wait_until


def _sink_process(cert: str, key: str, ids_path: str, conn: Connection) -> None:
    """The upstream, in a process of its own: each numbered arrival is a line in *ids_path*."""

    async def serve() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        sink = CountingSink(context, ids_file=Path(ids_path))
        conn.send(await sink.start())
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await sink.stop()

    asyncio.run(serve())


class Arrivals:
    """Reads the sink's file of Message-IDs as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: dict[str, int] = {}
        self._offset = 0

    def read(self) -> int:
        """Distinct Message-IDs arrived so far."""
        with self.path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode("ascii").splitlines():
            self.counts[line] = self.counts.get(line, 0) + 1
        return len(self.counts)


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ca_file, cert_file, key_file = work / "ca.pem", work / "cert.pem", work / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    ids_path = work / "arrived.txt"
    ids_path.touch()

    pool = message_pool()
    messages = numbered(pool, args.messages, seed=args.seed)
    sizes = [len(data) for _, data in messages]
    print(
        f"{args.messages} messages from {len(pool)} corpus messages, {sum(sizes) / 1e6:.1f} MB: "
        f"median {statistics.median(sizes) / 1024:.1f} KB, max {max(sizes) / 1024:.0f} KB, "
        f"{sum(s > 300_000 for s in sizes)} over 300 KB; {args.connections} connections; "
        f"{os.cpu_count()} cores",
        flush=True,
    )

    parent, child = multiprocessing.get_context("fork").Pipe()
    sink = multiprocessing.get_context("fork").Process(
        target=_sink_process, args=(str(cert_file), str(key_file), str(ids_path), child)
    )
    sink.start()
    sink_port = parent.recv()
    relay = await launch(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{sink_port}",
        "--upstream-ca-file",
        str(ca_file),
        "--data-dir",
        str(work / "data"),
        *tracking_args(cert_file, key_file, pixel_base_url="https://localhost:8443"),
        "--no-reports",
        env=dict(os.environ),
        ready="listening for SMTP",
    )
    pid = relay.process.pid
    settings = dict(
        POSTFIX_LOAD_SETTINGS,
        smtp_destination_concurrency_limit=args.connections,
        default_destination_concurrency_limit=args.connections,
        initial_destination_concurrency=args.connections,
    )
    postfix = await Postfix.create(relay.port, settings)
    arrivals = Arrivals(ids_path)
    code = 1
    try:
        baseline_fds, baseline_rss = fd_count(pid), status_kib(pid, "VmRSS")
        sampler = ProcessSampler(pid)
        sampler.start()
        started = time.monotonic()
        injecting = asyncio.create_task(
            inject("127.0.0.1", postfix.smtpd_port, messages, connections=args.connections)
        )
        step = max(1, args.messages // 10)
        next_report = step
        while True:
            arrived = arrivals.read()
            if arrived >= next_report or (
                injecting.done() and arrived >= len(injecting.result().accepted)
            ):
                print(
                    f"  {time.monotonic() - started:7.1f} s: {arrived:6d} arrived, "
                    f"smtp-tracker RSS {status_kib(pid, 'VmRSS') / 1024:.0f} MiB, "
                    f"{fd_count(pid)} descriptors",
                    flush=True,
                )
                next_report = (arrived // step + 1) * step
            if injecting.done() and arrived >= len(injecting.result().accepted):
                break
            if time.monotonic() - started > args.timeout_s:
                print(f"bench: gave up after {args.timeout_s:.0f} s", flush=True)
                break
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        injected = await injecting
        await postfix.wait_until_queue_empty(timeout_s=60)
        with contextlib.suppress(AssertionError):  # reported below either way
            await wait_until(
                lambda: fd_count(pid) <= baseline_fds + 2,
                timeout_s=60,
                interval_s=0.2,
                message="descriptors not back",
            )
        after_fds, after_rss = fd_count(pid), status_kib(pid, "VmRSS")
        await sampler.stop()
        peak_rss = status_kib(pid, "VmHWM")
    finally:
        await postfix.destroy()
        relay.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(relay.process.wait(), 60)
        await relay.finish()
        assert sink.pid is not None
        os.kill(sink.pid, signal.SIGTERM)
        sink.join(10)

    lost = injected.accepted - set(arrivals.counts)
    extra = set(arrivals.counts) - injected.accepted
    twice = sum(1 for n in arrivals.counts.values() if n > 1)
    rate = len(injected.accepted) / elapsed
    print(f"accepted by Postfix  {len(injected.accepted)} (refused {len(injected.refused)})")
    print(
        f"arrived upstream     {len(arrivals.counts)}: lost {len(lost)}, twice {twice}, "
        f"unknown {len(extra)}"
    )
    print(
        f"elapsed              {elapsed:.1f} s: {rate:.0f} msg/s, "
        f"{injected.octets / elapsed / 1e6:.1f} MB/s"
    )
    print(
        f"smtp-tracker RSS     {baseline_rss / 1024:.0f} MiB idle, peak {peak_rss / 1024:.0f} MiB "
        f"(VmHWM), {after_rss / 1024:.0f} MiB after"
    )
    print(f"descriptors          {baseline_fds} before, {sampler.peak_fds} peak, {after_fds} after")
    print(f"smtp-tracker exit    {exit_code} on SIGTERM")
    for line in relay.log:
        if "counters:" in line:
            print("  " + line.strip())
    for message_id, reply in list(injected.refused.items())[:5]:
        print(f"  refused {message_id}: {reply}")
    if not lost and not twice and not extra and after_fds <= baseline_fds + 2 and exit_code == 0:
        code = 0
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1, help="which messages are drawn")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args()
    if corpus_root() is None:
        raise SystemExit(f"bench: set {CORPUS_ENV} to the corpus directory (with eml/ and html/)")
    reason = missing_reason()
    if reason is not None:
        raise SystemExit(f"bench: {reason}")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
