"""``smtp-tracker prune`` keeps links for the configured ``link_retention_days``, not the
default 1,825 days (issue 20: links outlive their message records)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from smtp_tracker.store import DB_FILENAME, SqliteDatabase
from smtp_tracker.store.records import LinkRecord
from tests.store.store_helpers import make_record, token
from tests.support.process import run_cli

NOW = datetime.now(UTC)
#: message number: days since its relay
AGES = {0: 40, 1: 32, 2: 10}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    with SqliteDatabase.open(data_dir) as database:
        for i, days in AGES.items():
            link = LinkRecord(
                token=token(1000 + i), url=f"https://example.org/{days}-days", position=0
            )
            database.record_message(
                make_record(i, relayed_at=NOW - timedelta(days=days), links=(link,))
            )
    return data_dir


def links(data_dir: Path) -> list[str]:
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    try:
        return sorted(str(row[0]) for row in conn.execute("SELECT url FROM links"))
    finally:
        conn.close()


def test_prune_takes_link_retention_days_from_the_configuration(
    data_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "smtp-tracker.toml"
    config.write_text(f'data_dir = "{data_dir}"\nretention_days = 30\nlink_retention_days = 35\n')
    done = run_cli("prune", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "2 messages" in done.stdout
    # the 40-day-old message's link is past 35 days; the 32-day-old one's still redirects
    assert "1 links" in done.stdout
    assert links(data_dir) == ["https://example.org/10-days", "https://example.org/32-days"]


def test_the_flag_overrides_the_file(data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "smtp-tracker.toml"
    config.write_text(f'data_dir = "{data_dir}"\nretention_days = 30\nlink_retention_days = 35\n')
    done = run_cli("prune", "--config", str(config), "--link-retention-days", "0")
    assert done.returncode == 0, done.stderr
    assert links(data_dir) == [  # 0: links kept forever
        "https://example.org/10-days",
        "https://example.org/32-days",
        "https://example.org/40-days",
    ]
