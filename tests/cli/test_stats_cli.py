"""``smtp-tracker stats`` (a table or JSON of the reports' figures) and ``smtp-tracker reports``
(the reports listener alone), run as real processes over a store with known data, on
either backend (issue 14)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from smtp_tracker.store import OpenEvent
from smtp_tracker.store.queries import DKIM_OUTCOMES
from smtp_tracker.store.records import VERDICTS, EventContext, Verdict
from tests.store.store_helpers import make_record, token
from tests.support.postgres import pg_cluster
from tests.support.process import launch, run_cli
from tests.support.stores import StoreUnderTest, store_under_test

__all__ = ["pg_cluster", "store_under_test"]  # fixtures: each test runs on both backends

DAY1 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
DAY2 = datetime(2024, 5, 2, 9, 0, tzinfo=UTC)


def classify_by_user_agent(event: EventContext) -> tuple[Verdict, str]:
    verdict = event.user_agent if event.user_agent in VERDICTS else "unknown"
    return verdict, "test"  # type: ignore[return-value]


@pytest.fixture
def store(store_under_test: StoreUnderTest) -> StoreUnderTest:
    """Day 1: 3 from example.com (2 tracked, one opened by a human and a scanner, one by
    Apple's proxy only) and 1 from example.org; day 2: 1 from example.com, not opened."""
    with store_under_test.open(classifier=classify_by_user_agent) as database:
        rows = [
            (0, DAY1, "a@example.com", True),
            (1, DAY1, "b@example.com", True),
            (2, DAY1, "c@example.com", False),
            (3, DAY1, "d@example.org", True),
            (4, DAY2, "a@example.com", True),
        ]
        for i, at, sender, tracked in rows:
            database.record_message(make_record(i, relayed_at=at, sender=sender, tracked=tracked))
        database.record_opens(
            [
                OpenEvent(
                    tracking_id=token(i),
                    at=DAY2 + timedelta(hours=1),
                    ip=None,
                    user_agent=ua,
                )
                for i, ua in [(0, "human"), (0, "scanner"), (1, "privacy_proxy")]
            ]
        )
    return store_under_test


def stats(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("stats", *args)


def test_table_by_day_is_aligned_with_a_total(store: StoreUnderTest) -> None:
    result = stats(*store.flags())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header, day1, day2, rule, total, mode = lines
    assert mode == "tracking mode: per-person"  # issue 20: which mode made the figures
    assert header.split() == [
        "day",
        "relayed",
        "tracked",
        "opened",
        "rate",
        "opened_any",
        "opens",
        "human",
        "mail_proxy",
        "privacy_proxy",
        "scanner",
        "unknown",
        "clicks",
        "via_click",
    ]
    assert day1.split() == [
        "2024-05-01",
        "4",
        "3",
        "1",
        "33.3%",
        "2",
        "3",
        "1",
        "0",
        "1",
        "1",
        "0",
        "0",
        "0",
    ]
    assert day2.split() == [
        "2024-05-02",
        "1",
        "1",
        "0",
        "0.0%",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
    ]
    assert total.split()[:6] == ["total", "5", "4", "1", "25.0%", "2"]
    assert set(rule) == {"-", " "}
    # aligned: every column ends at the same offset on every line (numbers right-aligned)
    ends = [
        i + 1
        for i, (a, b) in enumerate(zip(rule, rule[1:] + " ", strict=True))
        if a == "-" and b == " "
    ]
    for line in (header, day1, day2, total):
        assert len(line) == len(rule)
        for end in ends[1:]:
            assert line[end - 1] != " ", (line, end)


def test_table_by_sender_domain(store: StoreUnderTest) -> None:
    result = stats(*store.flags(), "--group", "sender_domain")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:-3]}
    assert rows["example.com"][1:5] == ["4", "3", "1", "33.3%"]
    assert rows["example.org"][1:5] == ["1", "1", "0", "0.0%"]
    assert list(rows) == ["example.com", "example.org"]  # most relayed first


