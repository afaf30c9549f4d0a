"""``smtp-tracker reclassify`` (issue 19, item 2): verdicts and rollups after a rule change.

A store recorded under the old rule order (the timing window before the image
proxies and mail clients) is judged again with the current rules; its events,
counters and ``daily_stats`` must then equal those of a store that recorded
the same hits with the current rules from the start, and a count of its
rows; a second run changes nothing.  It runs beside a writer recording opens
and clicks (as ``serve`` does) without either losing a count.

Every test runs on both backends (issue 14); PostgreSQL's row locks against a
writer in flight have a test of their own.
"""

from __future__ import annotations

import contextlib
import io
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.classification import RULES, Classifier, load_networks
from smtp_tracker.cli import main
from smtp_tracker.store import (
    DB_FILENAME,
    ClickEvent,
    IpPolicy,
    LinkRecord,
    MessageRecord,
    OpenEvent,
    SqliteDatabase,
)
from smtp_tracker.store.address import HASH_KEY_FILENAME, load_or_create_hash_key
from smtp_tracker.store.reclassify import rollup_from_rows, run
from tests.classification.test_rules import (
    APPLE_MPP,
    CHROME_WINDOWS,
    ELSEWHERE,
    GOOGLE_PROXY,
    HEADLESS_CHROME,
    IPHONE_MAIL,
    OUTLOOK_365,
    THUNDERBIRD,
    YAHOO_PROXY,
)

from .store_helpers import T0, make_record, token

#: The rule order before issue 19: the timing window right after Apple's proxy,
#: so every fetch in it (Gmail's proxy, Thunderbird) was a scanner.
OLD_RULES = (
    tuple(
        rule
        for rule in RULES
        if rule.name.startswith(("net:microsoft", "net:mimecast", "net:barracuda", "ua:missing"))
        or rule.name
        in ("ua:http-library", "ua:headless", "ua:security-gateway", "ua:prefetch-edge12")
        or rule.name.endswith("apple-mpp")
    )
    + tuple(rule for rule in RULES if rule.name.startswith("timing:"))
    + tuple(
        rule
        for rule in RULES
        if not rule.name.startswith(("net:microsoft", "net:mimecast", "net:barracuda", "timing:"))
        and rule.name
        not in (
            "ua:missing",
            "ua:http-library",
            "ua:headless",
            "ua:security-gateway",
            "ua:prefetch-edge12",
        )
        and not rule.name.endswith("apple-mpp")
    )
)

#: (User-Agent, client address, seconds after the relay) of the opens of each message.
FETCHES: list[tuple[str | None, str, float]] = [
    (GOOGLE_PROXY, "66.249.84.22", 4),
    (THUNDERBIRD, ELSEWHERE, 9),
    (YAHOO_PROXY, "203.0.113.9", 2),
    (APPLE_MPP, "172.224.226.33", 1),
    (OUTLOOK_365, ELSEWHERE, 29),
    (IPHONE_MAIL, "2001:db8::1", 31),
    (CHROME_WINDOWS, ELSEWHERE, 3),
    (CHROME_WINDOWS, ELSEWHERE, 3600),
    (HEADLESS_CHROME, ELSEWHERE, 5),
    ("curl/8.1.2", ELSEWHERE, 0),
    (None, ELSEWHERE, 7),
    (CHROME_WINDOWS, "40.107.22.12", 12),
]


def new_classifier() -> Classifier:
    return Classifier(load_networks(), prefetch_window_s=30)


def old_classifier() -> Classifier:
    return Classifier(load_networks(), prefetch_window_s=30, rules=OLD_RULES)


def records() -> list[MessageRecord]:
    """Messages over two UTC days and two sender domains, each with one link."""
    result = []
    for i in range(24):
        result.append(
            make_record(
                i,
                relayed_at=T0 + timedelta(hours=i * 2),
                sender="alice@example.com" if i % 3 else "news@other.org",
                links=(LinkRecord(token=f"{i:02d}" + "L" * 21, url="https://e.test/", position=0),),
            )
        )
    return result


