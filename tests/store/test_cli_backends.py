"""The record commands on either backend: ``--data-dir`` (SQLite) or ``--store DSN``
(PostgreSQL); then what only a DSN can get wrong (an unreachable server, a password)."""

from __future__ import annotations

import contextlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.cli import main as cli_main
from smtp_tracker.store import OpenEvent

from .store_helpers import make_record, token


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(list(argv))
    return status, out.getvalue(), err.getvalue()


def _fill(db: Any) -> None:
    now = datetime.now(UTC)
    with db:
        db.record_message(make_record(1))  # 2024: old
        db.record_message(make_record(2, relayed_at=now, received_at=now))
        db.record_message(
            make_record(3, relayed_at=now, received_at=now, recipients=["gina@example.com"])
        )
        db.record_opens([OpenEvent(tracking_id=token(2), at=now, ip=None, user_agent="UA")])


def test_stats_messages_show_prune_forget(
    backend: str, data_dir: Path, open_same_database: Any, request: pytest.FixtureRequest
) -> None:
    _fill(open_same_database())
    if backend == "sqlite":
        store: tuple[str, ...] = ("--data-dir", str(data_dir))
    else:
        store = ("--store", request.getfixturevalue("pg_dsn"), "--data-dir", str(data_dir))
    status, out, _ = _run("messages", "--json", *store)
    assert status == 0
    listed = json.loads(out)
    assert [m["tracking_id"] for m in listed] == [token(3), token(2), token(1)]
    assert [len(m["opens"]) for m in listed] == [0, 1, 0]

    status, out, _ = _run("stats", "--json", *store)
    assert status == 0
    assert json.loads(out)["total"]["relayed"] == 3

    status, out, _ = _run("show", token(2), "--json", *store)
    assert status == 0 and json.loads(out)["open_count"] == 1

    status, out, _ = _run("prune", "--retention-days", "30", *store)
    assert status == 0, out
    status, out, _ = _run("forget", "--recipient", "gina@example.com", *store)
    assert status == 0, out
    status, out, _ = _run("messages", "--json", *store)
    assert [m["tracking_id"] for m in json.loads(out)] == [token(2)]
    # the rollup keeps the counts
    status, out, _ = _run("stats", "--json", *store)
    assert json.loads(out)["total"]["relayed"] == 3


def test_an_unreachable_store_is_one_line(tmp_path: Path) -> None:
    """PostgreSQL only: a server that does not answer."""
    pytest.importorskip("psycopg")
    status, out, err = _run("stats", "--store", "postgresql://u@127.0.0.1:1/db")
    assert status == 1 and out == ""
    assert err.startswith("smtp-tracker: ") and err.count("\n") == 1, err
    assert "--store" in err


def test_a_password_in_the_store_flag_is_refused(tmp_path: Path) -> None:
    """PostgreSQL only: a DSN holding a password."""
    pytest.importorskip("psycopg")
    status, _, err = _run("stats", "--store", "postgresql://u:secret@127.0.0.1:1/db")
    assert status == 2
    assert "must not hold the password" in err and "secret" not in err