def test_json_has_the_same_figures_as_the_api(store: StoreUnderTest) -> None:
    result = stats(*store.flags(), "--json", "--since", "2024-05-01", "--until", "2024-05-01")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["group"], document["since"], document["until"]) == (
        "day",
        "2024-05-01",
        "2024-05-01",
    )
    (row,) = document["rows"]
    assert row == {
        "key": "2024-05-01",
        "relayed": 4,
        "tracked": 3,
        "opened": 1,
        "opened_any": 2,
        "opens": 3,
        "opens_by_verdict": {
            "human": 1,
            "privacy_proxy": 1,
            "mail_proxy": 0,
            "scanner": 1,
            "unknown": 0,
        },
        "clicks": 0,
        "clicked": 0,
        "opened_via_click": 0,
        "open_rate": pytest.approx(1 / 3),
        "relayed_aggregate": 0,
        "tracking_mode": "per-person",  # issue 20: which mode made the figures
        "dkim": dict.fromkeys(DKIM_OUTCOMES, 0),  # issue 13: no signed message here
    }
    assert document["total"]["relayed"] == 4


def test_empty_period_prints_only_the_total(store: StoreUnderTest) -> None:
    result = stats(*store.flags(), "--since", "2030-01-01")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[2].split()[:5] == ["total", "0", "0", "0", "-"]
    assert lines[3] == "tracking mode: per-person"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "May 1"], "--since: expected a date like"),
        (["--until", "2024-02-30"], "--until: expected a date like"),
        (["--since", "2024-05-02", "--until", "2024-05-01"], "--since: must not be after"),
    ],
)
def test_bad_dates_are_one_line_and_exit_2(
    store: StoreUnderTest, args: list[str], message: str
) -> None:
    result = stats(*store.flags(), *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"smtp-tracker: error: {message}")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_missing_store_is_one_line_and_exit_1(store_under_test: StoreUnderTest) -> None:
    result = stats(*store_under_test.flags())
    assert result.returncode == 1
    assert result.stderr.startswith("smtp-tracker: error: no tracking store in")
    assert not store_under_test.data_dir.exists()


# -- smtp-tracker reports -------------------------------------------------------------------


async def test_reports_command_serves_the_api_alone(
    store: StoreUnderTest,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
) -> None:
    running = await launch(
        "reports",
        *store.flags(),
        "--reports-listen",
        "127.0.0.1:0",
        "--tls-cert",
        str(cert_pem_path),
        "--tls-key",
        str(key_pem_path),
        env=dict(os.environ),
        ready="listening for HTTPS (reports)",
    )
    try:
        log = "".join(running.log)
        assert "listening for HTTPS (pixel)" not in log  # the pixel runs elsewhere
        token_file = store.data_dir / "reports-token"
        bearer = token_file.read_text().strip()
        assert str(token_file) in log and bearer not in log
        base = f"https://localhost:{running.port}"
        connector = aiohttp.TCPConnector(ssl=client_ssl_context)
        async with aiohttp.ClientSession(connector=connector) as session:
            headers = {"Authorization": f"Bearer {bearer}"}
            async with session.get(base + "/api/stats", headers=headers) as response:
                assert response.status == 200
                assert (await response.json())["total"]["relayed"] == 5
            async with session.get(base + "/api/stats") as response:
                assert response.status == 401
            async with session.get(f"{base}/o/{token(0)}.gif", allow_redirects=False) as response:
                assert response.content_type != "image/gif"
    finally:
        running.process.terminate()
        assert await running.process.wait() == 0
        await running.finish()


def test_a_reader_that_leaves_early_gets_no_traceback(store_under_test: StoreUnderTest) -> None:
    """``smtp-tracker messages --json | head -c 1``: the pipe closes under us (EPIPE)."""
    with store_under_test.open() as database:
        for i in range(2000):
            database.record_message(make_record(i))
    command = [
        sys.executable,
        "-m",
        "smtp_tracker",
        "messages",
        "--json",
        *store_under_test.flags(),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.read(1) == b"["  # then hang up, like `head -c 1`
        process.stdout.close()
        errors = process.stderr.read().decode()
        assert process.wait(timeout=60) == 1
    assert "Traceback" not in errors
    assert "BrokenPipeError" not in errors
