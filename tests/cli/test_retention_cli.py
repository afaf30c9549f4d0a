"""``smtp-tracker prune`` and ``forget`` as real commands, on either backend (issue 14):
the records in SQLite or PostgreSQL, the capture files in the data directory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from smtp_tracker.store.records import OpenEvent
from tests.store.store_helpers import make_record, token
from tests.support.postgres import pg_cluster
from tests.support.process import run_cli
from tests.support.stores import StoreUnderTest, store_under_test

__all__ = ["pg_cluster", "store_under_test"]  # fixtures: each test runs on both backends

NOW = datetime.now(UTC)


def capture(data_dir: Path, day: datetime, queue_id: str, rcpt: str) -> list[Path]:
    directory = data_dir / "capture" / day.strftime("%Y-%m-%d")
    directory.mkdir(parents=True, exist_ok=True)
    files = [
        directory / f"{queue_id}.session.log",
        directory / f"{queue_id}.downstream.eml",
        directory / f"{queue_id}.upstream.eml",
    ]
    files[0].write_text(
        f"10:00:00.000 C> MAIL FROM:<a@example.org>\n10:00:00.001 C> RCPT TO:<{rcpt}>\n"
    )
    files[1].write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    files[2].write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    return files


@pytest.fixture
def store(store_under_test: StoreUnderTest) -> StoreUnderTest:
    """Records 40, 35 and 10 days old (one open each), and capture files of their days."""
    data_dir = store_under_test.data_dir
    ages = {0: 40, 1: 35, 2: 10, 3: 10}
    recipients = {
        0: ["bob@example.net"],
        1: ["carol@example.net", "Bob@Example.NET"],
        2: ["carol@example.net"],
        3: ["dave@example.net"],
    }
    with store_under_test.open() as database:
        for i, days in ages.items():
            at = NOW - timedelta(days=days)
            database.record_message(make_record(i, relayed_at=at, recipients=recipients[i]))
            database.record_opens(
                [OpenEvent(tracking_id=token(i), at=at, ip=None, user_agent="UA")]
            )
    for i, days in ages.items():
        capture(data_dir, NOW - timedelta(days=days), f"Q{i:05d}", recipients[i][0])
    # a transaction that was not recorded (refused upstream) but was captured
    capture(data_dir, NOW - timedelta(days=1), "ABCDEF012345", "BOB@example.net")
    return store_under_test


def stored_ids(store: StoreUnderTest) -> list[str]:
    with store.open() as database:
        return sorted(m.record.tracking_id for m in database.list_messages())


def capture_names(store: StoreUnderTest) -> list[str]:
    return sorted(p.name for p in (store.data_dir / "capture").rglob("*.session.log"))


def test_prune_dry_run_says_what_it_would_delete_and_deletes_nothing(store: StoreUnderTest) -> None:
    result = run_cli("prune", "--dry-run", *store.flags(), "--retention-days", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("smtp-tracker: would delete what was relayed before ")
    assert result.stdout.rstrip().endswith(
        "(retention_days=30): 2 messages, 2 opens, 0 clicks, 0 links, 3 recipients, 6 capture files"
    )
    assert stored_ids(store) == sorted(token(i) for i in range(4))
    assert len(capture_names(store)) == 5


def test_prune_deletes_what_is_older_than_retention_days(store: StoreUnderTest) -> None:
    result = run_cli("prune", *store.flags(), "--retention-days", "30")
    assert result.returncode == 0, result.stderr
    assert "smtp-tracker: deleted what was relayed before " in result.stdout
    assert "2 messages, 2 opens, 0 clicks, 0 links, 3 recipients, 6 capture files" in (
        result.stdout
    )
    assert stored_ids(store) == sorted([token(2), token(3)])
    assert capture_names(store) == [
        "ABCDEF012345.session.log",
        "Q00002.session.log",
        "Q00003.session.log",
    ]
    old_days = {(NOW - timedelta(days=d)).strftime("%Y-%m-%d") for d in (40, 35)}
    days_left = {p.name for p in (store.data_dir / "capture").iterdir()}
    assert not old_days & days_left  # emptied, removed


def test_prune_with_retention_days_0_keeps_everything(store: StoreUnderTest) -> None:
    result = run_cli("prune", *store.flags(), "--retention-days", "0")
    assert result.returncode == 0
    assert result.stdout == (
        "smtp-tracker: retention_days is 0: records are kept forever; nothing pruned\n"
    )
    assert len(stored_ids(store)) == 4


def test_prune_reads_retention_days_from_the_config_file(
    store: StoreUnderTest, tmp_path: Path
) -> None:
    config = tmp_path / "smtp-tracker.toml"
    where = f'store = "{store.dsn}"\n' if store.dsn else ""
    config.write_text(f'data_dir = "{store.data_dir}"\n{where}retention_days = 5\n')
    result = run_cli("prune", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "(retention_days=5): 4 messages," in result.stdout
    assert stored_ids(store) == []


def test_forget_deletes_every_record_sent_to_the_address_and_its_captures(
    store: StoreUnderTest,
) -> None:
    dry = run_cli("forget", "--recipient", "BOB@example.net", "--dry-run", *store.flags())
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("smtp-tracker: would delete 2 message records sent to")
    assert dry.stdout.rstrip().endswith("3 recipients, 9 capture files")
    assert len(stored_ids(store)) == 4

    result = run_cli("forget", "--recipient", "<BOB@example.net>", *store.flags())
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "smtp-tracker: deleted 2 message records sent to <BOB@example.net>, whole, other "
        "recipients included: 2 messages, 2 opens, 0 clicks, 0 links, 3 recipients, "
        "9 capture files\n"
    )
    # message 1 went whole, carol's recipient row with it; carol's own message 2 stays
    assert stored_ids(store) == sorted([token(2), token(3)])
    # the recorded transactions' captures, and the unrecorded one naming bob, are gone
    assert capture_names(store) == ["Q00002.session.log", "Q00003.session.log"]
    again = run_cli("forget", "--recipient", "bob@example.net", *store.flags())
    assert again.stdout.startswith("smtp-tracker: deleted 0 message records")


@pytest.mark.parametrize("command", [["prune"], ["forget", "--recipient", "bob@example.net"]])
def test_no_store_is_one_line_and_exit_1(
    store_under_test: StoreUnderTest, command: list[str]
) -> None:
    result = run_cli(*command, *store_under_test.flags())
    assert result.returncode == 1
    assert result.stderr.startswith("smtp-tracker: error: no tracking store in ")
    assert result.stderr.count("\n") == 1
    assert not store_under_test.data_dir.exists()


def test_forget_refuses_a_blank_address(store: StoreUnderTest) -> None:
    result = run_cli("forget", "--recipient", " ", *store.flags())
    assert result.returncode == 2
    assert result.stderr.startswith("smtp-tracker: error: --recipient: expected an address")
