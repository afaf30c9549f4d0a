"""``smtp-tracker reclassify`` on either backend (issue 14): the same result on PostgreSQL
as on SQLite, and no count lost beside a writer."""

from __future__ import annotations

import contextlib
import io
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.classification import Classifier
from smtp_tracker.cli import main as cli_main
from smtp_tracker.store import DB_FILENAME, SqliteDatabase
from smtp_tracker.store.reclassify import rollup_from_rows

from .test_reclassify import fill, hits, new_classifier, old_classifier, records


class Where:
    """One store of the test's backend: open it with a classifier, read it raw."""

    def __init__(self, backend: str, data_dir: Path, dsn: str = "") -> None:
        self.backend = backend
        self.data_dir = data_dir
        self.dsn = dsn

    def open(self, classifier: Classifier) -> Any:
        if self.backend == "sqlite":
            return SqliteDatabase.open(self.data_dir, classifier=classifier)
        from smtp_tracker.store.postgresql import PgDatabase

        return PgDatabase.open(self.dsn, classifier=classifier)

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

        with psycopg.connect(self.dsn, autocommit=True) as pg:
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
        status = cli_main(list(argv))
    return status, out.getvalue(), err.getvalue()


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
    """A writer records events while reclassify runs: every counter equals its rows."""
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
            "SELECT id, tracking_id, relayed_at_us FROM messages"
            " WHERE counted_open_count > 0 ORDER BY id LIMIT 1"
        ).fetchone()
        assert row is not None
        rowid, tracking_id, relayed_at_us = row
        day = writer.execute(
            "SELECT (to_timestamp(%s / 1e6) AT TIME ZONE 'UTC')::date::text", (relayed_at_us,)
        ).fetchone()[0]

        def record_open_in_flight() -> None:
            """What the writer does for one human open, left uncommitted."""
            writer.execute("BEGIN")
            writer.execute("SELECT id FROM messages WHERE id = %s FOR UPDATE", (rowid,))
            writer.execute(
                "INSERT INTO opens (tracking_id, at_us, verdict, verdict_reason)"
                " VALUES (%s, %s, 'human', 'test')",
                (tracking_id, relayed_at_us + 1),
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
