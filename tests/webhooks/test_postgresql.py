"""The webhook outbox on a PostgreSQL store shared by several relays and pixel endpoints.

* Two relays (each with its pixel endpoint and its webhook sender) on one
  PostgreSQL database, the receiver refusing one attempt in five: every event
  is delivered (2xx) exactly once, both senders deliver, and each message's
  events arrive in the order they were written.
* An outbox event commits with the record it describes: a record whose
  transaction fails leaves no event behind (both backends for opens;
  PostgreSQL alone for a message record, failed at commit by a deferred trigger).
* ``smtp-tracker serve --store postgresql://...`` as a process: the receiver
  gets ``message.relayed`` and ``message.opened``, signed.
* ``migrate-store`` carries the outbox over; ``webhooks ... --store`` reads it.
* Messages and opens written at once with the outbox on never deadlock; two
  hosts writing at once never overfill the bounded outbox.
* The server stopped and started again: the sender reconnects by itself.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import OpenEvent
from smtp_tracker.webhooks import outbox
from tests.store.store_helpers import make_record, token
from tests.support.process import run_cli
from tests.support.serve import launch_serve, tracking_args
from tests.support.waiting import wait_until
from tests.webhooks.conftest import (
    GMAIL_PROXY,
    HTML_MESSAGE,
    PIXEL,
    Receiver,
    Tracked,
    fetch,
    hook,
    outbox_connection,
    pixels,
    send,
    verifier,
)

psycopg = pytest.importorskip("psycopg")

MESSAGES_PER_RELAY = 30
ROUNDS = 3  # opens per message, one round at a time
PIXEL_PORT = re.compile(r"listening for HTTPS \(pixel\) on 127\.0\.0\.1:(\d+)")


def count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0])


async def test_two_senders_on_one_store_deliver_each_event_once_in_order(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
    pg_dsn: str,
) -> None:
    receiver.fail_every = 5  # retried with backoff: a message's later events must wait
    table = hook(receiver, secret_file, ca_pem_path)
    apps = [
        await tracked_relay(webhooks=[table], store=pg_dsn, data_dir=str(tmp_path / f"host{k}"))
        for k in range(2)
    ]
    for k, app in enumerate(apps):
        await send(app, MESSAGES_PER_RELAY, start=k * MESSAGES_PER_RELAY, sessions=2)
    messages = 2 * MESSAGES_PER_RELAY
    await upstream.wait_for_transactions(messages, timeout_s=60)
    urls = pixels(upstream)
    ports = [app.pixel_port for app in apps]
    for round_ in range(ROUNDS):  # each round through the other host's pixel endpoint
        port = ports[round_ % 2]
        await fetch(
            [re.sub(r":\d+/", f":{port}/", url, count=1) for url in urls],
            client_ssl_context,
            user_agent=GMAIL_PROXY,
        )
        recorded = messages * (round_ + 1)
        await wait_until(
            lambda recorded=recorded: count(pg_dsn, "SELECT count(*) FROM opens") == recorded,
            timeout_s=30,
            message=f"the opens of round {round_} were not recorded",
        )

    total = messages * (1 + ROUNDS)
    await wait_until(
        lambda: len(receiver.events()) == total, timeout_s=120, message="not all delivered"
    )
    await wait_until(
        lambda: count(pg_dsn, "SELECT count(*) FROM webhook_events") == 0,
        timeout_s=30,
        message="the outbox was not emptied",
    )
    delivered = Counter(d.event["id"] for d in receiver.deliveries)
    assert len(delivered) == total and set(delivered.values()) == {1}  # each once
    senders = [app.webhooks for app in apps]
    assert all(s is not None for s in senders)

    def by_sender() -> list[int]:
        return [s.counters.total("delivered") for s in senders if s is not None]

    # a sender counts a batch just after its settle commits: wait for the last count
    await wait_until(lambda: sum(by_sender()) >= total, timeout_s=30, message="not counted")
    assert sum(by_sender()) == total and min(by_sender()) > 0  # both delivered, none twice
    assert receiver.attempts > total  # some were refused and retried

    per_message: dict[str, list[dict[str, Any]]] = {}
    for event in receiver.events():
        per_message.setdefault(event["tracking_id"], []).append(event)
    assert len(per_message) == messages
    for events in per_message.values():
        assert [e["type"] for e in events] == ["message.relayed"] + ["message.opened"] * ROUNDS
        opened = [e["occurred_at"] for e in events[1:]]
        assert opened == sorted(opened) and len(set(opened)) == ROUNDS
        assert [e["first"] for e in events[1:]] == [True] + [False] * (ROUNDS - 1)
    with outbox_connection({"store": pg_dsn}, tmp_path) as conn:
        state = outbox.status(conn)
    assert (state.depth, state.dropped) == (0, 0)


async def test_an_outbox_event_commits_with_its_record(
    tmp_path: Path, store_keys: dict[str, Any]
) -> None:
    """A record whose transaction fails after the outbox wrote its event leaves no event."""
    from smtp_tracker.store.backends import open_store

    data_dir = tmp_path / "data"
    writer = outbox.Outbox([("hook", lambda _type, _counted: True)], max_events=100)
    store: Any = await open_store(store=store_keys.get("store"), data_dir=data_dir)
    at = datetime.now(UTC) - timedelta(minutes=5)
    try:
        store.set_outbox(writer)
        await store.record_message(make_record(0, relayed_at=at))
        with outbox_connection(store_keys, data_dir) as conn:
            # fails the transaction after the events were written: PostgreSQL at
            # commit (the outbox is the last write there), SQLite at the counters
            if store_keys:
                conn.execute(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                    " $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
                )
                conn.execute(
                    "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON opens"
                    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            else:
                conn.execute(
                    "CREATE TRIGGER refuse BEFORE UPDATE ON messages BEGIN"
                    " SELECT RAISE(ABORT, 'refused by the test'); END"
                )
        hits = [OpenEvent(tracking_id=token(0), at=at, ip="192.0.2.1", user_agent="UA")] * 2
        with pytest.raises(StoreError, match="refused by the test"):
            await store.record_opens(hits)
        assert writer.written == 3  # written in the transaction, then rolled back with it
        with outbox_connection(store_keys, data_dir) as conn:
            events = [str(r[0]) for r in conn.execute("SELECT type FROM webhook_events")]
            assert events == ["message.relayed"]
            assert outbox.outbox_depth(conn) == 1
            assert tuple(conn.execute("SELECT count(*) FROM opens").fetchone() or ()) == (0,)
            conn.execute("DROP TRIGGER refuse" + (" ON opens" if store_keys else ""))
        assert await store.record_opens(hits) == 2
        with outbox_connection(store_keys, data_dir) as conn:
            events = [str(r[0]) for r in conn.execute("SELECT type FROM webhook_events")]
            assert sorted(events) == ["message.opened"] * 2 + ["message.relayed"]
            assert outbox.outbox_depth(conn) == 3
    finally:
        await store.aclose()


async def test_a_message_record_failing_at_commit_leaves_no_event(
    tmp_path: Path, pg_dsn: str
) -> None:
    """PostgreSQL: a deferred constraint trigger fails the record's transaction at
    commit, after the outbox's savepoint was released: neither record nor event stays."""
    from smtp_tracker.store.postgresql import PostgresStore

    writer = outbox.Outbox([("hook", lambda _type, _counted: True)], max_events=100)
    async with await PostgresStore.open(pg_dsn) as store:
        store.set_outbox(writer)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'refused at commit by the test'; END $$"
            )
            conn.execute(
                "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON messages"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        with pytest.raises(StoreError, match="refused at commit"):
            await store.record_message(make_record(0))
        assert writer.written == 1 and writer.failed == 0  # the outbox's part went well
        assert count(pg_dsn, "SELECT count(*) FROM messages") == 0
        assert count(pg_dsn, "SELECT count(*) FROM webhook_events") == 0
        assert count(pg_dsn, "SELECT depth FROM webhook_outbox_state") == 0
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER refuse ON messages")
        await store.record_message(make_record(0))
        assert count(pg_dsn, "SELECT count(*) FROM webhook_events") == 1
        assert count(pg_dsn, "SELECT depth FROM webhook_outbox_state") == 1


async def test_serve_with_a_postgresql_store_sends_relayed_and_opened(
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
    pg_dsn: str,
) -> None:
    table = {"url": receiver.url(), "secret_file": str(secret_file), "ca_file": str(ca_pem_path)}
    flags = [
        *tracking_args(cert_pem_path, key_pem_path, pixel_base_url="https://localhost:1"),
        "--store",
        pg_dsn,
        "--webhooks",
        "[{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + "}]",
        "--webhook-backoff-base-s",
        "0.05",
        "--webhook-backoff-max-s",
        "0.4",
        "--webhook-timeout-s",
        "1",
    ]
    serve = await launch_serve(upstream, ca_pem_path, tmp_path / "data", *flags)
    try:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=serve.port, start_tls=False, timeout=30
        ) as smtp:
            await smtp.sendmail(
                "news@example.org", ["bob@example.net"], HTML_MESSAGE.format(n=1).encode()
            )
        await upstream.wait_for_transactions(1, timeout_s=30)
        pixel_port = next(int(m.group(1)) for line in serve.log if (m := PIXEL_PORT.search(line)))
        found = PIXEL.search(upstream.transactions[0].data)
        assert found is not None
        url = re.sub(r":1/", f":{pixel_port}/", found.group().decode(), count=1)
        await wait_until(lambda: len(receiver.events()) == 1, timeout_s=30, message="no relayed")
        await fetch([url], client_ssl_context, user_agent=GMAIL_PROXY)
        await wait_until(lambda: len(receiver.events()) == 2, timeout_s=30, message="no opened")
    finally:
        serve.process.terminate()
        await asyncio.wait_for(serve.process.wait(), timeout=60)
        await serve.finish()
    assert serve.process.returncode == 0, "".join(serve.log)
    relayed, opened = receiver.events()
    assert (relayed["type"], opened["type"]) == ("message.relayed", "message.opened")
    assert relayed["message_id"] == opened["message_id"] == "<news-1@example.org>"
    assert relayed["tracking_id"] == opened["tracking_id"] == token_of(url)
    assert opened["counted"] is True and opened["first"] is True
    for delivery in receiver.deliveries:
        verifier(secret_file).verify(delivery.body, delivery.headers)
    assert count(pg_dsn, "SELECT count(*) FROM messages") == 1
    assert count(pg_dsn, "SELECT count(*) FROM webhook_events") == 0


