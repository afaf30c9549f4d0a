"""Fixtures for the tracking store tests: a data directory and an open store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtp_tracker.store import SqliteStore


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory that does not exist yet."""
    return tmp_path / "data"


@pytest.fixture
async def store(data_dir: Path) -> AsyncIterator[SqliteStore]:
    """An open store with the default options."""
    async with await SqliteStore.open(data_dir) as opened:
        yield opened
