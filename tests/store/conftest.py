"""Fixtures for the tracking store tests: a data directory and an open store.

``backend`` is parametrised over both backends: SQLite in the data directory
and PostgreSQL in a fresh database of a private cluster (one per session,
:mod:`tests.support.postgres`); the PostgreSQL half skips with the reason
when PostgreSQL or psycopg is not installed.  Every fixture built on it
(``open_store``, ``store``, ``open_same_database``, ``open_sync_database``) runs
the test once per backend.  A test that is about SQLite alone (its files,
PRAGMAs, old SQLite schema versions) takes ``sqlite_store`` instead (or
names SqliteStore itself) and says why in its docstring.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.store import SqliteDatabase, SqliteStore
from tests.support.postgres import pg_cluster, pg_dsn

__all__ = ["pg_cluster", "pg_dsn"]  # the session's cluster, shared by the store tests


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory that does not exist yet."""
    return tmp_path / "data"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which store backend the test runs on."""
    return str(request.param)


@pytest.fixture
def open_store(backend: str, data_dir: Path, request: pytest.FixtureRequest) -> Any:
    """``await open_store(**options)``: a store of the test's backend (closed by the test)."""
    if backend == "sqlite":

        async def open_sqlite(**options: Any) -> Any:
            return await SqliteStore.open(data_dir, **options)

        return open_sqlite
    dsn = request.getfixturevalue("pg_dsn")

    async def open_pg(**options: Any) -> Any:
        from smtp_tracker.store.postgresql import PostgresStore

        return await PostgresStore.open(dsn, **options)

    return open_pg


@pytest.fixture
async def store(open_store: Any) -> AsyncIterator[Any]:
    """An open store with the default options, on each backend."""
    async with await open_store() as opened:
        yield opened


@pytest.fixture
async def sqlite_store(data_dir: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite store with the default options."""
    async with await SqliteStore.open(data_dir) as opened:
        yield opened


@pytest.fixture
def open_same_database(backend: str, data_dir: Path, request: pytest.FixtureRequest) -> Any:
    """``open_same_database(**options)``: a blocking store (:class:`SqliteDatabase` or
    :class:`PgDatabase`) on the test's one store, the one ``open_store`` opens; each
    call opens it again (closed by the test).  Its ``connection`` takes SQL with ``?``
    placeholders on either backend, for a test that reads the tables themselves."""
    if backend == "sqlite":
        return lambda **options: SqliteDatabase.open(data_dir, **options)
    dsn = request.getfixturevalue("pg_dsn")

    def open_pg(**options: Any) -> Any:
        from smtp_tracker.store.postgresql import PgDatabase

        return PgDatabase.open(dsn, **options)

    return open_pg


@pytest.fixture
def open_sync_database(backend: str, request: pytest.FixtureRequest) -> Any:
    """``open_sync_database(data_dir, **options)``: a fresh blocking store of the test's
    backend (:class:`SqliteDatabase` in *data_dir*, or :class:`PgDatabase` in a new database)."""
    if backend == "sqlite":
        return lambda data_dir, **options: SqliteDatabase.open(data_dir, **options)
    cluster = request.getfixturevalue("pg_cluster")

    def open_pg(data_dir: Path, **options: Any) -> Any:
        from smtp_tracker.store.postgresql import PgDatabase

        return PgDatabase.open(cluster.new_database(), **options)

    return open_pg
