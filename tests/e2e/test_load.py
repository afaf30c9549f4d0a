"""Load in CI: 1,000 messages through Postfix → ``smtp-tracker serve`` → the upstream, 50 at once.

The messages are drawn from the corpus (fixtures and built messages of 1 KB
to 1 MB without it), numbered by Message-ID, and injected over 50 SMTP
sessions into a private Postfix, which delivers them to smtp-tracker (a real
process, tracking on, STARTTLS on both sides) over up to 50 connections.
Every message Postfix accepted must reach the upstream exactly once; the
process's descriptors must come back to where they were and its peak RSS stay
under a generous bound.  ``bench/load.py`` is the 10,000-message version with
figures.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.load import (
    POSTFIX_LOAD_SETTINGS,
    ProcessSampler,
    fd_count,
    inject,
    load_message_id,
    message_pool,
    numbered,
    status_kib,
)
from tests.support.serve import launch_serve, tracking_args
from tests.support.waiting import wait_until

MESSAGES = 1000
CONNECTIONS = 50
#: Peak RSS allowed, in KiB: twice what runs here measure (180 to 260 MiB; idle, 61 MiB).
RSS_BOUND_KIB = 512 * 1024


@pytest.mark.postfix
@pytest.mark.timeout(180)
async def test_1000_messages_50_at_once_none_lost_descriptors_back_rss_bounded(
    upstream: Any,
    postfix_factory: Any,
    ca_pem_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    tmp_path: Path,
) -> None:
    messages = numbered(message_pool(), MESSAGES, seed=1)
    relay = await launch_serve(
        upstream,
        ca_pem_path,
        tmp_path / "data",
        *tracking_args(cert_pem_path, key_pem_path, pixel_base_url="https://localhost:8443"),
    )
    pid = relay.process.pid
    try:
        postfix = await postfix_factory(relay.port, **POSTFIX_LOAD_SETTINGS)  # 50 connections
        baseline_fds = fd_count(pid)
        sampler = ProcessSampler(pid)
        sampler.start()
        started = time.monotonic()
        injected = await inject("127.0.0.1", postfix.smtpd_port, messages, connections=CONNECTIONS)
        assert injected.refused == {}
        assert len(injected.accepted) == MESSAGES

        def delivered() -> Counter[str]:
            ids = (load_message_id(t.data) for t in upstream.transactions)
            return Counter(i for i in ids if i is not None)

        await wait_until(
            lambda: len(delivered()) >= MESSAGES,
            timeout_s=90,
            interval_s=0.2,
            message=f"not all {MESSAGES} messages reached the upstream",
        )
        elapsed = time.monotonic() - started
        counts = delivered()
        assert set(counts) == injected.accepted  # none lost, none made up
        assert max(counts.values()) == 1  # none twice
        await postfix.wait_until_queue_empty(timeout_s=30)
        # Postfix closes its cached connections after 2 s idle; smtp-tracker then
        # closes the upstream side too
        await wait_until(
            lambda: fd_count(pid) <= baseline_fds + 2,
            timeout_s=30,
            interval_s=0.2,
            message=f"descriptors not back to {baseline_fds} (+2): {fd_count(pid)}",
        )
        await sampler.stop()
        peak_rss_kib = status_kib(pid, "VmHWM")
    finally:
        relay.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(relay.process.wait(), 60)
        await relay.finish()
    assert code == 0
    assert sampler.peak_fds >= baseline_fds + CONNECTIONS  # the load was really concurrent
    assert peak_rss_kib < RSS_BOUND_KIB, f"peak RSS {peak_rss_kib} KiB"
    # a hang detector, not a speed test (bench/load.py measures speed): 1,000
    # messages take 15-40 s here, more on a busy machine
    assert elapsed < 300, f"{MESSAGES} messages took {elapsed:.1f} s"
    print(
        f"load: {MESSAGES} messages in {elapsed:.1f} s ({MESSAGES / elapsed:.0f}/s), "
        f"peak RSS {peak_rss_kib // 1024} MiB, descriptors {baseline_fds} -> "
        f"{sampler.peak_fds} peak"
    )
    assert not [line for line in relay.log if "Traceback" in line]
