"""How a store connection turns values into PostgreSQL's and back (psycopg's adapters).

Times are :class:`~smtp_tracker.store.instant.Instant` in the code and
``timestamptz`` in the database: an :class:`Instant` parameter is sent as a
``timestamptz`` (text, or binary: microseconds since 2000-01-01, PostgreSQL's
epoch), and a ``timestamptz`` result comes back as an :class:`Instant`, exact
to the microsecond (PostgreSQL's resolution).  ``inet`` results come back as
their text (``192.0.2.7``, ``192.0.2.0/24``), as SQLite holds them, not as
:mod:`ipaddress` objects.  Imported only when a connection is made (psycopg is
the ``postgresql`` extra).
"""

from __future__ import annotations

import struct
from typing import Any, Final

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Dumper
from psycopg.postgres import types as pg_types
from psycopg.pq import Format
from psycopg.types.datetime import TimestamptzBinaryLoader, TimestamptzLoader
from psycopg.types.string import TextLoader

from smtp_tracker.store.instant import Instant, from_us, to_us

__all__ = ["adapters"]

_INT8: Final = struct.Struct(">q")
#: 2000-01-01T00:00:00Z in microseconds since the Unix epoch.
_PG_EPOCH_US: Final = 946_684_800_000_000
_TIMESTAMPTZ: Final = pg_types["timestamptz"].oid


class _InstantDumper(Dumper):
    """An :class:`~smtp_tracker.store.instant.Instant` as a ``timestamptz`` (text)."""

    oid = _TIMESTAMPTZ

    def dump(self, obj: Any) -> bytes:
        return from_us(obj).isoformat().encode()


class _InstantBinaryDumper(Dumper):
    """An :class:`~smtp_tracker.store.instant.Instant` as a ``timestamptz`` (binary:
    microseconds since 2000-01-01, the PostgreSQL epoch)."""

    format = Format.BINARY
    oid = _TIMESTAMPTZ

    def dump(self, obj: Any) -> bytes:
        return _INT8.pack(obj - _PG_EPOCH_US)


class _InstantLoader(TimestamptzLoader):
    """A ``timestamptz`` result as an :class:`~smtp_tracker.store.instant.Instant`."""

    def load(self, data: Buffer) -> Instant:  # type: ignore[override]
        return to_us(super().load(data))


class _InstantBinaryLoader(TimestamptzBinaryLoader):
    """A binary ``timestamptz`` result as an :class:`~smtp_tracker.store.instant.Instant`."""

    def load(self, data: Buffer) -> Instant:  # type: ignore[override]
        return Instant(_INT8.unpack(data)[0] + _PG_EPOCH_US)


def adapters() -> AdaptersMap:
    """The adapters of every store connection: times as
    :class:`~smtp_tracker.store.instant.Instant` both ways, ``inet`` results as text."""
    return _ADAPTERS


_ADAPTERS: Final = AdaptersMap(psycopg.adapters)
_ADAPTERS.register_dumper(Instant, _InstantDumper)
_ADAPTERS.register_dumper(Instant, _InstantBinaryDumper)
_ADAPTERS.register_loader("timestamptz", _InstantLoader)
_ADAPTERS.register_loader("timestamptz", _InstantBinaryLoader)
_ADAPTERS.register_loader("inet", TextLoader)
