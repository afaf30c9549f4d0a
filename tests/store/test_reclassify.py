"""``smtp-tracker reclassify`` (issue 19, item 2): verdicts and rollups after a rule change.

A store recorded under the old rule order (the timing window before the image
proxies and mail clients) is judged again with the current rules; its events,
counters and ``daily_stats`` must then equal those of a store that recorded
the same hits with the current rules from the start, and a count of its
rows; a second run changes nothing.  It runs beside a writer recording opens
and clicks (as ``serve`` does) without either losing a count.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.classification import RULES, Classifier, load_networks
from smtp_tracker.cli import main
from smtp_tracker.store import (
    DB_FILENAME,
    ClickEvent,
    LinkRecord,
    MessageRecord,
    OpenEvent,
    SqliteDatabase,
)
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


def fill(db: SqliteDatabase) -> None:
    for i, record in enumerate(records()):
        db.record_message(record)
        opens, clicks = hits(record, i)
        db.record_opens(opens)
        db.record_clicks(clicks)


def snapshot(data_dir: Path) -> dict[str, Any]:
    """Everything reclassify may change, in a comparable form."""
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    try:
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
            "daily_stats": conn.execute("SELECT * FROM daily_stats ORDER BY 1, 2").fetchall(),
        }
    finally:
        conn.close()


def rollup_rows_equal_counts(data_dir: Path) -> None:
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    conn.row_factory = sqlite3.Row
    try:
        stored = {
            (row["day"], row["sender_domain"]): {
                k: row[k]
                for k in row.keys()  # noqa: SIM118 - a Row iterates over values
                if k not in ("day", "sender_domain")
            }
            for row in conn.execute("SELECT * FROM daily_stats")
        }
        counted = {
            (day, domain): counts
            for day in sorted({day for day, _ in stored})
            for domain, counts in rollup_from_rows(conn, day).items()
        }
    finally:
        conn.close()
    assert stored == counted


def test_reclassify_after_a_rule_change_equals_a_fresh_classification(tmp_path: Path) -> None:
    old_dir, fresh_dir = tmp_path / "old", tmp_path / "fresh"
    with SqliteDatabase.open(old_dir, classifier=old_classifier()) as db:
        fill(db)
    with SqliteDatabase.open(fresh_dir, classifier=new_classifier()) as db:
        fill(db)
    before = snapshot(old_dir)
    fresh = snapshot(fresh_dir)
    assert before["opens"] != fresh["opens"]  # the rule change matters for these fetches
    assert before["daily_stats"] != fresh["daily_stats"]
    old_opened = sum(row[4] for row in before["daily_stats"])  # the "opened" column
    with SqliteDatabase.open(old_dir, classifier=new_classifier()) as db:
        totals, days = run(db._conn, db.classifier, batch_messages=5)
    assert totals.messages == 24 and totals.changed > 0
    assert [d.day for d in days] == ["2024-05-01", "2024-05-02", "2024-05-03"]
    after = snapshot(old_dir)
    assert after == fresh
    assert sum(row[4] for row in after["daily_stats"]) > old_opened  # Gmail/Thunderbird opens
    rollup_rows_equal_counts(old_dir)
    # run twice: the same result, nothing changed
    with SqliteDatabase.open(old_dir, classifier=new_classifier()) as db:
        again, _ = run(db._conn, db.classifier, batch_messages=7)
    assert again.changed == 0
    assert snapshot(old_dir) == fresh


def test_the_command_with_since_and_a_second_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    with SqliteDatabase.open(data_dir, classifier=old_classifier()) as db:
        fill(db)
    before = snapshot(data_dir)
    args = ["reclassify", "--data-dir", str(data_dir), "--since", "2024-05-02"]
    assert main([*args, "--batch", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("smtp-tracker: reclassified ")
    assert "messages relayed since 2024-05-02" in out.out
    assert "daily counts of 2 days rebuilt from the rows" in out.out
    assert out.err == ""  # no bar when stderr is not a terminal
    after = snapshot(data_dir)
    first_day = token(0), token(1)  # relayed on 2024-05-01: untouched
    assert [r for r in after["opens"] if r[0] in first_day] == [
        r for r in before["opens"] if r[0] in first_day
    ]
    assert after["daily_stats"][:2] == before["daily_stats"][:2]
    assert after["daily_stats"] != before["daily_stats"]
    rollup_rows_equal_counts(data_dir)
    assert main(args) == 0
    assert ": 0 changed verdict;" in capsys.readouterr().out
    assert snapshot(data_dir) == after


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "May 2"], "--since: expected a date like 2026-11-21, got 'May 2'\n"),
        ([], "no tracking store in"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["reclassify", "--data-dir", str(tmp_path / "none"), *argv])
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_a_pruned_day_keeps_its_counts(tmp_path: Path) -> None:
    """Retention leaves a pruned message's counts in the rollup; reclassify keeps them."""
    data_dir = tmp_path / "data"
    with SqliteDatabase.open(data_dir, classifier=old_classifier()) as db:
        fill(db)
        conn = db._conn
        relayed_before = conn.execute(
            "SELECT sum(relayed) FROM daily_stats WHERE day = '2024-05-01'"
        ).fetchone()[0]
        conn.execute("DELETE FROM opens WHERE tracking_id = ?", (token(0),))
        conn.execute("DELETE FROM clicks WHERE tracking_id = ?", (token(0),))
        conn.execute("DELETE FROM messages WHERE tracking_id = ?", (token(0),))
    with SqliteDatabase.open(data_dir, classifier=new_classifier()) as db:
        _, days = run(db._conn, db.classifier)
        relayed_after = db._conn.execute(
            "SELECT sum(relayed) FROM daily_stats WHERE day = '2024-05-01'"
        ).fetchone()[0]
    first = next(d for d in days if d.day == "2024-05-01")
    assert first.kept == 1  # other.org lost message 0: kept as adjusted
    assert relayed_after == relayed_before


