"""Times as the store binds them: :class:`Instant` on SQLite (an integer) and on
PostgreSQL (a ``timestamptz``), and the PostgreSQL dialect's column names."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from smtp_tracker.store import pg_schema
from smtp_tracker.store.instant import Instant, from_us, to_us
from smtp_tracker.store.postgresql.connection import pg_names

T = datetime(2026, 12, 7, 15, 0, 0, 123_457, tzinfo=UTC)


def test_an_instant_plus_or_minus_a_duration_is_an_instant_and_two_differ_by_a_duration() -> None:
    at = to_us(T)
    assert isinstance(at, Instant) and at == 1_796_655_600_123_457
    assert isinstance(at + 1, Instant) and isinstance(1 + at, Instant)
    assert isinstance(at - 1, Instant)
    difference = at - Instant(at - 5)
    assert difference == 5 and type(difference) is int
    assert str(at) == "1796655600123457" and from_us(at) == T
    assert Instant.of(at) is at and type(Instant.of(7)) is Instant


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        to_us(datetime(2026, 1, 1))


def test_sqlite_stores_an_instant_as_an_integer() -> None:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (at_us INTEGER)")
        conn.execute("INSERT INTO t VALUES (?)", (to_us(T),))
        assert conn.execute("SELECT typeof(at_us), at_us FROM t").fetchone() == (
            "integer",
            1_796_655_600_123_457,
        )
    finally:
        conn.close()


def test_postgresql_names_every_time_column_without_its_unit() -> None:
    for sqlite_name, pg_name in pg_schema.TIME_COLUMNS.items():
        sql = "SELECT m.{0} FROM x WHERE {0} < ?"
        assert pg_names(sql.format(sqlite_name)) == sql.format(pg_name)
    # a whole identifier only: at_us inside first_open_at_us is not a column of its own
    assert pg_names("first_open_at_us, at_us, flat_us") == "first_open_at, at, flat_us"


def test_postgresql_reads_ip_as_the_text_sqlite_holds() -> None:
    assert pg_names("SELECT c.ip, ip FROM clicks c") == (
        "SELECT COALESCE(abbrev(c.ip_address), encode(c.ip_hash, 'hex')),"
        " COALESCE(abbrev(ip_address), encode(ip_hash, 'hex')) FROM clicks c"
    )
    assert pg_names("SELECT ip_address, ip_hash, skip FROM opens") == (
        "SELECT ip_address, ip_hash, skip FROM opens"
    )


def test_postgresql_binds_and_reads_instants_exactly(pg_dsn: str) -> None:
    import psycopg

    from smtp_tracker.store.postgresql.adapters import adapters

    at = to_us(T)
    with psycopg.connect(pg_dsn, autocommit=True, context=adapters()) as conn:
        for binary in (False, True):
            cursor = conn.cursor(binary=binary)
            row = cursor.execute(
                "SELECT %s::timestamptz, pg_typeof(%s)::text, %s::timestamptz + interval '1 us'",
                (at, at, at),
            ).fetchone()
            assert row == (at, "timestamp with time zone", at + 1)
            assert all(isinstance(value, Instant) for value in row[::2])
        addresses = conn.execute("SELECT '192.0.2.0/24'::inet, '2001:db8::1'::inet").fetchone()
        assert addresses == ("192.0.2.0/24", "2001:db8::1")
        later = conn.execute("SELECT %s::timestamptz", (to_us(T + timedelta(days=40_000)),))
        assert later.fetchone() == (to_us(T + timedelta(days=40_000)),)


def test_a_plain_integer_for_a_postgresql_time_is_an_error_not_a_guess(pg_dsn: str) -> None:
    import psycopg

    from smtp_tracker.store.postgresql.adapters import adapters

    with (
        psycopg.connect(pg_dsn, autocommit=True, context=adapters()) as conn,
        pytest.raises(psycopg.errors.UndefinedFunction),
    ):
        conn.execute("SELECT now() < %s", (int(to_us(T)),))
