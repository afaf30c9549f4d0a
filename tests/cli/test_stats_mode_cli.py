"""``smtp-tracker stats`` says which ``tracking_mode`` made its figures in the table too,
as its JSON does (issue 20)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from smtp_tracker.store import SqliteDatabase
from tests.store.store_helpers import make_record
from tests.support.process import run_cli

DAY1 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def store(path: Path, modes: list[str]) -> Path:
    """One message a day, in the modes given, from DAY1 on."""
    with SqliteDatabase.open(path) as database:
        for i, mode in enumerate(modes):
            database.tracking_mode = mode
            database.record_message(make_record(i, relayed_at=DAY1 + timedelta(days=i)))
    return path


@pytest.mark.parametrize(
    ("modes", "since", "line", "mode"),
    [
        (["per-person", "per-person"], None, "tracking mode: per-person", "per-person"),
        (["aggregate", "aggregate"], None, "tracking mode: aggregate", "aggregate"),
        (
            ["per-person", "aggregate", "aggregate"],
            None,
            "tracking mode: mixed (2 of 3 messages aggregate)",
            "mixed",
        ),
        # the mode of the figures shown: those of the period alone
        (
            ["per-person", "aggregate", "aggregate"],
            "2024-05-02",
            "tracking mode: aggregate",
            "aggregate",
        ),
    ],
)
def test_the_table_names_the_mode_below_the_total(
    tmp_path: Path, modes: list[str], since: str | None, line: str, mode: str
) -> None:
    data_dir = str(store(tmp_path / "data", modes))
    period = [] if since is None else ["--since", since]
    table = run_cli("stats", "--data-dir", data_dir, *period)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[-2].startswith("total ")
    assert lines[-1] == line
    document = run_cli("stats", "--json", "--data-dir", data_dir, *period)
    assert json.loads(document.stdout)["total"]["tracking_mode"] == mode  # the same as the JSON
    by_domain = run_cli("stats", "--group", "sender_domain", "--data-dir", data_dir, *period)
    assert by_domain.stdout.splitlines()[-1] == line
