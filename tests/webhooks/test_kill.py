"""``serve`` killed with SIGKILL with 1,000 events in the outbox (the receiver
down), started again on the same data directory: all 1,000 are delivered."""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib

from smtp_tracker.webhooks import outbox
from tests.support.serve import launch_serve, tracking_args
from tests.support.waiting import wait_until
from tests.webhooks.conftest import GMAIL_PROXY, HTML_MESSAGE, PIXEL, Receiver, fetch

MESSAGES = 500  # each relayed and opened once: 1,000 events
PIXEL_PORT = re.compile(r"listening for HTTPS \(pixel\) on 127\.0\.0\.1:(\d+)")


def outbox_ids(data_dir: Path) -> set[str]:
    conn = outbox.connect(data_dir)
    try:
        return {str(row[0]) for row in conn.execute("SELECT id FROM webhook_events")}
    finally:
        conn.close()


async def test_sigkill_with_1000_events_in_the_outbox_loses_none(
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    await receiver.down()
    data_dir = tmp_path / "data"
    table = {"url": receiver.url(), "secret_file": str(secret_file), "ca_file": str(ca_pem_path)}
    flags = [
        *tracking_args(cert_pem_path, key_pem_path, pixel_base_url="https://localhost:1"),
        "--webhooks",
        "[{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + "}]",
        "--webhook-backoff-base-s",
        "0.05",
        "--webhook-backoff-max-s",
        "0.4",
        "--webhook-timeout-s",
        "1",
        "--max-events-per-token-per-min",
        "0",
        "--max-events-per-token-client-per-min",
        "0",
    ]
    first = await launch_serve(upstream, ca_pem_path, data_dir, *flags)
    try:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=first.port, start_tls=False, timeout=30
        ) as smtp:
            for n in range(MESSAGES):
                await smtp.sendmail(
                    "news@example.org", ["bob@example.net"], HTML_MESSAGE.format(n=n).encode()
                )
        await upstream.wait_for_transactions(MESSAGES, timeout_s=60)
        pixel_port = next(int(m.group(1)) for line in first.log if (m := PIXEL_PORT.search(line)))
        urls = []
        for transaction in upstream.transactions:
            found = PIXEL.search(transaction.data)
            assert found is not None
            urls.append(re.sub(r":1/", f":{pixel_port}/", found.group().decode(), count=1))
        await fetch(urls, client_ssl_context, user_agent=GMAIL_PROXY)
        await wait_until(
            lambda: len(outbox_ids(data_dir)) == 2 * MESSAGES,
            timeout_s=60,
            message="the 1,000 events did not reach the outbox",
        )
        assert receiver.attempts == 0 and not receiver.deliveries
    finally:
        first.process.kill()  # SIGKILL: no drain, no clean-up
        await first.finish()
    assert first.process.returncode == -9
    kept = outbox_ids(data_dir)
    assert len(kept) == 2 * MESSAGES

    await receiver.up()
    second = await launch_serve(upstream, ca_pem_path, data_dir, *flags)
    try:
        await wait_until(
            lambda: len(receiver.events()) == 2 * MESSAGES,
            timeout_s=120,
            message="not every event was delivered after the restart",
        )
        assert {e["id"] for e in receiver.events()} == kept
        await wait_until(
            lambda: not outbox_ids(data_dir), timeout_s=30, message="outbox not emptied"
        )
    finally:
        await second.finish()
