"""SIGKILL under load: nothing given to Postfix is lost, duplicates are few and counted.

1,000 small messages go into a real Postfix over SMTP from 16 concurrent
senders; Postfix relays them through ``smtp-tracker serve`` (a real process)
to the upstream test server. Once 200 have arrived upstream, smtp-tracker is
killed with SIGKILL (no drain, no clean-up), then started again on the same
port. Postfix defers what was in flight and retries after a flush.

What must hold: every Message-ID given to Postfix reaches the upstream at
least once, nothing bounces, Postfix's queue ends empty. A message arrives
twice only when the upstream had accepted it but smtp-tracker died before
passing the 250 on to Postfix: at most one per connection open at the kill.
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiosmtplib

from tests.support.postfix import Postfix, without_bounces
from tests.support.serve import launch_serve
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

COUNT = 1000
SENDERS = 16
KILL_AFTER = 200
SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
MESSAGE_ID = re.compile(rb"^Message-ID: <(kill-\d+@example\.org)>\r$", re.MULTILINE | re.IGNORECASE)


def message(number: int) -> bytes:
    return (
        f"From: Alice <{SENDER}>\r\n"
        f"To: Bob <{RECIPIENT}>\r\n"
        f"Subject: kill test {number}\r\n"
        f"Message-ID: <kill-{number}@example.org>\r\n"
        "\r\n"
        f"message {number} of {COUNT}\r\n"
    ).encode()


async def feed(postfix: Postfix, numbers: range) -> None:
    """Give Postfix these messages over one SMTP connection to its smtpd."""
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=postfix.smtpd_port, start_tls=False, timeout=60
    )
    await smtp.connect()
    for number in numbers:
        await smtp.sendmail(SENDER, [RECIPIENT], message(number))
    await smtp.quit()


def arrivals(upstream: UpstreamServer) -> collections.Counter[str]:
    """Message-ID → how many times it reached the upstream."""
    counts: collections.Counter[str] = collections.Counter()
    for transaction in without_bounces(upstream.transactions):
        match = MESSAGE_ID.search(transaction.data)
        assert match is not None, transaction.data[:500]
        counts[match.group(1).decode()] += 1
    return counts


async def test_sigkill_while_1000_messages_flow_loses_none(
    upstream: UpstreamServer, postfix_factory: Any, ca_pem_path: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = await launch_serve(upstream, ca_pem_path, data_dir)
    postfix: Postfix = await postfix_factory(first.port)
    started = time.monotonic()
    share = -(-COUNT // SENDERS)
    senders = [
        asyncio.create_task(feed(postfix, range(start, min(start + share, COUNT))))
        for start in range(0, COUNT, share)
    ]

    await upstream.wait_for_transactions(KILL_AFTER, timeout_s=60)
    first.process.send_signal(signal.SIGKILL)
    in_flight = len(upstream.connections)  # the relay's connections, each in any state
    arrived_before = len(upstream.transactions)
    assert await first.process.wait() == -signal.SIGKILL
    await first.finish()

    second = await launch_serve(upstream, ca_pem_path, data_dir, port=first.port)
    try:
        await asyncio.gather(*senders)
        fed_s = time.monotonic() - started
        await postfix.flush()

        async def all_arrived() -> bool:
            return len(arrivals(upstream)) == COUNT

        await wait_until(
            all_arrived, timeout_s=60, interval_s=0.2, message="not every message arrived"
        )
        await postfix.wait_until_queue_empty(timeout_s=30)
        total_s = time.monotonic() - started

        counts = arrivals(upstream)
        assert set(counts) == {f"kill-{n}@example.org" for n in range(COUNT)}
        duplicates = sum(count - 1 for count in counts.values())
        assert postfix.log_matches(r"status=bounced") == []
        print(
            f"\nSIGKILL test: {COUNT} messages from {SENDERS} senders, killed after "
            f"{arrived_before} had arrived with {in_flight} upstream connection(s) open; "
            f"lost 0, duplicates {duplicates}; "
            f"fed in {fed_s:.1f} s, all delivered in {total_s:.1f} s"
        )
        assert duplicates <= in_flight

        second.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.process.wait(), timeout=30) == 0
    finally:
        await second.finish()
