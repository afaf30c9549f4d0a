"""The record of a relayed message is written after its reply (issue 15, latency).

The upstream's 250 goes back to the client at once; the record follows, and the
session's next command (QUIT, MAIL, NOOP...) is answered only once it is written,
so a client that saw its QUIT answered finds the message in the store.  A client
that leaves meanwhile does not cancel the record, and the stop waits for it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from smtp_tracker.store import SqliteDatabase
from tests.support.relay import tracking_over_tls
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

PIXEL = re.compile(rb"/o/([A-Za-z0-9_-]{23})\.gif")
MESSAGE = (
    b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: held record\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><body><p>Hello Bob</p></body></html>\r\n"
)
#: how long a reply that must not come yet is watched for (an observation, not a wait)
WATCH_S = 0.5


@dataclass
class HeldRecords:
    """The relay's records, each held until ``release`` is set."""

    app: Application
    started: asyncio.Event
    release: asyncio.Event


@pytest.fixture
async def held(
    relay_factory: Any,
    cert_pem_path: Path,
    key_pem_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[HeldRecords]:
    app = await relay_factory(**tracking_over_tls(cert_pem_path, key_pem_path))
    assert app.tracker is not None
    record = app.tracker.record
    holding = HeldRecords(app, asyncio.Event(), asyncio.Event())

    async def held_record(*args: Any) -> None:
        holding.started.set()
        await holding.release.wait()
        await record(*args)

    monkeypatch.setattr(app.tracker, "record", held_record)
    yield holding
    holding.release.set()


async def connected(app: Application) -> aiosmtplib.SMTP:
    host, port = app.smtp_address
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30)
    await client.connect()
    return client


async def tracking_id(upstream: UpstreamServer) -> str:
    (delivered,) = await upstream.wait_for_transactions(1)
    found = PIXEL.search(delivered.data)
    assert found is not None, delivered.data
    return found.group(1).decode()


async def relayed(held: HeldRecords, upstream: UpstreamServer) -> tuple[aiosmtplib.SMTP, str]:
    """One message relayed on a kept session, its record held: the client, the tracking id."""
    client = await connected(held.app)
    errors, reply = await client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
    assert errors == {} and reply.startswith("2.0.0 Ok: queued as ")  # the upstream's 250
    assert held.started.is_set() and not held.release.is_set()
    token = await tracking_id(upstream)
    assert held.app.store is not None
    assert await held.app.store.find_message(token) is None  # not written yet
    return client, token


async def test_the_reply_comes_before_the_record_and_the_next_command_after_it(
    held: HeldRecords, upstream: UpstreamServer
) -> None:
    client, token = await relayed(held, upstream)
    noop = asyncio.ensure_future(client.noop())
    done, _ = await asyncio.wait({noop}, timeout=WATCH_S)
    assert not done, "the next command was answered before the record was written"
    held.release.set()
    response = await asyncio.wait_for(noop, 10)
    assert response.code == 250
    assert held.app.store is not None
    assert await held.app.store.find_message(token) is not None  # written before the 250
    await client.quit()


async def test_a_client_that_leaves_does_not_cancel_the_record(
    held: HeldRecords, upstream: UpstreamServer
) -> None:
    client, token = await relayed(held, upstream)
    # The next command, then the connection drops while that command waits for
    # the record: the session's task is cancelled, the record must go on.
    assert client.transport is not None
    client.transport.write(b"NOOP\r\n")
    client.close()
    held.release.set()
    store = held.app.store
    assert store is not None
    await wait_until(lambda: store.find_message(token), timeout_s=10, message="the record was lost")


async def test_the_stop_waits_for_a_record_in_flight(
    held: HeldRecords, upstream: UpstreamServer, tmp_path: Path
) -> None:
    app = held.app
    client, token = await relayed(held, upstream)
    client.close()
    stopping = asyncio.ensure_future(app.stop(grace_s=5.0))
    done, _ = await asyncio.wait({stopping}, timeout=WATCH_S)
    assert not done, "the stop did not wait for the record in flight"
    held.release.set()
    await asyncio.wait_for(stopping, 15)
    database = SqliteDatabase.open(tmp_path / "data", create=False)
    try:
        assert database.find_message(token) is not None
    finally:
        database.close()
