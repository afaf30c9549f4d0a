"""``webhook_sender = false``: serve only writes the outbox; ``smtp-tracker webhooks
send``, a process of its own, delivers it, and stops on SIGTERM; on both backends
(``store_keys``: SQLite in the data directory, or PostgreSQL with ``--store``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_until
from tests.webhooks.conftest import FAST, Receiver, Tracked, hook, send, verifier


async def test_a_sender_process_of_its_own_delivers_what_serve_writes(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    tmp_path: Path,
    store_keys: dict[str, Any],
) -> None:
    table = hook(receiver, secret_file, ca_pem_path)
    app = await tracked_relay(webhooks=[table], webhook_sender=False, **store_keys)
    sender = app.webhooks
    assert sender is not None
    await send(app, 3, sessions=1)
    await upstream.wait_for_transactions(3, timeout_s=20)
    await wait_until(lambda: sender.outbox.written == 3, timeout_s=20, message="not written")
    assert receiver.attempts == 0  # serve itself sends nothing

    inline = "[{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + "}]"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in FAST.items()]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtp_tracker",
        "webhooks",
        "send",
        *(["--store", store_keys["store"]] if store_keys else []),
        "--data-dir",
        str(tmp_path / "data"),
        "--webhooks",
        inline,
        *flags,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        await wait_until(lambda: len(receiver.events()) == 3, timeout_s=30, message="not delivered")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert "sending events to" in stderr.decode()
    assert [e["type"] for e in receiver.events()] == ["message.relayed"] * 3
    for delivery in receiver.deliveries:
        verifier(secret_file).verify(delivery.body, delivery.headers)
