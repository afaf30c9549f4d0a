"""Instants as the store binds them: integer microseconds since the Unix epoch.

The code handles every time it writes or reads through the store as an
:class:`Instant`, an :class:`int` of microseconds since 1970-01-01T00:00:00Z.
SQLite stores it as it is, in the ``INTEGER`` columns named ``*_us``;
PostgreSQL in ``timestamptz`` columns (:mod:`.pg_schema`), the connection's
adapters turning an :class:`Instant` into a ``timestamptz`` parameter and a
``timestamptz`` result back into an :class:`Instant`
(:mod:`.postgresql.connection`).  A plain :class:`int` bound where PostgreSQL
expects a time is an error there (``operator does not exist: timestamp with
time zone < bigint``), not a silent conversion: a time is an :class:`Instant`
from where it is made (:func:`to_us`, :func:`now_us`, a value read back).

Arithmetic keeps the kind: an instant plus or minus a duration (a plain
``int`` of microseconds) is an instant; the difference of two instants is a
duration.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Final, SupportsIndex, overload

__all__ = ["EPOCH", "Instant", "from_us", "now_us", "to_us"]

#: 1970-01-01T00:00:00Z, the origin of :class:`Instant`.
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


class Instant(int):
    """Microseconds since the Unix epoch (UTC): a point in time, bound as a time."""

    __slots__ = ()

    @overload
    def __add__(self, other: Instant) -> int: ...  # type: ignore[overload-overlap]
    @overload
    def __add__(self, other: int) -> Instant: ...
    def __add__(self, other: int) -> int:
        total = int.__add__(self, other)
        return total if isinstance(other, Instant) else Instant(total)

    def __radd__(self, other: int) -> Instant:
        return Instant(int.__add__(self, other))

    @overload
    def __sub__(self, other: Instant) -> int: ...  # type: ignore[overload-overlap]
    @overload
    def __sub__(self, other: int) -> Instant: ...
    def __sub__(self, other: int) -> int:
        difference = int.__sub__(self, other)
        return difference if isinstance(other, Instant) else Instant(difference)

    def __repr__(self) -> str:
        return f"Instant({int(self)})"

    __str__ = int.__repr__

    @classmethod
    def of(cls, value: SupportsIndex) -> Instant:
        """*value* (microseconds since the epoch) as an :class:`Instant`."""
        return value if isinstance(value, Instant) else cls(value)


def to_us(value: datetime) -> Instant:
    """*value* as an :class:`Instant` (microseconds since the Unix epoch, UTC).

    :raises ValueError: when *value* is naive.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: give it a timezone (UTC)")
    return Instant((value - EPOCH) // _US)


def from_us(value: int) -> datetime:
    """The UTC datetime *value* microseconds after the Unix epoch."""
    return EPOCH + timedelta(microseconds=value)


def now_us() -> Instant:
    """The current time as an :class:`Instant` (the system clock, ``time.time_ns``)."""
    return Instant(time.time_ns() // 1000)
