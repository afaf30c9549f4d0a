"""Test doubles of the tracking store, and a store of either backend for command tests.

:func:`store_under_test` runs a test once per backend (SQLite in a data directory,
PostgreSQL in a fresh database of the session's private cluster, skipped with the
reason when PostgreSQL is not installed).  A test module outside ``tests/store``
imports it with ``pg_cluster`` (``from tests.support.stores import store_under_test``
and ``from tests.support.postgres import pg_cluster``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.store import MessageRecord, OpenEvent, SqliteDatabase, StoredMessage


@dataclass(frozen=True)
class StoreUnderTest:
    """One store of a backend: its data directory (capture files, keys; SQLite's file),
    and for PostgreSQL the DSN of its database."""

    backend: str
    data_dir: Path
    dsn: str | None = None

    def flags(self) -> list[str]:
        """The command-line flags naming this store."""
        if self.dsn is None:
            return ["--data-dir", str(self.data_dir)]
        return ["--store", self.dsn, "--data-dir", str(self.data_dir)]

    def open(self, **options: Any) -> Any:
        """The blocking store (:class:`SqliteDatabase` or ``PgDatabase``), made if missing."""
        if self.dsn is None:
            return SqliteDatabase.open(self.data_dir, **options)
        from smtp_tracker.store.postgresql import PgDatabase

        return PgDatabase.open(self.dsn, **options)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_under_test(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    """A store of each backend, not made yet (``.open()`` makes it), in ``tmp_path/data``."""
    if request.param == "sqlite":
        return StoreUnderTest("sqlite", tmp_path / "data")
    dsn = request.getfixturevalue("pg_cluster").new_database()
    return StoreUnderTest("postgresql", tmp_path / "data", dsn)


class OpensOnlyStore:
    """A :class:`~smtp_tracker.store.Store` that only takes opens; subclasses say how.

    Everything else raises, so a test notices when the code under test reaches for it.
    """

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        raise NotImplementedError

    async def record_message(self, record: MessageRecord) -> None:
        raise NotImplementedError

    async def find_message(self, ident: str) -> StoredMessage | None:
        raise NotImplementedError

    async def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        raise NotImplementedError

    async def is_known_token(self, tracking_id: str) -> bool:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass
