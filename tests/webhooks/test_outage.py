"""The receiver down (connection refused), answering 500, or hanging past the
timeout while 200 messages are relayed and opened: once it recovers, every
event arrives, once per id (a repeat only with the same id and body), and a
message's events in the order they happened.

The issue's 30 s outage is shortened: with ``webhook_backoff_base_s = 0.05``
and ``webhook_backoff_max_s = 0.4`` each event is retried many times within
the few seconds the 200 messages take; the outage lasts until every event is
in the outbox and the sender has failed at least 400 attempts (48 when each
attempt waits for the 1 s timeout).  On both backends (``store_keys``: the
outbox in SQLite, or in PostgreSQL, claimed with ``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import ssl
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import wait_until
from tests.webhooks.conftest import GMAIL_PROXY, Receiver, Tracked, fetch, hook, pixels, send

MESSAGES = 200


@pytest.mark.parametrize("outage", ["down", "500", "hang"])
async def test_an_outage_loses_nothing_and_keeps_each_message_in_order(
    outage: str,
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    store_keys: dict[str, Any],
) -> None:
    app = await tracked_relay(webhooks=[hook(receiver, secret_file, ca_pem_path)], **store_keys)
    sender = app.webhooks
    assert sender is not None
    if outage == "down":
        await receiver.down()
    else:
        receiver.set_mode(outage)

    await send(app, MESSAGES)
    await upstream.wait_for_transactions(MESSAGES, timeout_s=60)
    assert all(t.data.count(b"/o/") == 1 for t in upstream.transactions)  # mail flowed
    await fetch(pixels(upstream), client_ssl_context, user_agent=GMAIL_PROXY)
    await wait_until(
        lambda: sender.outbox.written == 2 * MESSAGES,
        timeout_s=60,
        message="the events were not all written to the outbox",
    )
    # a hanging receiver costs a timeout (1 s) per attempt, 16 at once: fewer attempts
    failures = 2 * MESSAGES if outage != "hang" else 48
    await wait_until(
        lambda: sender.counters.total("failed") >= failures,
        timeout_s=60,
        message="the sender did not keep failing",
    )
    assert sender.counters.total("delivered") == 0
    assert sender.counters.total("retried") >= failures
    assert sender.counters.total("dead") == 0

    if outage == "down":
        await receiver.up()
    receiver.set_mode("ok")
    await wait_until(
        lambda: len(receiver.events()) == 2 * MESSAGES,
        timeout_s=120,
        message="not every event arrived after the receiver recovered",
    )
    await wait_until(
        lambda: sender.depth == 0 and sender.counters.total("delivered") >= 2 * MESSAGES,
        timeout_s=30,
        message="the outbox did not empty",
    )
    # once per id: a repeat (a hung attempt answered late) has the same id and the same body
    bodies: dict[str, bytes] = {}
    for delivery in receiver.deliveries:
        assert bodies.setdefault(delivery.event["id"], delivery.body) == delivery.body
    events = receiver.events()
    per_message: dict[str, list[str]] = defaultdict(list)
    for event in events:
        per_message[event["tracking_id"]].append(event["type"])
    assert len(per_message) == MESSAGES
    assert set(map(tuple, per_message.values())) == {("message.relayed", "message.opened")}
    if outage != "hang":
        assert len(receiver.deliveries) == 2 * MESSAGES  # nothing sent twice
