"""The webhook counters as Prometheus metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.waiting import wait_until
from tests.webhooks.conftest import Receiver, Tracked, hook, send


async def test_delivered_failed_depth_and_latency_are_metrics(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
) -> None:
    receiver.set_mode("500")
    app = await tracked_relay(
        webhooks=[hook(receiver, secret_file, ca_pem_path)],
        metrics=True,
        metrics_listen="127.0.0.1:0",
    )
    assert app.metrics is not None and app.webhooks is not None
    sender = app.webhooks
    await send(app, 2, sessions=1)
    await wait_until(lambda: receiver.attempts >= 4, timeout_s=20, message="no retries")
    receiver.set_mode("ok")
    await wait_until(lambda: len(receiver.events()) == 2, timeout_s=20, message="not delivered")
    await wait_until(lambda: sender.depth == 0, timeout_s=20, message="outbox not emptied")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(app.metrics.exposition().decode())
        for s in family.samples
        if s.name.startswith("smtp_tracker_webhook")
    }
    label = (("hook", receiver.url()),)
    assert samples[("smtp_tracker_webhook_delivered_total", label)] == 2
    assert samples[("smtp_tracker_webhook_failed_total", label)] >= 4
    assert samples[("smtp_tracker_webhook_retried_total", label)] >= 4
    assert samples[("smtp_tracker_webhook_dead_total", label)] == 0
    assert samples[("smtp_tracker_webhook_outbox_depth", ())] == 0
    assert samples[("smtp_tracker_webhook_dropped_total", (("why", "full"),))] == 0
    assert samples[("smtp_tracker_webhook_latency_seconds_count", ())] == 2
    assert samples[("smtp_tracker_webhook_latency_seconds_sum", ())] > 0
