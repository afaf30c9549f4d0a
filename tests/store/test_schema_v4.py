"""Schema v4 (issue 19): event signals, and a counted click counts as opened.

A v3 store whose rollup counted only pixel opens as ``opened`` is migrated:
a message with a counted click and no counted open is added to ``opened`` and
to ``opened_via_click`` of its day and sender domain; the signals columns
exist (NULL for old events); and from then on the write path keeps the same
meaning, including a click-opened message that later gets its pixel fetched.

The write path runs on both backends; the v3 upgrade is SQLite's alone (a SQLite v3
file; a PostgreSQL store starts at v6).
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

from smtp_tracker.store import DB_FILENAME, ClickEvent, LinkRecord, OpenEvent, SqliteDatabase
from smtp_tracker.store.migrations import migrate
from smtp_tracker.store.queries import MessageFilter
from smtp_tracker.store.reclassify import rollup_from_rows

from .store_helpers import T0, make_record, token
from .test_schema_v3 import by_agent


def link(i: int) -> LinkRecord:
    return LinkRecord(token=f"K{i:02d}" + "x" * 20, url=f"https://example.com/{i}", position=0)


def click(i: int, agent: str, minutes: int) -> ClickEvent:
    return ClickEvent(
        link_token=link(i).token,
        at=T0 + timedelta(minutes=minutes),
        ip="192.0.2.9",
        user_agent=agent,
    )


def opened_columns(conn: Any) -> list[tuple[str, int, int, int]]:
    """The rollup's opened/clicked columns by sender domain, read on *conn* (``?`` SQL)."""
    rows = conn.execute(
        "SELECT sender_domain, opened, opened_via_click, clicked FROM daily_stats ORDER BY 1"
    ).fetchall()
    return [tuple(row) for row in rows]


def test_v3_click_only_messages_become_opened_via_click(data_dir: Path) -> None:
    """SQLite only: a SQLite v3 file migrated."""
    with SqliteDatabase.open(data_dir, classifier=by_agent, migrate_schema=False) as db:
        conn = db._conn
        migrate(conn, target=3)
    # write at v3 through the same code would use v4 columns: build the v3 rows by hand
    with sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None) as conn:
        for i, (sender, counted_opens, counted_clicks) in enumerate(
            [
                ("a@example.com", 0, 1),  # clicked, no open: opened via the click
                ("b@example.com", 1, 1),  # opened and clicked
                ("c@example.com", 0, 0),  # nothing counted
                ("d@other.org", 0, 2),  # clicked twice
            ]
        ):
            conn.execute(
                "INSERT INTO messages (tracking_id, queue_id, sender, recipients, size_bytes,"
                " received_at_us, relayed_at_us, upstream_reply, tracked, sender_domain,"
                " open_count, counted_open_count, click_count, counted_click_count)"
                " VALUES (?, ?, ?, '[]', 1, 0, ?, '250', 1, ?, ?, ?, ?, ?)",
                (
                    token(i),
                    f"Q{i}",
                    sender,
                    1714564800000000,  # 2024-05-01T12:00:00Z
                    sender.rpartition("@")[2],
                    counted_opens,
                    counted_opens,
                    counted_clicks,
                    counted_clicks,
                ),
            )
        conn.execute(
            "INSERT INTO daily_stats (day, sender_domain, relayed, tracked, opened, clicked)"
            " VALUES ('2024-05-01', 'example.com', 3, 3, 1, 2),"
            " ('2024-05-01', 'other.org', 1, 1, 0, 1)"
        )
        migrate(conn)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(opens)")}
        assert "signals" in columns
        assert "signals" in {row[1] for row in conn.execute("PRAGMA table_info(clicks)")}
    with sqlite3.connect(data_dir / DB_FILENAME) as conn:
        migrated = opened_columns(conn)
    assert migrated == [
        ("example.com", 2, 1, 2),
        ("other.org", 1, 1, 1),
    ]


def test_the_write_path_keeps_opened_via_click(open_same_database: Any) -> None:
    with open_same_database(ip_policy="full", classifier=by_agent) as db:
        for i in range(3):
            db.record_message(make_record(i, relayed_at=T0, links=(link(i),)))
        # 0: clicked by a person, then its pixel fetched; 1: clicked only; 2: scanner click
        db.record_clicks([click(0, "Human/1.0", 1), click(1, "Human/1.0", 2)])
        db.record_clicks([click(1, "Human/1.0", 3), click(2, "Scanner", 3)])
        assert opened_columns(db.connection) == [("example.com", 2, 2, 2)]
        db.record_opens(
            [
                OpenEvent(
                    tracking_id=token(0),
                    at=T0 + timedelta(minutes=9),
                    ip="192.0.2.9",
                    user_agent="Human/1.0",
                )
            ]
        )
        assert opened_columns(db.connection) == [("example.com", 2, 1, 2)]
        summaries = {m.tracking_id: m for m in db.query_messages(MessageFilter()).items}
        assert [summaries[token(i)].opened_via for i in range(3)] == ["pixel", "click", None]
        counted = rollup_from_rows(db.connection, "2024-05-01")["example.com"]
        assert (counted["opened"], counted["opened_via_click"], counted["clicked"]) == (2, 1, 2)
