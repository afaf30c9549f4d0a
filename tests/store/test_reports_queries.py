"""The report queries (smtp_tracker.store.queries) over a real store with known data.

Filters are checked against a plain-Python oracle over the same records, each
alone and combined; pagination walks every page; stats are computed by hand.
Every test runs on both backends; the query plans are each backend's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.errors import StoreError
from smtp_tracker.store import SqliteDatabase
from smtp_tracker.store.queries import (
    MAX_LIMIT,
    MessageFilter,
    MessageSummary,
    decode_cursor,
    encode_cursor,
    page_query,
    stats_total,
)
from smtp_tracker.store.records import (
    COUNTED_VERDICTS,
    VERDICTS,
    ClickEvent,
    EventContext,
    LinkRecord,
    OpenEvent,
    Verdict,
)

from .store_helpers import make_record, token

T0 = datetime(2024, 5, 1, 0, 30, tzinfo=UTC)
SENDERS = ("alice@example.com", "Bob@Example.COM", "carol@other.org", "")


def classify_by_user_agent(event: EventContext) -> tuple[Verdict, str]:
    """The test classifier: the User-Agent names the verdict."""
    verdict = event.user_agent if event.user_agent in VERDICTS else "unknown"
    return verdict, f"test:{verdict}"  # type: ignore[return-value]


@dataclass
class Expected:
    """What the oracle knows of one message."""

    i: int
    tracking_id: str
    queue_id: str
    message_id: str
    sender: str
    recipients: list[str]
    relayed_at: datetime
    tracked: bool
    verdicts: list[str] = field(default_factory=list)

    @property
    def opened(self) -> bool:
        return any(v in COUNTED_VERDICTS for v in self.verdicts)


@pytest.fixture
def open_database(open_sync_database: Any) -> Any:
    """``open_database(data_dir)``: a fresh store of the test's backend (SQLite or PostgreSQL)."""
    return lambda data_dir: open_sync_database(data_dir, classifier=classify_by_user_agent)


