"""Failover between upstreams (issue 21 item 1): ``upstream = [first, second]``.

The first upstream fails before it accepted MAIL (refused, silent past the
connect timeout, an untrusted certificate, a 421 greeting): the transaction
goes through the second, in the same downstream transaction; the first is
marked down and skipped (no second attempt); after ``upstream_retry_s`` a
probe finds it back and it carries mail again.  All upstreams down: Postfix
hears 4xx, defers, and the message is delivered once when one returns.
"""

from __future__ import annotations

import time
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from tests.support.postfix import without_bounces
from tests.support.upstream import UpstreamServer, upstream_factory
from tests.support.waiting import wait_until

__all__ = ["upstream_factory"]

pytestmark = pytest.mark.upstream(auth_required=False)


def message(number: int) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "alice@example.org"
    mail["To"] = "bob@example.net"
    mail["Subject"] = f"failover {number}"
    mail["Message-ID"] = f"<failover-{number}@example.org>"
    mail.set_content("hello\n")
    return mail


async def send(relay: Application, number: int) -> float:
    """Send one message through ``relay``; the seconds it took (for the report)."""
    host, port = relay.smtp_address
    started = time.monotonic()
    await aiosmtplib.send(message(number), hostname=host, port=port, start_tls=False, timeout=30)
    return time.monotonic() - started


FAULTS = {
    "refused": {"start": False},
    "timeout": {"delay_s": {"CONNECT": 30.0}},
    "tls": {"cert": "untrusted"},
    "greeting-421": {"greeting": "421 4.3.2 too busy, come back later"},
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_first_upstream_failing_before_mail_moves_to_the_second(
    fault: str, upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    first = await upstream_factory(auth_required=False, **FAULTS[fault])
    relay = await relay_factory(
        upstream=[first.address, upstream.address],
        upstream_connect_timeout_s=0.5,
        upstream_retry_s=60.0,
        upstream_user=None,
    )
    delay = await send(relay, 1)
    # bounded by upstream_connect_timeout_s (0.5 s), not by the silent upstream's
    # 30 s: 0.1-0.6 s here; the margin is for a loaded machine
    assert delay < 10, f"failover took {delay:.1f} s"
    [arrived] = await upstream.wait_for_transactions(1)
    assert b"failover-1@" in arrived.data
    assert first.transactions == []
    assert relay.upstreams is not None
    health = relay.upstreams.health[0]
    assert not health.up and health.failed == 1
    accepted_before = first.accepted

    await send(relay, 2)  # the first is skipped: no second attempt at it
    await upstream.wait_for_transactions(2)
    assert health.failed == 1
    assert first.accepted == accepted_before
    assert [h.carried for h in relay.upstreams.health] == [0, 2]
    print(f"failover delay ({fault}): {delay:.3f} s")


async def test_a_failed_upstream_is_used_again_once_its_probe_finds_it_back(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    first = await upstream_factory(start=False, auth_required=False)
    relay = await relay_factory(
        upstream=[first.address, upstream.address],
        upstream_retry_s=0.2,
        upstream_user=None,
        metrics=True,
        metrics_listen="127.0.0.1:0",
    )
    assert relay.upstreams is not None and relay.metrics is not None
    metrics = relay.metrics
    health = relay.upstreams.health[0]
    first_labels = f'role="upstream",upstream="{first.address}"'
    await send(relay, 1)
    await upstream.wait_for_transactions(1)
    assert not health.up
    scraped = metrics.exposition().decode()
    assert f"smtp_tracker_upstream_up{{{first_labels}}} 0.0" in scraped
    assert (
        f'smtp_tracker_upstream_carried_total{{role="upstream",upstream="{upstream.address}"}} 1.0'
        in scraped
    )
    await first.start()
    await wait_until(lambda: health.up, timeout_s=10, message="the first upstream's probe")
    await send(relay, 2)
    [arrived] = await first.wait_for_transactions(1)
    assert b"failover-2@" in arrived.data
    assert len(upstream.transactions) == 1
    assert health.failures == 0
    scraped = metrics.exposition().decode()
    assert f"smtp_tracker_upstream_up{{{first_labels}}} 1.0" in scraped
    assert f"smtp_tracker_upstream_carried_total{{{first_labels}}} 1.0" in scraped


def test_the_back_off_doubles_up_to_fifteen_minutes() -> None:
    from smtp_tracker.smtp.failover import Upstreams
    from smtp_tracker.smtp.upstream import UpstreamSettings

    settings = UpstreamSettings(host="a", port=25, tls="none", tls_context=None, helo_name="h")
    upstreams = Upstreams([settings], retry_s=60.0)
    assert [upstreams.backoff_s(n) for n in (1, 2, 3, 4, 5, 6)] == [60, 120, 240, 480, 900, 900]


@pytest.mark.postfix
async def test_all_upstreams_down_defers_and_delivers_once_when_one_returns(
    upstream_factory: Any, relay_factory: Any, postfix_factory: Any
) -> None:
    first = await upstream_factory(start=False, auth_required=False)
    second = await upstream_factory(start=False, auth_required=False)
    relay = await relay_factory(
        upstream=[first.address, second.address], upstream_retry_s=0.2, upstream_user=None
    )
    postfix = await postfix_factory(relay.smtp_address[1])
    await postfix.send("alice@example.org", ["bob@example.net"], bytes(message(1)))

    async def deferred() -> list[str]:
        return [r for r in await postfix.deferred_reasons() if "451 4.4.1" in r]

    await wait_until(deferred, timeout_s=30, message="Postfix did not defer with 451 4.4.1")
    await second.start()
    await postfix.flush()
    [arrived] = without_bounces(await second.wait_for_transactions(1, timeout_s=30))
    await postfix.wait_until_queue_empty(timeout_s=30)
    assert b"failover-1@" in arrived.data
    assert without_bounces(second.transactions) == [arrived]
    assert first.transactions == []