def token_of(url: str) -> str:
    """The tracking id in a pixel URL."""
    return url.rsplit("/", 1)[1].removesuffix(".gif")


def test_migrate_store_carries_the_outbox_and_the_cli_reads_it_with_store(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Pending deliveries, dead letters and the dropped count go over with
    ``migrate-store``; ``webhooks status|list-failed|retry --store`` then read PostgreSQL."""
    from smtp_tracker.store import SqliteDatabase

    data_dir = tmp_path / "data"
    writer = outbox.Outbox([("https://hooks.example/in", lambda _t, _c: True)], max_events=100)
    with SqliteDatabase.open(data_dir) as database:
        database.outbox = writer
        for i in range(3):
            database.record_message(make_record(i))
    with outbox_connection({}, data_dir) as conn:
        first = outbox.claim(conn, "https://hooks.example/in", now_us=2**62, limit=1, lease_us=1)
        outbox.settle(
            conn, [outbox.Settled(c.hook, c.seq, "dead", 9, 0, "HTTP 500") for c in first]
        )
        conn.execute("UPDATE webhook_outbox_state SET dropped = 4")
        before = outbox.status(conn)
    assert (before.depth, before.dropped, before.hooks[0].dead) == (3, 4, 1)

    copied = run_cli("migrate-store", "--from", str(data_dir), "--to", pg_dsn)
    assert copied.returncode == 0, copied.stderr
    with outbox_connection({"store": pg_dsn}, data_dir) as conn:
        assert outbox.status(conn) == before
        kinds = conn.execute(  # times as timestamptz, the same instants as SQLite's
            "SELECT pg_typeof(e.created_at)::text, pg_typeof(d.due_at)::text, d.state"
            " FROM webhook_deliveries d JOIN webhook_events e USING (seq) ORDER BY seq"
        ).fetchall()
    assert kinds == [
        ("timestamp with time zone",) * 2 + (state,) for state in ("dead", *["pending"] * 2)
    ]
    status = run_cli("webhooks", "status", "--json", "--store", pg_dsn)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert (document["depth"], document["dropped"]) == (3, 4)
    assert (document["hooks"][0]["pending"], document["hooks"][0]["dead"]) == (2, 1)
    failed = run_cli("webhooks", "list-failed", "--json", "--store", pg_dsn)
    assert [row["id"] for row in json.loads(failed.stdout)] == [first[0].event_id]
    again = run_cli("webhooks", "retry", first[0].event_id, "--store", pg_dsn)
    assert (again.returncode, again.stdout) == (0, "1 deliveries pending again\n")
    assert count(pg_dsn, "SELECT count(*) FROM webhook_deliveries WHERE state = 'dead'") == 0


async def test_messages_and_opens_written_at_once_with_the_outbox_all_commit(pg_dsn: str) -> None:
    """Relays recording messages and pixel endpoints recording opens of the same day
    and sender domain at once, the outbox on: every record, open and event commits
    (the outbox's lock is the last each transaction takes, so none waits in a circle
    on a rollup row and the outbox's state row)."""
    from smtp_tracker.store.postgresql import PostgresStore

    writer = outbox.Outbox([("hook", lambda _type, _counted: True)], max_events=10_000)
    at = datetime.now(UTC)
    async with await PostgresStore.open(pg_dsn, pool_size=8) as store:
        store.set_outbox(writer)
        for i in range(40):
            await store.record_message(make_record(i, relayed_at=at))

        def opens(i: int) -> list[OpenEvent]:
            return [OpenEvent(tracking_id=token(i), at=at, ip="192.0.2.1", user_agent="UA")]

        results = await asyncio.gather(
            *(store.record_message(make_record(40 + i, relayed_at=at)) for i in range(40)),
            *(store.record_opens(opens(i % 40)) for i in range(120)),
            return_exceptions=True,
        )
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert writer.failed == 0
    assert count(pg_dsn, "SELECT count(*) FROM messages") == 80
    assert count(pg_dsn, "SELECT count(*) FROM opens") == 120
    assert count(pg_dsn, "SELECT count(*) FROM webhook_events") == 80 + 120
    assert count(pg_dsn, "SELECT depth FROM webhook_outbox_state") == 200


async def test_the_sender_delivers_again_after_the_server_was_away(
    tracked_relay: Tracked,
    upstream: Any,
    receiver: Receiver,
    secret_file: Path,
    ca_pem_path: Path,
    own_pg_cluster: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL stopped and started again under a running serve: the sender's own
    connection is made again by itself (the outage logged once), and the events of
    the mail recorded after it are delivered without a restart."""
    import logging

    dsn = own_pg_cluster.new_database()
    app = await tracked_relay(
        webhooks=[hook(receiver, secret_file, ca_pem_path)], store=dsn, store_timeout_s=1.0
    )
    sender = app.webhooks
    assert sender is not None
    await send(app, 2, sessions=1)
    await wait_until(lambda: len(receiver.events()) == 2, timeout_s=30, message="not sent")

    with caplog.at_level(logging.WARNING, logger="smtp_tracker.webhooks"):
        await asyncio.to_thread(own_pg_cluster.stop)
        await wait_until(
            lambda: any("outbox cannot be read" in r.getMessage() for r in caplog.records),
            timeout_s=30,
            message="the outage was not noticed",
        )
        await send(app, 1, start=2, sessions=1)  # relayed, not recorded: no event
        await upstream.wait_for_transactions(3, timeout_s=30)
        await asyncio.to_thread(own_pg_cluster.start)
        await wait_until(
            lambda: any("outbox answers again" in r.getMessage() for r in caplog.records),
            timeout_s=30,
            message="the sender did not come back",
        )
    unreachable = [r for r in caplog.records if "outbox cannot be read" in r.getMessage()]
    assert len(unreachable) == 1  # once per outage
    store = app.store
    assert store is not None

    async def recording() -> bool:
        return await store.check_health() is None

    await wait_until(recording, timeout_s=30, message="the store did not come back")
    await send(app, 2, start=3, sessions=1)
    await wait_until(lambda: len(receiver.events()) == 4, timeout_s=30, message="not resumed")
    assert [e["message_id"] for e in receiver.events()][2:] == [
        "<news-3@example.org>",
        "<news-4@example.org>",
    ]
    assert len(receiver.deliveries) == 4


async def test_two_hosts_writing_at_once_never_overfill_the_outbox(pg_dsn: str) -> None:
    """``webhook_outbox_max_events`` holds for the database as a whole: two stores (two
    hosts' pools) recording 40 messages each at once into an outbox bounded at 50 keep
    exactly 50 events and count 30 dropped."""
    from smtp_tracker.store.postgresql import PostgresStore

    writers = [
        outbox.Outbox([("hook", lambda _type, _counted: True)], max_events=50) for _ in range(2)
    ]
    stores = [await PostgresStore.open(pg_dsn, pool_size=4) for _ in range(2)]
    try:
        for store, writer in zip(stores, writers, strict=True):
            store.set_outbox(writer)
        await asyncio.gather(
            *(
                stores[k].record_message(make_record(k * 40 + i))
                for k in range(2)
                for i in range(40)
            )
        )
    finally:
        for store in stores:
            await store.aclose()
    assert count(pg_dsn, "SELECT count(*) FROM messages") == 80  # every record kept
    assert count(pg_dsn, "SELECT count(*) FROM webhook_events") == 50
    assert count(pg_dsn, "SELECT depth FROM webhook_outbox_state") == 50
    assert count(pg_dsn, "SELECT dropped FROM webhook_outbox_state") == 30
    assert sum(w.written for w in writers) == 50 and sum(w.dropped for w in writers) == 30


def test_the_webhooks_commands_on_a_database_without_a_store_say_so(pg_dsn: str) -> None:
    """As on a data directory without a store: one line, exit 1, nothing created."""
    for command in (["status"], ["list-failed"], ["retry", "--all"]):
        result = run_cli("webhooks", *command, "--store", pg_dsn)
        assert result.returncode == 1, (command, result.stderr)
        assert "no tracking store" in result.stderr
    assert count(pg_dsn, "SELECT count(*) FROM pg_tables WHERE tablename = 'messages'") == 0
