"""``smtp-tracker store check`` and ``store recover`` on either backend (issue 14)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from smtp_tracker.cli import main as cli_main
from smtp_tracker.store import SqliteDatabase
from smtp_tracker.store.pg_schema import CURRENT_VERSION


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(list(argv))
    return status, out.getvalue(), err.getvalue()


def _store_flags(backend: str, data_dir: Path, request: pytest.FixtureRequest) -> list[str]:
    """The flags naming a fresh, created store of *backend*."""
    if backend == "sqlite":
        SqliteDatabase.open(data_dir, create=True, migrate_schema=True).close()
        return ["--data-dir", str(data_dir)]
    from smtp_tracker.store.postgresql import PgDatabase

    dsn: str = request.getfixturevalue("pg_dsn")
    PgDatabase.open(dsn).close()
    return ["--store", dsn, "--data-dir", str(data_dir / "none")]


def test_check_says_ok_with_the_schema_version(
    backend: str, data_dir: Path, request: pytest.FixtureRequest
) -> None:
    flags = _store_flags(backend, data_dir, request)
    status, out, err = _run("store", "check", *flags)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].endswith(": ok"), out
    assert f"  schema: v{CURRENT_VERSION}" in lines
    assert not any("problem" in line for line in lines)


def test_recover_on_postgresql_is_one_line_exit_2(pg_dsn: str, tmp_path: Path) -> None:
    status, out, err = _run("store", "recover", "--store", pg_dsn, "--data-dir", str(tmp_path))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "pg_dump/pg_restore" in err
    assert list(tmp_path.iterdir()) == []  # nothing made in the data directory


def test_check_an_empty_database_is_not_a_store(pg_dsn: str) -> None:
    status, out, _ = _run("store", "check", "--store", pg_dsn)
    assert status == 1
    assert "DAMAGED" in out and "problem: no tracking store in this database" in out


def test_check_finds_a_read_only_database(pg_dsn: str) -> None:
    import psycopg

    from smtp_tracker.store.postgresql import PgDatabase

    PgDatabase.open(pg_dsn).close()
    name = pg_dsn.rsplit("/", 1)[1]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    status, out, _ = _run("store", "check", "--store", pg_dsn)
    assert status == 1
    assert f"  schema: v{CURRENT_VERSION}" in out
    assert "problem: cannot write: cannot execute UPDATE in a read-only transaction" in out


def test_check_an_unreachable_server_is_damaged_not_a_traceback() -> None:
    pytest.importorskip("psycopg")
    status, out, err = _run("store", "check", "--store", "postgresql://u@127.0.0.1:1/db")
    assert status == 1 and err == ""
    assert "schema: unreadable" in out and "problem: cannot connect:" in out
    assert "Traceback" not in out