def hits(record: MessageRecord, i: int) -> tuple[list[OpenEvent], list[ClickEvent]]:
    """A few of :data:`FETCHES` for message *i*, and a click for some."""
    opens = []
    for n in range(i % 4):
        agent, address, seconds = FETCHES[(i + 5 * n) % len(FETCHES)]
        opens.append(
            OpenEvent(
                tracking_id=record.tracking_id,
                at=record.relayed_at + timedelta(seconds=seconds),
                ip=address,
                user_agent=agent,
            )
        )
    clicks = []
    if i % 5 in (1, 2):
        agent, address, seconds = FETCHES[(i * 7) % len(FETCHES)]
        clicks.append(
            ClickEvent(
                link_token=record.links[0].token,
                at=record.relayed_at + timedelta(seconds=seconds + 1),
                ip=address,
                user_agent=agent,
            )
        )
    return opens, clicks


def fill(db: Any) -> None:
    for i, record in enumerate(records()):
        db.record_message(record)
        opens, clicks = hits(record, i)
        db.record_opens(opens)
        db.record_clicks(clicks)


class Where:
    """One store of the test's backend: open it with a classifier, read it raw."""

    def __init__(self, backend: str, data_dir: Path, dsn: str = "") -> None:
        self.backend = backend
        self.data_dir = data_dir
        self.dsn = dsn

    def open(self, classifier: Classifier, ip_policy: IpPolicy = "truncate") -> Any:
        """The blocking store, made if need be; with ``ip_policy = "hash"``, keyed by
        ``DATA_DIR/ip-hash.key`` on either backend (as ``serve`` opens it)."""
        if self.backend == "sqlite":
            return SqliteDatabase.open(self.data_dir, ip_policy=ip_policy, classifier=classifier)
        from smtp_tracker.store.postgresql import PgDatabase

        key = None
        if ip_policy == "hash":
            self.data_dir.mkdir(mode=0o700, exist_ok=True)
            key = load_or_create_hash_key(self.data_dir / HASH_KEY_FILENAME)
        return PgDatabase.open(self.dsn, ip_policy=ip_policy, hash_key=key, classifier=classifier)

    def flags(self) -> list[str]:
        if self.backend == "sqlite":
            return ["--data-dir", str(self.data_dir)]
        return ["--store", self.dsn, "--data-dir", str(self.data_dir)]

    @contextlib.contextmanager
    def raw(self) -> Iterator[Any]:
        """A connection taking ``?`` placeholders (sqlite3, or the PgConnection dialect)."""
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.data_dir / DB_FILENAME)
            try:
                yield conn
            finally:
                conn.close()
            return
        import psycopg

        from smtp_tracker.store.postgresql import PgConnection
        from smtp_tracker.store.postgresql.adapters import adapters

        with psycopg.connect(self.dsn, autocommit=True, context=adapters()) as pg:
            yield PgConnection(pg)


@pytest.fixture
def where(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[str], Where]:
    def make(name: str) -> Where:
        if backend == "sqlite":
            return Where(backend, tmp_path / name)
        return Where(backend, tmp_path / name, request.getfixturevalue("pg_cluster").new_database())

    return make


def snapshot(place: Where) -> dict[str, Any]:
    with place.raw() as conn:
        return {
            "opens": conn.execute(
                "SELECT tracking_id, at_us, verdict, verdict_reason, signals FROM opens"
                " ORDER BY tracking_id, at_us, id"
            ).fetchall(),
            "clicks": conn.execute(
                "SELECT tracking_id, at_us, verdict, verdict_reason, signals FROM clicks"
                " ORDER BY tracking_id, at_us, id"
            ).fetchall(),
            "messages": conn.execute(
                "SELECT tracking_id, open_count, counted_open_count, first_open_at_us,"
                " click_count, counted_click_count FROM messages ORDER BY tracking_id"
            ).fetchall(),
            "daily_stats": [
                (str(row[0]), *row[1:])
                for row in conn.execute("SELECT * FROM daily_stats ORDER BY 1, 2").fetchall()
            ],
        }


