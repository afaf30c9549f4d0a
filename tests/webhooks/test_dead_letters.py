"""410 disables a hook; retries run out into dead letters; ``smtp-tracker webhooks
status``, ``list-failed`` and ``retry`` show and replay them (run beside the relay), on
both backends (``store_keys``: SQLite in the data directory, or PostgreSQL with ``--store``)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.cli import main
from tests.support.waiting import wait_until
from tests.webhooks.conftest import Receiver, Tracked, hook, send


def where(tmp_path: Path, store_keys: dict[str, Any]) -> list[str]:
    """The command line's flags naming the test's store."""
    if store_keys:
        return ["--store", store_keys["store"]]
    return ["--data-dir", str(tmp_path / "data")]


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["webhooks", *args])
    return code, capsys.readouterr().out


async def test_410_disables_the_hook_until_retry_all(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    store_keys: dict[str, Any],
) -> None:
    receiver.set_mode("410")
    app = await tracked_relay(webhooks=[hook(receiver, secret_file, ca_pem_path)], **store_keys)
    sender = app.webhooks
    assert sender is not None
    flags = where(tmp_path, store_keys)
    with caplog.at_level(logging.ERROR, logger="smtp_tracker.webhooks"):
        await send(app, 1, sessions=1)
        await wait_until(
            lambda: sender.counters.total("dead") == 1, timeout_s=20, message="not disabled"
        )
    assert receiver.attempts == 1
    assert any("answered 410 Gone" in r.getMessage() for r in caplog.records)
    code, out = await cli(capsys, "status", *flags)
    assert code == 0
    assert f"{receiver.url()}: 0 pending" in out and "1 dead, DISABLED (410 Gone" in out

    # the disabled hook is given no new events; mail still flows
    await send(app, 1, start=1, sessions=1)
    await upstream.wait_for_transactions(2, timeout_s=20)
    assert sender.outbox.written == 1 and receiver.attempts == 1

    receiver.set_mode("ok")
    code, out = await cli(capsys, "retry", "--all", *flags)
    assert (code, out) == (0, "1 deliveries pending again\n")
    await wait_until(lambda: receiver.events(), timeout_s=20, message="not sent after retry")
    assert [e["message_id"] for e in receiver.events()] == ["<news-0@example.org>"]
    await send(app, 1, start=2, sessions=1)  # enabled again: new events go out
    await wait_until(lambda: len(receiver.events()) == 2, timeout_s=20, message="not enabled")


async def test_retries_run_out_into_dead_letters_that_retry_sends_again(
    tracked_relay: Tracked,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    store_keys: dict[str, Any],
) -> None:
    receiver.set_mode("500")
    app = await tracked_relay(
        webhooks=[hook(receiver, secret_file, ca_pem_path)],
        webhook_retry_hours=0.0003,  # about a second
        **store_keys,
    )
    sender = app.webhooks
    assert sender is not None
    flags = where(tmp_path, store_keys)
    await send(app, 2, sessions=1)
    await wait_until(
        lambda: sender.counters.total("dead") == 2, timeout_s=30, message="no dead letters"
    )
    assert receiver.attempts >= 4  # each was retried before it was given up
    code, out = await cli(capsys, "list-failed", "--json", *flags)
    failed = json.loads(out)
    assert code == 0 and len(failed) == 2
    assert {f["last_error"] for f in failed} == {"HTTP 500"}
    assert {f["type"] for f in failed} == {"message.relayed"}
    assert all(f["attempts"] >= 2 and f["hook"] == receiver.url() for f in failed)
    code, out = await cli(capsys, "status", "--json", *flags)
    state = json.loads(out)
    assert (state["depth"], state["dropped"]) == (2, 0)
    assert state["hooks"][0]["pending"] == 0 and state["hooks"][0]["dead"] == 2

    receiver.set_mode("ok")
    first = failed[0]["id"]
    code, out = await cli(capsys, "retry", first, *flags)
    assert (code, out) == (0, "1 deliveries pending again\n")
    await wait_until(lambda: receiver.events(), timeout_s=20, message="not sent after retry")
    assert [e["id"] for e in receiver.events()] == [first]
    code, out = await cli(capsys, "retry", first, *flags)
    assert code == 1  # no longer a dead letter
    code, out = await cli(capsys, "retry", "--all", *flags)
    assert (code, out) == (0, "1 deliveries pending again\n")
    await wait_until(lambda: len(receiver.events()) == 2, timeout_s=20, message="not sent")
    await wait_until(lambda: sender.depth == 0, timeout_s=20, message="outbox not empty")
    code, out = await cli(capsys, "list-failed", *flags)
    assert out == "no dead letters\n"


def test_new_secret_writes_a_private_secret_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from smtp_tracker.webhooks.signing import secret_key

    path = tmp_path / "hook.secret"
    assert main(["webhooks", "new-secret", str(path)]) == 0
    secret = capsys.readouterr().out.splitlines()[-1]
    assert path.read_text() == secret + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(secret_key(secret)) == 32
    assert main(["webhooks", "new-secret", str(path)]) == 1
    assert "exists" in capsys.readouterr().err
    assert path.read_text() == secret + "\n"
