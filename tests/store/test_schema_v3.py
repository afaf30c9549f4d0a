"""Schema v3: classified events, per-message counters, recipients, links, clicks, rollup.

The write path runs on both backends (the tables read through the database's own
connection); :func:`test_v2_data_is_carried_into_v3` is SQLite's alone: it migrates a
SQLite v2 file (a PostgreSQL store starts at v6).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.store import (
    DB_FILENAME,
    ClickEvent,
    EventContext,
    LinkRecord,
    OpenEvent,
    SqliteDatabase,
    Verdict,
)
from smtp_tracker.store.migrations import migrate
from smtp_tracker.store.rows import day_of, sender_domain_of, to_us

from .store_helpers import T0, make_record, token
from .test_migrations import build_v1

#: User-Agent → verdict, for a classifier the tests control.
VERDICT_BY_AGENT: dict[str, Verdict] = {
    "Human/1.0": "human",
    "GoogleImageProxy": "mail_proxy",
    "MPP": "privacy_proxy",
    "Scanner": "scanner",
}


def by_agent(event: EventContext) -> tuple[Verdict, str]:
    verdict = VERDICT_BY_AGENT.get(event.user_agent or "", "unknown")
    return verdict, f"test:{event.kind}:{event.client_address}"


@pytest.fixture
def database(open_same_database: Any) -> Iterator[SqliteDatabase]:
    """A blocking store of the test's backend, keeping whole addresses, judging by agent."""
    with open_same_database(ip_policy="full", classifier=by_agent) as db:
        yield db


def hit(i: int, agent: str, *, minutes: int = 5, address: str = "198.51.100.7") -> OpenEvent:
    return OpenEvent(
        tracking_id=token(i),
        at=T0 + timedelta(minutes=i + minutes),
        ip=address,
        user_agent=agent,
    )