def assert_rollup_equals_rows(place: Where) -> None:
    """Every rollup row equals a count of the rows; every message's counters too."""
    with place.raw() as conn:
        rows = conn.execute("SELECT * FROM daily_stats").fetchall()
        counted = {str(day): rollup_from_rows(conn, str(day)) for day in {row[0] for row in rows}}
        mismatched = conn.execute(
            "SELECT count(*) FROM messages m WHERE open_count !="
            " (SELECT count(*) FROM opens o WHERE o.tracking_id = m.tracking_id)"
            " OR counted_click_count != (SELECT count(*) FROM clicks c"
            "   WHERE c.tracking_id = m.tracking_id AND c.verdict IN ('human', 'mail_proxy'))"
        ).fetchone()[0]
    assert rows
    for row in rows:
        day, domain = str(row[0]), str(row[1])
        assert [int(v) for v in row[2:]] == list(counted[day][domain].values()), (day, domain)
    assert mismatched == 0


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def test_reclassify_after_a_rule_change_equals_a_fresh_classification(
    where: Callable[[str], Where],
) -> None:
    old, fresh_place = where("old"), where("fresh")
    with old.open(old_classifier()) as db:
        fill(db)
    with fresh_place.open(new_classifier()) as db:
        fill(db)
    before = snapshot(old)
    fresh = snapshot(fresh_place)
    assert before["opens"] != fresh["opens"]  # the rule change matters for these fetches
    assert before["daily_stats"] != fresh["daily_stats"]
    old_opened = sum(row[4] for row in before["daily_stats"])  # the "opened" column
    with old.open(new_classifier()) as db:
        totals, days = run(db.connection, new_classifier(), batch_messages=5)
    assert totals.messages == 24 and totals.changed > 0
    assert [d.day for d in days] == ["2024-05-01", "2024-05-02", "2024-05-03"]
    after = snapshot(old)
    assert after == fresh
    assert sum(row[4] for row in after["daily_stats"]) > old_opened  # Gmail/Thunderbird opens
    assert_rollup_equals_rows(old)
    # run twice: the same result, nothing changed
    with old.open(new_classifier()) as db:
        again, _ = run(db.connection, new_classifier(), batch_messages=7)
    assert again.changed == 0
    assert snapshot(old) == fresh