def test_safe_beside_a_writer(tmp_path: Path) -> None:
    """A writer records events (as serve does) while reclassify runs: no count is lost."""
    data_dir = tmp_path / "data"
    with SqliteDatabase.open(data_dir, classifier=old_classifier()) as db:
        fill(db)
    recs = records()
    failures: list[BaseException] = []
    started = threading.Event()

    def write() -> None:
        try:
            with SqliteDatabase.open(data_dir, classifier=new_classifier()) as writer:
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
    with SqliteDatabase.open(data_dir, classifier=new_classifier()) as db:
        for _ in range(3):
            run(db._conn, db.classifier, batch_messages=2)
    thread.join(60)
    assert not thread.is_alive() and failures == []
    # every count moved with its rows, whichever side wrote last
    rollup_rows_equal_counts(data_dir)
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    try:
        mismatched = conn.execute(
            "SELECT count(*) FROM messages m WHERE open_count !="
            " (SELECT count(*) FROM opens o WHERE o.tracking_id = m.tracking_id)"
            " OR counted_click_count != (SELECT count(*) FROM clicks c"
            "   WHERE c.tracking_id = m.tracking_id AND c.verdict IN ('human', 'mail_proxy'))"
        ).fetchone()[0]
    finally:
        conn.close()
    assert mismatched == 0


def test_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """With stderr a terminal, tqdm draws the bar there; stdout keeps the one summary line."""
    import fcntl
    import os
    import struct
    import subprocess
    import sys
    import termios

    data_dir = tmp_path / "data"
    with SqliteDatabase.open(data_dir, classifier=old_classifier()) as db:
        fill(db)
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    try:
        done = subprocess.run(
            [sys.executable, "-m", "smtp_tracker", "reclassify", "--data-dir", str(data_dir)],
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
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ip_policy: str, after_import: str
) -> None:
    """A list imported later applies to the addresses the store kept; a hash keeps its
    record-time lists (none matched then), as the docs say."""
    data_dir = tmp_path / "data"
    record = make_record(0)
    with SqliteDatabase.open(
        data_dir,
        ip_policy=ip_policy,  # type: ignore[arg-type]
        classifier=new_classifier(),
    ) as db:
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
    assert main(["networks", "import", "barracuda", str(source), "--data-dir", str(data_dir)]) == 0
    assert main(["reclassify", "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()
    with SqliteDatabase.open(data_dir, create=False) as db:
        detail = db.query_message(record.tracking_id)
    assert detail is not None
    (event,) = detail.opens
    expected = "net:barracuda" if after_import == "scanner" else "ua:browser"
    assert (event.verdict, event.verdict_reason) == (after_import, expected)
