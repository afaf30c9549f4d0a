"""The DKIM outcome of each message (issue 13 item 4): in the log line, the store,
``show``/``messages --json``, the API's message object and ``stats``."""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from smtp_tracker.store import SqliteDatabase
from smtp_tracker.store.migrations import migrate
from smtp_tracker.store.queries import DKIM_OUTCOMES
from tests.dkim.test_resign import MESSAGE, sign
from tests.store.store_helpers import make_record
from tests.support.process import run_cli
from tests.support.relay import RelayFactory, tracking_over_tls

DAY = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


async def test_relay_logs_records_and_reports_the_outcome(
    relay_factory: RelayFactory,
    upstream: Any,
    key_table: Path,
    rsa_key: rsa.RSAPrivateKey,
    cert_pem_path: Path,
    key_pem_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="smtp_tracker.relay")
    relay = await relay_factory(
        **tracking_over_tls(cert_pem_path, key_pem_path),
        pixel_base_url="https://localhost:1",
        dkim_policy="resign",
        dkim_key_table=str(key_table),
    )
    ours = sign(MESSAGE, rsa_key)
    foreign = sign(MESSAGE.replace(b"<m1@", b"<m2@"), rsa_key, domain=b"example.net")
    unsigned = MESSAGE.replace(b"<m1@", b"<m3@")
    host, port = relay.smtp_address
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
        for message in (ours, foreign, unsigned):
            await smtp.sendmail("a@example.com", ["b@example.org"], message)
    await upstream.wait_for_transactions(3, timeout_s=20)

    lines = [r.getMessage() for r in caplog.records if "status=sent" in r.getMessage()]
    assert len(lines) == 3
    assert "tracked=yes, dkim=resigned," in lines[0]
    assert "tracked=no (dkim-foreign), dkim=dkim-foreign," in lines[1]
    assert "dkim=" not in lines[2] and "tracked=yes," in lines[2]

    data_dir = str(tmp_path / "data")
    shown = {}
    for message_id in ("m1@example.com", "m2@example.com", "m3@example.com"):
        done = run_cli("show", "--json", "--data-dir", data_dir, message_id)
        assert done.returncode == 0, done.stderr
        shown[message_id] = json.loads(done.stdout)["dkim"]
    assert shown == {
        "m1@example.com": "resigned",
        "m2@example.com": "dkim-foreign",
        "m3@example.com": None,
    }
    listed = run_cli("messages", "--json", "--data-dir", data_dir)
    assert listed.returncode == 0, listed.stderr
    assert sorted(str(m["dkim"]) for m in json.loads(listed.stdout)) == [
        "None",
        "dkim-foreign",
        "resigned",
    ]

    stats = run_cli("stats", "--json", "--data-dir", data_dir)
    assert stats.returncode == 0, stats.stderr
    total = json.loads(stats.stdout)["total"]
    assert total["relayed"] == 3
    assert total["dkim"] == {**dict.fromkeys(DKIM_OUTCOMES, 0), "resigned": 1, "dkim-foreign": 1}
    table = run_cli("stats", "--data-dir", data_dir)
    assert table.stdout.splitlines()[-1] == "DKIM-signed: 2: resigned 1, dkim-foreign 1"


def test_the_counts_outlive_a_prune_as_the_daily_counts_do(tmp_path: Path) -> None:
    with SqliteDatabase.open(tmp_path) as database:
        for i, dkim in enumerate(["resigned", "resigned", "dkim-foreign"]):
            database.record_message(make_record(i, relayed_at=DAY, dkim=dkim))
        removed = database.prune(DAY + timedelta(days=1))
        (row,) = database.query_stats()
    assert removed.messages == 3
    assert (row.relayed, row.dkim["resigned"], row.dkim["dkim-foreign"]) == (3, 2, 1)


def test_migration_takes_the_outcome_of_older_rows_from_their_reason(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        migrate(conn, target=6)
        for n, reason in enumerate(["dkim-foreign", "not-html", None, "arc-sealed"]):
            conn.execute(
                "INSERT INTO messages (tracking_id, queue_id, sender, recipients, size_bytes,"
                " received_at_us, relayed_at_us, upstream_reply, tracked, not_tracked_reason)"
                " VALUES (?, 'Q', '', '[]', 1, 0, 0, '250', ?, ?)",
                (f"t{n}", int(reason is None), reason),
            )
        migrate(conn)
        rows = conn.execute("SELECT tracking_id, dkim FROM messages ORDER BY id").fetchall()
        rollup = conn.execute(
            "SELECT day, sender_domain, dkim_foreign, dkim_arc_sealed, dkim_resigned"
            " FROM dkim_stats"
        ).fetchall()
    finally:
        conn.close()
    assert rows == [("t0", "dkim-foreign"), ("t1", None), ("t2", None), ("t3", "arc-sealed")]
    assert rollup == [("1970-01-01", "", 1, 1, 0)]