def test_the_command_with_since_and_a_second_run(
    where: Callable[[str], Where], capsys: pytest.CaptureFixture[str]
) -> None:
    place = where("data")
    with place.open(old_classifier()) as db:
        fill(db)
    before = snapshot(place)
    args = ["reclassify", *place.flags(), "--since", "2024-05-02"]
    assert main([*args, "--batch", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("smtp-tracker: reclassified ")
    assert "messages relayed since 2024-05-02" in out.out
    assert "daily counts of 2 days rebuilt from the rows" in out.out
    assert out.err == ""  # no bar when stderr is not a terminal
    after = snapshot(place)
    first_day = token(0), token(1)  # relayed on 2024-05-01: untouched
    assert [r for r in after["opens"] if r[0] in first_day] == [
        r for r in before["opens"] if r[0] in first_day
    ]
    assert after["daily_stats"][:2] == before["daily_stats"][:2]
    assert after["daily_stats"] != before["daily_stats"]
    assert_rollup_equals_rows(place)
    assert main(args) == 0
    assert ": 0 changed verdict;" in capsys.readouterr().out
    assert snapshot(place) == after


def test_a_bad_date_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Read before any store is opened: the same on both backends."""
    code = main(["reclassify", "--data-dir", str(tmp_path / "none"), "--since", "May 2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "smtp-tracker: error: --since: expected a date like 2026-11-21, got 'May 2'\n"


def test_no_store_is_one_line_and_makes_none(
    where: Callable[[str], Where], capsys: pytest.CaptureFixture[str]
) -> None:
    place = where("none")
    code = main(["reclassify", *place.flags()])
    err = capsys.readouterr().err
    assert code == 1 and "no tracking store in" in err and err.count("\n") == 1
    assert "Traceback" not in err
    if place.backend == "sqlite":
        assert not place.data_dir.exists()
        return
    with place.raw() as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    assert tables == []


def test_a_pruned_day_keeps_its_counts(where: Callable[[str], Where]) -> None:
    """Retention leaves a pruned message's counts in the rollup; reclassify keeps them."""
    place = where("data")
    relayed_on_day_1 = "SELECT sum(relayed) FROM daily_stats WHERE day = '2024-05-01'"
    with place.open(old_classifier()) as db:
        fill(db)
    with place.raw() as conn:
        relayed_before = conn.execute(relayed_on_day_1).fetchone()[0]
        for table in ("opens", "clicks", "messages"):
            conn.execute(f"DELETE FROM {table} WHERE tracking_id = ?", (token(0),))  # noqa: S608
        if place.backend == "sqlite":
            conn.commit()
    with place.open(new_classifier()) as db:
        _, days = run(db.connection, new_classifier())
    with place.raw() as conn:
        relayed_after = conn.execute(relayed_on_day_1).fetchone()[0]
    first = next(d for d in days if d.day == "2024-05-01")
    assert first.kept == 1  # other.org lost message 0: kept as adjusted
    assert relayed_after == relayed_before


def test_the_command_equals_a_fresh_classification(where: Callable[[str], Where]) -> None:
    old, fresh = where("old"), where("fresh")
    with old.open(old_classifier()) as db:
        fill(db)
    with fresh.open(new_classifier()) as db:
        fill(db)
    before = snapshot(old)
    assert before["opens"] != snapshot(fresh)["opens"]  # the rule change matters here
    status, out, err = _run("reclassify", "--batch", "5", *old.flags())
    assert (status, err) == (0, ""), err
    assert out.startswith("smtp-tracker: reclassified ") and "of 24 all messages" in out
    assert "daily counts of 3 days rebuilt from the rows" in out
    assert snapshot(old) == snapshot(fresh)
    assert_rollup_equals_rows(old)
    status, out, _ = _run("reclassify", *old.flags())
    assert status == 0 and ": 0 changed verdict;" in out


def test_safe_beside_a_writer(where: Callable[[str], Where]) -> None:
    """A writer records events (as serve does) while reclassify runs: every counter
    equals its rows, whichever side wrote last."""
    place = where("data")
    with place.open(old_classifier()) as db:
        fill(db)
    recs = records()
    failures: list[BaseException] = []
    started = threading.Event()

    def write() -> None:
        try:
            with place.open(new_classifier()) as writer:
                for round_ in range(30):
                    started.set()
                    i = round_ % len(recs)
                    opens, clicks = hits(recs[i], i + 1)
                    writer.record_opens(opens)
                    writer.record_clicks(clicks)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    assert started.wait(30)
    for _ in range(3):
        status, _, err = _run("reclassify", "--batch", "2", *place.flags())
        assert status == 0, err
    thread.join(60)
    assert not thread.is_alive() and failures == []
    assert_rollup_equals_rows(place)


def _wait_until_blocked(dsn: str) -> None:
    """Wait (a condition, bounded) until some session of *dsn*'s database waits for a lock."""
    import time

    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(3000):
            found = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ).fetchone()
            if found is not None and found[0] > 0:
                return
            time.sleep(0.01)
    raise AssertionError("reclassify never waited for the writer's lock")


def test_postgresql_waits_for_a_writer_in_flight(pg_cluster: Any) -> None:
    """A writer's transaction holds a message's row (an open inserted, its counters moved)
    when reclassify reaches it: the batch and the day's rebuild wait for it and then
    count its open (without the locks, both overwrite its counts with stale ones)."""
    import psycopg

    from smtp_tracker.store.postgresql import PgDatabase

    dsn = pg_cluster.new_database()
    with PgDatabase.open(dsn, classifier=new_classifier()) as db:
        fill(db)
    with psycopg.connect(dsn, autocommit=True) as writer:
        row = writer.execute(
            "SELECT id, tracking_id, relayed_at FROM messages"
            " WHERE counted_open_count > 0 ORDER BY id LIMIT 1"
        ).fetchone()
        assert row is not None
        rowid, tracking_id, relayed_at = row
        found = writer.execute(
            "SELECT (%s::timestamptz AT TIME ZONE 'UTC')::date::text", (relayed_at,)
        ).fetchone()
        assert found is not None
        day = found[0]

        def record_open_in_flight() -> None:
            """What the writer does for one human open, left uncommitted."""
            writer.execute("BEGIN")
            writer.execute("SELECT id FROM messages WHERE id = %s FOR UPDATE", (rowid,))
            writer.execute(
                "INSERT INTO opens (tracking_id, at, verdict, verdict_reason)"
                " VALUES (%s, %s + interval '1 microsecond', 'human', 'test')",
                (tracking_id, relayed_at),
            )
            writer.execute(
                "UPDATE messages SET open_count = open_count + 1,"
                " counted_open_count = counted_open_count + 1 WHERE id = %s",
                (rowid,),
            )
            writer.execute(
                "UPDATE daily_stats SET opens = opens + 1, opens_human = opens_human + 1"
                " FROM messages m WHERE m.id = %s AND daily_stats.day = %s::date"
                " AND daily_stats.sender_domain = m.sender_domain",
                (rowid, day),
            )

        failures: list[BaseException] = []

        def in_thread(call: Callable[[Any], object]) -> threading.Thread:
            def run() -> None:
                try:
                    with PgDatabase.open(dsn, classifier=new_classifier()) as db:
                        call(db)
                except BaseException as exc:
                    failures.append(exc)

            thread = threading.Thread(target=run)
            thread.start()
            return thread

        for call in (
            lambda db: db.reclassify_batch(after_rowid=rowid - 1, batch_messages=1),
            lambda db: db.rebuild_rollup_day(day),
        ):
            record_open_in_flight()
            thread = in_thread(call)
            _wait_until_blocked(dsn)
            writer.execute("COMMIT")
            thread.join(60)
            assert not thread.is_alive() and failures == []
    assert_rollup_equals_rows(Where("postgresql", Path("unused"), dsn))


def test_a_progress_bar_on_a_terminal(where: Callable[[str], Where]) -> None:
    """With stderr a terminal, tqdm draws the bar there; stdout keeps the one summary line."""
    import fcntl
    import os
    import struct
    import subprocess
    import sys
    import termios

    place = where("data")
    with place.open(old_classifier()) as db:
        fill(db)
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    try:
        done = subprocess.run(
            [sys.executable, "-m", "smtp_tracker", "reclassify", *place.flags()],
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=120,
            check=False,
        )
        os.close(terminal)
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
    assert done.returncode == 0, drawn
    assert done.stdout.decode().count("\n") == 1
    assert b"reclassify: 100%" in drawn and b"24/24" in drawn
    assert b"daily counts: 100%" in drawn


@pytest.mark.parametrize(
    ("ip_policy", "after_import"),
    [("full", "scanner"), ("truncate", "scanner"), ("hash", "human"), ("none", "human")],
)
def test_after_networks_import(
    where: Callable[[str], Where],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ip_policy: IpPolicy,
    after_import: str,
) -> None:
    """A list imported later applies to the addresses the store kept; a hash keeps its
    record-time lists (none matched then), as the docs say."""
    place = where("data")
    record = make_record(0)
    with place.open(new_classifier(), ip_policy) as db:
        db.record_message(record)
        db.record_opens(
            [
                OpenEvent(
                    tracking_id=record.tracking_id,
                    at=record.relayed_at + timedelta(hours=1),
                    ip="198.51.100.7",
                    user_agent=CHROME_WINDOWS,
                )
            ]
        )
    source = tmp_path / "ranges.txt"
    source.write_text("# source: a test\n198.51.100.0/24\n")
    networks = ["networks", "import", "barracuda", str(source), "--data-dir", str(place.data_dir)]
    assert main(networks) == 0
    assert main(["reclassify", *place.flags()]) == 0
    capsys.readouterr()
    with place.open(new_classifier()) as db:
        detail = db.query_message(record.tracking_id)
    assert detail is not None
    (event,) = detail.opens
    expected = "net:barracuda" if after_import == "scanner" else "ua:browser"
    assert (event.verdict, event.verdict_reason) == (after_import, expected)
