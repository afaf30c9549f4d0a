"""Webhooks end to end: smtp-tracker in the test's loop relays to the upstream test
server, the pixel and click endpoints are fetched over HTTPS, and a real HTTPS
receiver gets each event, signed per Standard Webhooks (verified with the
``standardwebhooks`` library and the shared secret); on both backends
(``store_keys``: the outbox in SQLite, or in PostgreSQL)."""

from __future__ import annotations

import json
import re
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from smtp_tracker.store.records import COUNTED_VERDICTS
from smtp_tracker.webhooks.events import EVENT_TYPES
from tests.support.waiting import wait_until
from tests.webhooks.conftest import (
    GMAIL_PROXY,
    Receiver,
    Tracked,
    fetch,
    hook,
    pixels,
    send,
    verifier,
)

CLICK = re.compile(rb"https://localhost:\d+/c/[A-Za-z0-9_-]{23}")
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


async def test_each_event_arrives_signed_and_the_library_verifies_it(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    store_keys: dict[str, Any],
) -> None:
    app = await tracked_relay(
        webhooks=[hook(receiver, secret_file, ca_pem_path)], track_clicks=True, **store_keys
    )
    await send(app, 1, sessions=1)
    await upstream.wait_for_transactions(1, timeout_s=20)
    data = upstream.transactions[0].data
    await fetch(pixels(upstream), client_ssl_context, user_agent=GMAIL_PROXY)
    click = CLICK.search(data)
    assert click is not None
    await fetch([click.group().decode()], client_ssl_context, user_agent=GMAIL_PROXY, status=302)
    await wait_until(
        lambda: len(receiver.events()) == 3, timeout_s=20, message="three events not delivered"
    )
    relayed, opened, clicked = receiver.events()
    assert [e["type"] for e in (relayed, opened, clicked)] == [
        "message.relayed",
        "message.opened",
        "link.clicked",
    ]
    webhook = verifier(secret_file)
    for delivery in receiver.deliveries:
        event = webhook.verify(delivery.body, delivery.headers)
        assert event == delivery.event
        assert delivery.headers["webhook-id"] == event["id"]
        assert UUID7.match(event["id"]), event["id"]
        assert RFC3339.match(event["occurred_at"]), event["occurred_at"]
        assert delivery.headers["Content-Type"] == "application/json"
    tracking_id = relayed["tracking_id"]
    common = {
        "tracking_id": tracking_id,
        "message_id": "<news-0@example.org>",
        "sender": "news@example.org",
        "recipients": ["bob@example.net"],
    }
    for event in (relayed, opened, clicked):
        assert {k: event[k] for k in common} == common
        assert event["queue_id"] == relayed["queue_id"]
    assert relayed["tracked"] is True and relayed["not_tracked_reason"] is None
    assert relayed["upstream_reply"].startswith("250")
    assert opened["verdict"] == "mail_proxy" and opened["counted"] and opened["first"]
    assert opened["user_agent"] == GMAIL_PROXY
    assert opened["ip"] == "127.0.0.0/24"  # ip_policy = truncate
    assert clicked["link"] == {"position": 0, "url": "https://shop.example.com/sale"}
    # (a click's verdict is the classifier's business; counted and first follow it)
    assert clicked["counted"] == (clicked["verdict"] in COUNTED_VERDICTS) == clicked["first"]

    # a tampered body, or a timestamp beyond the library's tolerance (5 minutes), fails
    delivery = receiver.deliveries[0]
    tampered = delivery.body.replace(b'"tracked":true', b'"tracked":false')
    assert tampered != delivery.body
    with pytest.raises(WebhookVerificationError):
        webhook.verify(tampered, delivery.headers)
    from smtp_tracker.webhooks.signing import secret_key, signature_headers

    key = secret_key(secret_file.read_text())
    old = signature_headers(key, relayed["id"], int(time.time()) - 600, delivery.body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        webhook.verify(delivery.body, old)


@pytest.mark.upstream(data_reply="451 4.3.0 try again later")
async def test_a_deferred_message_is_a_message_deferred_event(
    tracked_relay: Tracked,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    store_keys: dict[str, Any],
) -> None:
    app = await tracked_relay(webhooks=[hook(receiver, secret_file, ca_pem_path)], **store_keys)
    with pytest.raises(Exception, match="451"):
        await send(app, 1, sessions=1)
    await wait_until(lambda: receiver.events(), timeout_s=20, message="no event delivered")
    (event,) = receiver.events()
    assert event["type"] == "message.deferred"
    assert event["reply"] == {"code": 451, "enhanced_status": "4.3.0", "text": "try again later"}
    assert event["message_id"] == "<news-0@example.org>"
    assert event["recipients"] == ["bob@example.net"]
    verifier(secret_file).verify(receiver.deliveries[0].body, receiver.deliveries[0].headers)


@pytest.mark.upstream(data_reply="554 5.7.1 rejected as spam")
async def test_a_refused_message_is_a_message_bounced_event(
    tracked_relay: Tracked,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    store_keys: dict[str, Any],
) -> None:
    app = await tracked_relay(webhooks=[hook(receiver, secret_file, ca_pem_path)], **store_keys)
    with pytest.raises(Exception, match="554"):
        await send(app, 1, sessions=1)
    await wait_until(lambda: receiver.events(), timeout_s=20, message="no event delivered")
    (event,) = receiver.events()
    assert event["type"] == "message.bounced"
    assert event["reply"]["code"] == 554 and event["reply"]["enhanced_status"] == "5.7.1"


async def test_events_filter_counted_only_and_first(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    store_keys: dict[str, Any],
) -> None:
    app = await tracked_relay(
        **store_keys,
        webhooks=[
            hook(receiver, secret_file, ca_pem_path, path="all"),
            hook(
                receiver,
                secret_file,
                ca_pem_path,
                path="counted",
                events=["message.opened"],
                counted_only=True,
            ),
        ],
    )
    await send(app, 1, sessions=1)
    await upstream.wait_for_transactions(1, timeout_s=20)
    (pixel,) = pixels(upstream)
    # no User-Agent, seconds after the relay: a scanner's prefetch (not counted)
    await fetch([pixel], client_ssl_context)
    await wait_until(lambda: len(receiver.events("/all")) == 2, timeout_s=20, message="no open")
    await fetch([pixel], client_ssl_context, user_agent=GMAIL_PROXY)
    await wait_until(lambda: len(receiver.events("/all")) == 3, timeout_s=20, message="no open")
    await fetch([pixel], client_ssl_context, user_agent=GMAIL_PROXY)
    await wait_until(lambda: len(receiver.events("/all")) == 4, timeout_s=20, message="no open")
    await wait_until(
        lambda: len(receiver.events("/counted")) == 2, timeout_s=20, message="no counted open"
    )
    everything = receiver.events("/all")
    assert [e["type"] for e in everything] == ["message.relayed"] + ["message.opened"] * 3
    opens = everything[1:]
    assert [(e["verdict"], e["counted"], e["first"]) for e in opens] == [
        ("scanner", False, False),
        ("mail_proxy", True, True),
        ("mail_proxy", True, False),
    ]
    assert receiver.events("/counted") == opens[1:]  # same ids, same bodies
    assert app.webhooks is not None
    assert set(app.webhooks.targets) == {receiver.url("all"), receiver.url("counted")}


def test_the_events_key_names_every_type() -> None:
    from smtp_tracker.config import build_config

    config = build_config(
        {"webhooks": [{"url": "https://h.example/x", "secret_file": "/s"}]}, {}, environ={}
    )
    assert config.webhooks[0].events == EVENT_TYPES
    assert json.dumps(EVENT_TYPES)