@pytest.fixture
def dataset(tmp_path: Path, open_database: Any) -> Iterator[tuple[SqliteDatabase, list[Expected]]]:
    """60 messages over 8 UTC days, 4 senders (one a bounce), shared and single
    recipients, some untracked, opens of every verdict."""
    database = open_database(tmp_path / "data")
    expected: list[Expected] = []
    hits: list[OpenEvent] = []
    for i in range(60):
        relayed_at = T0 + timedelta(hours=3 * i)
        recipients = [f"R{i % 5}@Dest.net"] + (["shared@dest.net"] if i % 3 == 0 else [])
        tracked = i % 7 != 0
        record = make_record(
            i,
            sender=SENDERS[i % 4],
            recipients=recipients,
            relayed_at=relayed_at,
            received_at=relayed_at,
            tracked=tracked,
            not_tracked_reason=None if tracked else "no-html",
        )
        database.record_message(record)
        item = Expected(
            i=i,
            tracking_id=record.tracking_id,
            queue_id=record.queue_id,
            message_id=str(record.message_id),
            sender=record.sender,
            recipients=recipients,
            relayed_at=relayed_at,
            tracked=tracked,
        )
        if tracked and i % 2 == 0:
            verdict = VERDICTS[(i // 2) % len(VERDICTS)]
            item.verdicts.append(verdict)
            hits.append(
                OpenEvent(
                    tracking_id=record.tracking_id,
                    at=relayed_at + timedelta(hours=1),
                    ip="192.0.2.1",
                    user_agent=verdict,
                )
            )
            if i % 10 == 0:
                item.verdicts.append("human")
                hits.append(
                    OpenEvent(
                        tracking_id=record.tracking_id,
                        at=relayed_at + timedelta(days=2),
                        ip="192.0.2.2",
                        user_agent="human",
                    )
                )
        expected.append(item)
    assert database.record_opens(hits) == len(hits)
    try:
        yield database, expected
    finally:
        database.close()


def oracle(expected: list[Expected], f: MessageFilter) -> list[str]:
    """Tracking ids *f* selects, newest first, computed in Python."""
    selected = []
    for e in expected:
        if f.sender is not None and e.sender != f.sender:
            continue
        if (
            f.sender_domain is not None
            and (e.sender.rpartition("@")[2].lower() if "@" in e.sender else "")
            != f.sender_domain.lower()
        ):
            continue
        if f.recipient is not None and f.recipient.lower() not in [r.lower() for r in e.recipients]:
            continue
        if f.q is not None and f.q.strip("<>") not in (
            e.tracking_id,
            e.queue_id,
            e.message_id.strip("<>"),
        ):
            continue
        if f.since is not None and e.relayed_at < f.since:
            continue
        if f.until is not None and e.relayed_at >= f.until:
            continue
        if f.opened is not None and e.opened != f.opened:
            continue
        if f.tracked is not None and e.tracked != f.tracked:
            continue
        selected.append(e)
    selected.sort(key=lambda e: (e.relayed_at, e.i), reverse=True)
    return [e.tracking_id for e in selected]


def all_pages(database: SqliteDatabase, f: MessageFilter, *, limit: int) -> list[MessageSummary]:
    items: list[MessageSummary] = []
    cursor: str | None = None
    for _ in range(10_000):
        page = database.query_messages(f, limit=limit, cursor=cursor)
        assert len(page.items) <= limit
        items.extend(page.items)
        if page.next_cursor is None:
            return items
        assert len(page.items) == limit
        cursor = page.next_cursor
    raise AssertionError("pagination does not end")


DAY2 = T0 + timedelta(days=2)
DAY4 = T0 + timedelta(days=4)

SINGLE_FILTERS = {
    "none": MessageFilter(),
    "sender": MessageFilter(sender="alice@example.com"),
    "sender exact case": MessageFilter(sender="Bob@Example.COM"),
    "sender other case matches nothing": MessageFilter(sender="bob@example.com"),
    "bounces": MessageFilter(sender=""),
    "sender_domain": MessageFilter(sender_domain="EXAMPLE.com"),
    "sender_domain of bounces": MessageFilter(sender_domain=""),
    "recipient": MessageFilter(recipient="r2@dest.net"),
    "recipient any case": MessageFilter(recipient="SHARED@DEST.NET"),
    "recipient unknown": MessageFilter(recipient="nobody@dest.net"),
    "q tracking id": MessageFilter(q=token(17)),
    "q queue id": MessageFilter(q="Q00023"),
    "q message-id with brackets": MessageFilter(q="<msg31@example.com>"),
    "q message-id bare": MessageFilter(q="msg31@example.com"),
    "q unknown": MessageFilter(q="nothing-like-it"),
    "since": MessageFilter(since=DAY2),
    "until": MessageFilter(until=DAY2),
    "since and until": MessageFilter(since=DAY2, until=DAY4),
    "opened": MessageFilter(opened=True),
    "not opened": MessageFilter(opened=False),
    "tracked": MessageFilter(tracked=True),
    "untracked": MessageFilter(tracked=False),
}

COMBINED_FILTERS = {
    "sender + opened": MessageFilter(sender="alice@example.com", opened=True),
    "sender_domain + not opened + tracked": MessageFilter(
        sender_domain="example.com", opened=False, tracked=True
    ),
    "recipient + since + until": MessageFilter(recipient="shared@dest.net", since=DAY2, until=DAY4),
    "recipient + sender": MessageFilter(recipient="r0@dest.net", sender="alice@example.com"),
    "recipient + opened": MessageFilter(recipient="shared@dest.net", opened=True),
    "q + matching sender": MessageFilter(q=token(2), sender="carol@other.org"),
    "q + other sender": MessageFilter(q=token(2), sender="alice@example.com"),
    "everything": MessageFilter(
        sender_domain="example.com",
        recipient="shared@dest.net",
        since=T0,
        until=T0 + timedelta(days=8),
        opened=True,
        tracked=True,
    ),
}


@pytest.mark.parametrize("name", list(SINGLE_FILTERS))
def test_each_filter_alone_selects_what_the_oracle_does(
    dataset: tuple[SqliteDatabase, list[Expected]], name: str
) -> None:
    database, expected = dataset
    f = SINGLE_FILTERS[name]
    got = [s.tracking_id for s in all_pages(database, f, limit=MAX_LIMIT)]
    assert got == oracle(expected, f)


@pytest.mark.parametrize("name", list(COMBINED_FILTERS))
def test_combined_filters_select_what_the_oracle_does(
    dataset: tuple[SqliteDatabase, list[Expected]], name: str
) -> None:
    database, expected = dataset
    f = COMBINED_FILTERS[name]
    got = [s.tracking_id for s in all_pages(database, f, limit=MAX_LIMIT)]
    assert got == oracle(expected, f)


def test_the_oracle_data_exercise_every_filter(
    dataset: tuple[SqliteDatabase, list[Expected]],
) -> None:
    # guard against vacuous passes: each single filter selects some but not all
    _, expected = dataset
    for name, f in SINGLE_FILTERS.items():
        count = len(oracle(expected, f))
        if "unknown" in name or "nothing" in name:
            assert count == 0, name
        elif name == "none":
            assert count == 60
        else:
            assert 0 < count < 60, name
    for name, f in COMBINED_FILTERS.items():
        if name != "q + other sender":
            assert oracle(expected, f), name


def test_summaries_carry_the_counters(dataset: tuple[SqliteDatabase, list[Expected]]) -> None:
    database, expected = dataset
    by_id = {s.tracking_id: s for s in all_pages(database, MessageFilter(), limit=MAX_LIMIT)}
    for e in expected:
        summary = by_id[e.tracking_id]
        assert summary.queue_id == e.queue_id
        assert summary.sender == e.sender
        assert list(summary.recipients) == e.recipients  # as recorded, case kept
        assert summary.relayed_at == e.relayed_at
        assert summary.tracked is e.tracked
        assert summary.not_tracked_reason == (None if e.tracked else "no-html")
        assert summary.open_count == len(e.verdicts)
        counted = [v for v in e.verdicts if v in COUNTED_VERDICTS]
        assert summary.counted_open_count == len(counted)
        assert summary.opened is bool(counted)
        if counted:  # the first counted open is 1 h after relay
            assert summary.first_open_at == e.relayed_at + timedelta(
                hours=1 if e.verdicts[0] in COUNTED_VERDICTS else 48
            )
        else:
            assert summary.first_open_at is None


# -- pagination -----------------------------------------------------------------------------


@pytest.fixture
def same_time(tmp_path: Path, open_database: Any) -> Iterator[SqliteDatabase]:
    """320 messages relayed in the same microsecond; every third from bob."""
    database = open_database(tmp_path / "same")
    for i in range(320):
        database.record_message(
            make_record(i, relayed_at=T0, sender="bob@example.com" if i % 3 == 0 else "a@b.c")
        )
    try:
        yield database
    finally:
        database.close()


@pytest.mark.parametrize("limit", [1, 7, 50, 319, 320, MAX_LIMIT])
def test_pages_cover_equal_timestamps_without_gaps_or_repeats(
    same_time: SqliteDatabase, limit: int
) -> None:
    items = all_pages(same_time, MessageFilter(), limit=limit)
    ids = [s.tracking_id for s in items]
    assert len(ids) == 320
    assert len(set(ids)) == 320
    assert ids == [token(i) for i in reversed(range(320))]  # ties broken by row id, newest first


def test_filtered_pages_cover_every_match_once(same_time: SqliteDatabase) -> None:
    f = MessageFilter(sender="bob@example.com")
    ids = [s.tracking_id for s in all_pages(same_time, f, limit=9)]
    assert ids == [token(i) for i in reversed(range(0, 320, 3))]


def test_messages_relayed_while_paging_do_not_shift_the_pages(same_time: SqliteDatabase) -> None:
    first = same_time.query_messages(MessageFilter(), limit=100)
    for i in range(1000, 1050):  # newer, and one at the very same time
        same_time.record_message(make_record(i, relayed_at=T0 + timedelta(seconds=i - 1000)))
    rest = all_pages_from(same_time, MessageFilter(), first.next_cursor, limit=100)
    ids = [s.tracking_id for s in first.items + rest]
    assert ids == [token(i) for i in reversed(range(320))]


def all_pages_from(
    database: SqliteDatabase, f: MessageFilter, cursor: str | None, *, limit: int
) -> list[MessageSummary]:
    items: list[MessageSummary] = []
    while cursor is not None:
        page = database.query_messages(f, limit=limit, cursor=cursor)
        items.extend(page.items)
        cursor = page.next_cursor
    return items


def test_last_page_has_no_cursor_and_empty_result_is_one_page(same_time: SqliteDatabase) -> None:
    assert same_time.query_messages(MessageFilter(), limit=320).next_cursor is None
    empty = same_time.query_messages(MessageFilter(sender="nobody@x"), limit=5)
    assert empty.items == []
    assert empty.next_cursor is None


def test_cursor_is_url_safe_and_round_trips() -> None:
    f = MessageFilter(sender="a@b.c")
    cursor = encode_cursor(1_714_521_600_000_000, 42, f)
    assert cursor.isascii()
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_cursor(cursor, f) == (1_714_521_600_000_000, 42)


@pytest.mark.parametrize(
    "cursor",
    ["", "x", "not base64!", "AAAA", "A" * 34, "A" * 200],
)
def test_malformed_cursor_is_a_value_error(same_time: SqliteDatabase, cursor: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        same_time.query_messages(MessageFilter(), cursor=cursor)


def test_tampered_cursor_is_a_value_error(same_time: SqliteDatabase) -> None:
    cursor = same_time.query_messages(MessageFilter(), limit=10).next_cursor
    assert cursor is not None
    for position in range(len(cursor)):
        replacement = "A" if cursor[position] != "A" else "B"
        tampered = cursor[:position] + replacement + cursor[position + 1 :]
        with pytest.raises(ValueError, match="cursor"):
            same_time.query_messages(MessageFilter(), limit=10, cursor=tampered)


def test_cursor_of_other_filters_is_a_value_error(same_time: SqliteDatabase) -> None:
    cursor = same_time.query_messages(MessageFilter(), limit=10).next_cursor
    assert cursor is not None
    with pytest.raises(ValueError, match="filters"):
        same_time.query_messages(MessageFilter(sender="bob@example.com"), limit=10, cursor=cursor)


@pytest.mark.parametrize("limit", [0, -1, MAX_LIMIT + 1])
def test_limit_out_of_range_is_a_value_error(same_time: SqliteDatabase, limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        same_time.query_messages(MessageFilter(), limit=limit)


def test_naive_filter_time_is_a_value_error(same_time: SqliteDatabase) -> None:
    with pytest.raises(ValueError, match="naive"):
        same_time.query_messages(MessageFilter(since=datetime(2024, 5, 1)))


# -- export ---------------------------------------------------------------------------------


def test_export_streams_every_match_in_pages(
    dataset: tuple[SqliteDatabase, list[Expected]],
) -> None:
    database, expected = dataset
    f = MessageFilter(tracked=True)
    rows = database.export_rows(f, page_rows=7)
    first = next(rows)  # lazy: a generator, one page read so far
    got = [first.tracking_id] + [s.tracking_id for s in rows]
    assert got == oracle(expected, f)
    assert len(got) > 7 * 3


# -- one message ----------------------------------------------------------------------------


def test_query_message_has_its_opens_and_clicks_with_verdicts(
    tmp_path: Path, open_database: Any
) -> None:
    with open_database(tmp_path / "one") as database:
        links = (
            LinkRecord(token="L" + "a" * 22, url="https://example.com/a?x=1&y=2", position=0),
            LinkRecord(token="L" + "b" * 22, url="https://example.com/b", position=1),
        )
        database.record_message(make_record(5, relayed_at=T0, links=links))
        database.record_opens(
            [
                OpenEvent(
                    tracking_id=token(5),
                    at=T0 + timedelta(minutes=m),
                    ip=None,
                    user_agent=ua,
                )
                for m, ua in [(3, "scanner"), (1, "privacy_proxy"), (9, "human")]
            ]
        )
        database.record_clicks(
            [
                ClickEvent(
                    link_token=links[1].token,
                    at=T0 + timedelta(minutes=10),
                    ip="192.0.2.9",
                    user_agent="human",
                )
            ]
        )
        detail = database.query_message(token(5))
        assert detail is not None
        assert [(o.verdict, o.counted) for o in detail.opens] == [
            ("privacy_proxy", False),
            ("scanner", False),
            ("human", True),
        ]
        assert [o.at for o in detail.opens] == sorted(o.at for o in detail.opens)
        assert detail.opens[0].verdict_reason == "test:privacy_proxy"
        assert [(c.url, c.verdict, c.counted) for c in detail.clicks] == [
            ("https://example.com/b", "human", True)
        ]
        assert detail.clicks[0].ip == "192.0.2.0/24"  # ip_policy truncate
        assert detail.summary.open_count == 3
        assert detail.summary.counted_open_count == 1
        assert detail.summary.first_open_at == T0 + timedelta(minutes=9)
        assert detail.summary.click_count == 1
        assert detail.summary.counted_click_count == 1
        assert detail.upstream_reply == "2.0.0 Ok: queued as UP5"
        assert detail.size_bytes == 1005
        for ident in ("Q00005", "<msg5@example.com>", "msg5@example.com"):
            found = database.query_message(ident)
            assert found is not None
            assert found.summary.tracking_id == token(5), ident
        assert database.query_message("unknown") is None


# -- statistics -----------------------------------------------------------------------------


def test_stats_by_day_on_known_data(tmp_path: Path, open_database: Any) -> None:
    day1 = datetime(2024, 5, 1, 23, 59, tzinfo=UTC)
    day2 = datetime(2024, 5, 2, 0, 1, tzinfo=UTC)
    with open_database(tmp_path / "stats") as database:
        # day 1: 4 relayed, 3 tracked; opens: #0 human+scanner, #1 mail_proxy, #2 privacy only
        # day 2: 2 relayed, 2 tracked; #4 unknown twice; #5 nothing
        for i, at, tracked in [
            (0, day1, True),
            (1, day1, True),
            (2, day1, True),
            (3, day1, False),
            (4, day2, True),
            (5, day2, True),
        ]:
            database.record_message(make_record(i, relayed_at=at, tracked=tracked))
        opens = [
            (0, "human"),
            (0, "scanner"),
            (1, "mail_proxy"),
            (2, "privacy_proxy"),
            (4, "unknown"),
            (4, "unknown"),
        ]
        # every open arrives on day 3: it still counts on its message's relay day
        database.record_opens(
            [
                OpenEvent(
                    tracking_id=token(i),
                    at=day2 + timedelta(days=1),
                    ip=None,
                    user_agent=ua,
                )
                for i, ua in opens
            ]
        )
        rows = database.query_stats(group="day")
    assert [r.key for r in rows] == ["2024-05-01", "2024-05-02"]
    first, second = rows
    assert (first.relayed, first.tracked, first.opened, first.opened_any, first.opens) == (
        4,
        3,
        2,
        3,
        4,
    )
    assert first.opens_by_verdict == {
        "human": 1,
        "privacy_proxy": 1,
        "mail_proxy": 1,
        "scanner": 1,
        "unknown": 0,
    }
    assert first.open_rate == pytest.approx(2 / 3)
    assert (second.relayed, second.tracked, second.opened, second.opened_any, second.opens) == (
        2,
        2,
        0,
        1,
        2,
    )
    assert second.opens_by_verdict["unknown"] == 2
    assert second.open_rate == 0.0
    total = stats_total(rows)
    assert (total.key, total.relayed, total.tracked, total.opened, total.opened_any) == (
        "total",
        6,
        5,
        2,
        4,
    )
    assert total.opens == 6 == sum(total.opens_by_verdict.values())
    assert total.open_rate == pytest.approx(2 / 5)


def test_stats_by_sender_domain_and_day_bounds(
    dataset: tuple[SqliteDatabase, list[Expected]],
) -> None:
    database, expected = dataset
    since, until = date(2024, 5, 3), date(2024, 5, 5)
    rows = database.query_stats(since=since, until=until, group="sender_domain")

    def domain(sender: str) -> str:
        return sender.rpartition("@")[2].lower() if "@" in sender else ""

    in_period = [e for e in expected if since <= e.relayed_at.date() <= until]
    want: dict[str, tuple[int, int, int, int, int]] = {}
    for e in in_period:
        relayed, tracked, opened, opened_any, opens = want.get(domain(e.sender), (0, 0, 0, 0, 0))
        want[domain(e.sender)] = (
            relayed + 1,
            tracked + e.tracked,
            opened + e.opened,
            opened_any + bool(e.verdicts),
            opens + len(e.verdicts),
        )
    got = {r.key: (r.relayed, r.tracked, r.opened, r.opened_any, r.opens) for r in rows}
    assert got == want
    assert set(got) == {"example.com", "other.org", ""}
    assert [r.relayed for r in rows] == sorted((r.relayed for r in rows), reverse=True)
    for row in rows:
        assert row.open_rate == (row.opened / row.tracked if row.tracked else None)
    by_day = database.query_stats(since=since, until=until, group="day")
    assert [r.key for r in by_day] == ["2024-05-03", "2024-05-04", "2024-05-05"]
    assert sum(r.relayed for r in by_day) == len(in_period)


def test_stats_open_rate_is_none_without_tracked_messages(
    tmp_path: Path, open_database: Any
) -> None:
    with open_database(tmp_path / "none") as database:
        database.record_message(make_record(1, relayed_at=T0, tracked=False))
        (row,) = database.query_stats()
        assert (row.relayed, row.tracked, row.open_rate) == (1, 0, None)
        assert database.query_stats(since=date(2030, 1, 1)) == []


def test_stats_bad_arguments(tmp_path: Path, open_database: Any) -> None:
    with open_database(tmp_path / "bad") as database:
        with pytest.raises(ValueError, match="group"):
            database.query_stats(group="week")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="after"):
            database.query_stats(since=date(2024, 5, 2), until=date(2024, 5, 1))


def test_stats_read_only_the_rollup(dataset: tuple[SqliteDatabase, list[Expected]]) -> None:
    database, _ = dataset
    conn = database._conn
    before = database.query_stats(group="day")
    conn.execute("DELETE FROM messages")  # the rollup alone must answer
    assert database.query_stats(group="day") == before


# -- query plans ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "f",
    [
        MessageFilter(),
        MessageFilter(sender="a@b.c"),
        MessageFilter(sender_domain="b.c"),
        MessageFilter(recipient="x@y.z"),
        MessageFilter(q="abc"),
        MessageFilter(since=T0, until=DAY2),
        MessageFilter(opened=True),
        MessageFilter(sender="a@b.c", opened=False, since=T0),
    ],
    ids=repr,
)
def test_message_queries_never_scan_the_table(
    backend: str, open_same_database: Any, f: MessageFilter
) -> None:
    """Each filter has an index to use: SQLite's plan names one and scans no table;
    PostgreSQL's, with sequential scans priced out (its tables are empty here, where
    a scan is cheapest), reads ``messages`` through an index."""
    sql, params = page_query(f, after=(1, 2), limit=51)
    with open_same_database() as database:
        conn = database.connection
        if backend == "sqlite":
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        else:
            conn.execute("SET enable_seqscan = off")
            plan = [row[0] for row in conn.execute(f"EXPLAIN {sql}", params)]
    if backend == "sqlite":
        assert [line for line in plan if line.startswith("SCAN")] == [], plan
        assert any("USING" in line for line in plan), plan
    else:
        assert not [line for line in plan if "Seq Scan" in line], plan
        assert any("Index" in line and " on messages" in line for line in plan), plan


# -- the async store ------------------------------------------------------------------------


async def test_async_store_methods(open_store: Any) -> None:
    async with await open_store(classifier=classify_by_user_agent) as store:
        for i in range(3):
            await store.record_message(make_record(i, relayed_at=T0 + timedelta(days=i)))
        await store.record_opens(
            [OpenEvent(tracking_id=token(1), at=T0, ip=None, user_agent="human")]
        )
        page = await store.query_messages(MessageFilter(opened=True))
        assert [s.tracking_id for s in page.items] == [token(1)]
        detail = await store.query_message(token(1))
        assert detail is not None
        assert [o.verdict for o in detail.opens] == ["human"]
        rows = await store.query_stats(group="day")
        assert [(r.key, r.opened) for r in rows] == [
            ("2024-05-01", 0),
            ("2024-05-02", 1),
            ("2024-05-03", 0),
        ]
        with pytest.raises(ValueError, match="limit"):
            await store.query_messages(MessageFilter(), limit=0)
    with pytest.raises(StoreError):
        await store.query_stats()