def rollup(database: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """``daily_stats`` by (day, sender domain), read through *database*'s connection."""
    cursor = database.connection.execute("SELECT * FROM daily_stats")
    names = [column[0] for column in cursor.description]
    result = {}
    for row in cursor.fetchall():
        values = dict(zip(names, row, strict=True))
        key = (str(values.pop("day")), str(values.pop("sender_domain")))
        result[key] = values
    return result


def test_sender_domain_and_day() -> None:
    """Pure functions, the same for both backends."""
    assert sender_domain_of("Alice@Mail.Example.COM") == "mail.example.com"
    assert sender_domain_of('"a@b"@example.org') == "example.org"
    assert sender_domain_of("") == ""
    assert day_of(to_us(T0)) == "2024-05-01"


def test_opens_are_classified_counted_and_rolled_up(open_same_database: Any) -> None:
    seen: list[EventContext] = []

    def spy(event: EventContext) -> tuple[Verdict, str]:
        seen.append(event)
        return by_agent(event)

    with open_same_database(ip_policy="full", classifier=spy) as database:
        opens_are_classified_counted_and_rolled_up(database, seen)


def opens_are_classified_counted_and_rolled_up(database: Any, seen: list[EventContext]) -> None:
    database.record_message(make_record(0, sender="news@Example.COM"))
    database.record_message(make_record(1, sender="news@example.com", tracked=False))
    database.record_message(make_record(2, sender="x@other.org"))
    recorded = database.record_opens(
        [
            hit(0, "MPP", minutes=1),
            hit(0, "Human/1.0", minutes=9),
            hit(0, "Human/1.0", minutes=3),
            hit(2, "Scanner"),
            hit(2, "GoogleImageProxy"),
            hit(99, "Human/1.0"),  # unknown token: ignored
        ]
    )
    assert recorded == 5
    # the classifier saw the raw address and the message's relay time
    assert seen[0].client_address == "198.51.100.7"
    assert seen[0].relayed_at == T0
    assert seen[0].kind == "open"
    first = database.find_message(token(0))
    assert first is not None
    assert [(o.verdict, o.verdict_reason) for o in first.opens] == [
        ("privacy_proxy", "test:open:198.51.100.7"),
        ("human", "test:open:198.51.100.7"),
        ("human", "test:open:198.51.100.7"),
    ]
    counters = database.connection.execute(
        "SELECT tracking_id, sender_domain, open_count, counted_open_count, first_open_at_us"
        " FROM messages ORDER BY id"
    ).fetchall()
    assert [tuple(row) for row in counters] == [
        (token(0), "example.com", 3, 2, to_us(T0 + timedelta(minutes=3))),
        (token(1), "example.com", 0, 0, None),
        (token(2), "other.org", 2, 1, to_us(T0 + timedelta(minutes=7))),
    ]
    stats = rollup(database)
    assert stats[("2024-05-01", "example.com")] == {
        "relayed": 2,
        "tracked": 1,
        "opened": 1,
        "opened_any": 1,
        "opens": 3,
        "opens_human": 2,
        "opens_privacy_proxy": 1,
        "opens_mail_proxy": 0,
        "opens_scanner": 0,
        "opens_unknown": 0,
        "clicks": 0,
        "clicked": 0,
        "opened_via_click": 0,
        "relayed_aggregate": 0,  # schema v6: per-person mode
    }
    other = stats[("2024-05-01", "other.org")]
    assert (other["opened"], other["opened_any"], other["opens_scanner"]) == (1, 1, 1)
    # a later batch does not count the message as newly opened again
    database.record_opens([hit(0, "Human/1.0", minutes=20), hit(1, "Scanner")])
    stats = rollup(database)
    assert stats[("2024-05-01", "example.com")]["opened"] == 1
    assert stats[("2024-05-01", "example.com")]["opened_any"] == 2
    assert stats[("2024-05-01", "example.com")]["opens"] == 5


def test_links_and_clicks(database: SqliteDatabase) -> None:
    links = (
        LinkRecord(token="L" * 23, url="https://example.com/a?x=1&y=2", position=0),
        LinkRecord(token="M" * 23, url="https://example.com/b", position=1),
    )
    database.record_message(make_record(0, links=links))
    assert database.find_link("M" * 23) == (links[1], token(0))
    assert database.find_link("N" * 23) is None
    at = T0 + timedelta(minutes=2)
    recorded = database.record_clicks(
        [
            ClickEvent(link_token="L" * 23, at=at, ip="192.0.2.1", user_agent="Scanner"),
            ClickEvent(link_token="L" * 23, at=at, ip="192.0.2.1", user_agent="Human/1.0"),
            ClickEvent(link_token="Z" * 23, at=at, ip="192.0.2.1", user_agent="Human/1.0"),
        ]
    )
    assert recorded == 2
    found = database.find_message(token(0))
    assert found is not None
    assert found.record.links == links
    assert [(c.url, c.verdict, c.ip) for c in found.clicks] == [
        ("https://example.com/a?x=1&y=2", "scanner", "192.0.2.1"),
        ("https://example.com/a?x=1&y=2", "human", "192.0.2.1"),
    ]
    stats = rollup(database)[("2024-05-01", "example.com")]
    assert (stats["clicks"], stats["clicked"], stats["opens"]) == (2, 1, 0)


def test_recipients_are_indexed_lower_cased_once(database: SqliteDatabase) -> None:
    database.record_message(
        make_record(0, recipients=["Bob@Example.NET", "Bob@Example.NET", "c@x"])
    )
    rows = database.connection.execute(
        "SELECT message_rowid, address FROM message_recipients ORDER BY address"
    ).fetchall()
    (rowid,) = database.connection.execute("SELECT id FROM messages").fetchone()
    assert [tuple(row) for row in rows] == [(rowid, "bob@example.net"), (rowid, "c@x")]


def test_a_failed_message_insert_leaves_no_rollup_or_recipients(
    database: SqliteDatabase,
) -> None:
    database.record_message(make_record(0))
    with pytest.raises(Exception, match="already recorded"):
        database.record_message(make_record(0, queue_id="again"))
    stats = rollup(database)
    assert stats[("2024-05-01", "example.com")]["relayed"] == 1
    assert database.connection.execute("SELECT count(*) FROM message_recipients").fetchone()[0] == 2


async def test_async_store_passes_the_classifier(open_store: Any) -> None:
    async with await open_store(classifier=by_agent) as store:
        await store.record_message(make_record(0))
        assert await store.record_opens([hit(0, "GoogleImageProxy")]) == 1
        found = await store.find_message(token(0))
        assert found is not None
        assert found.opens[0].verdict == "mail_proxy"


async def test_v2_data_is_carried_into_v3(data_dir: Path) -> None:
    """SQLite only: a SQLite v2 file migrated (PostgreSQL stores start at v6)."""
    build_v1(data_dir)  # one message (null sender) and one open
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        migrate(conn, target=2)
        conn.execute(
            "INSERT INTO messages (tracking_id, queue_id, message_id, sender, recipients,"
            " size_bytes, received_at_us, relayed_at_us, upstream_reply, tracked)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                token(8),
                "QV2",
                None,
                "Ann@Mail.Example.org",
                '["X@Y.z", "w@v"]',
                1,
                0,
                to_us(T0),
                "250",
                0,
            ),
        )
        migrate(conn)
        assert conn.execute(
            "SELECT sender_domain, open_count FROM messages ORDER BY id"
        ).fetchall() == [("", 1), ("mail.example.org", 0)]
        assert conn.execute(
            "SELECT address FROM message_recipients ORDER BY message_rowid, address"
        ).fetchall() == [("bob@example.net",), ("w@v",), ("x@y.z",)]
        assert conn.execute("SELECT verdict FROM opens").fetchall() == [("unknown",)]
        assert conn.execute(
            "SELECT day, sender_domain, relayed, tracked, opened_any, opens, opens_unknown"
            " FROM daily_stats ORDER BY sender_domain"
        ).fetchall() == [
            ("2024-05-01", "", 1, 1, 1, 1, 1),
            ("2024-05-01", "mail.example.org", 1, 0, 0, 0, 0),
        ]
    finally:
        conn.close()
