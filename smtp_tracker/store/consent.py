"""Consent in the store: the per-recipient objection registry and the objection links.

Issue 20.  Tables of schema v6 (:mod:`.migrations`):

``consent``
    One row per lower-cased address: ``state`` ``denied`` (the person objects
    to open tracking) or ``granted`` (the person agreed to it), ``at_us``
    (when, microseconds since the epoch, UTC) and ``source`` (``cli``,
    ``import:FILE``, ``optout-link``...).  Its primary key is the index the
    relay looks addresses up in (:meth:`ConsentRegistry.states`): one b-tree
    probe per form of each recipient, whatever the registry's size.
``optout_links``
    The objection link of each tracked message (``disclosure_optout_link``):
    a random token (:func:`smtp_tracker.tokens.new_link_token`, over 128
    bits: the URL holds no personal data and cannot be guessed), the message's
    tracking id and its recipients (the page names them, so that each can
    object).  Kept for ``link_retention_days``, like the links of the message;
    ``forget`` removes those naming the address.
``optout_used``
    The single-use form tokens of the objection page already spent (a replayed
    POST records nothing); kept for :data:`FORM_TTL_S`.

Functions here take a connection in autocommit mode, a
:class:`sqlite3.Connection` or a PostgreSQL
:class:`~smtp_tracker.store.postgresql.PgConnection` (``?`` placeholders for
both; the tables are in both schemas), and are blocking;
:class:`ConsentRegistry` runs them on a connection and thread of its own, so a
look-up in the relay path never queues behind a report query or a batch of
opens.  The SQL is plain, shared by both backends, and kept in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, get_args

from smtp_tracker.errors import StoreError
from smtp_tracker.store.instant import Instant, now_us
from smtp_tracker.store.integrity import DB_FILENAME
from smtp_tracker.store.migrations import schema_version
from smtp_tracker.store.retention import recipient_forms
from smtp_tracker.store.rows import from_us, write_transaction

__all__ = [
    "CONSENT_SCHEMA_VERSION",
    "FORM_TTL_S",
    "STATES",
    "ConsentEntry",
    "ConsentRegistry",
    "ConsentState",
    "OptoutLink",
    "add_optout_link",
    "canonical_address",
    "count_entries",
    "export_csv",
    "find_optout_link",
    "forget_address",
    "get_entry",
    "iter_entries",
    "object_via_link",
    "parse_csv",
    "set_states",
    "states_of",
]

ConsentState = Literal["denied", "granted"]
#: The states an address can be in (an address not in the registry has none).
STATES: Final[tuple[ConsentState, ...]] = get_args(ConsentState)
#: The schema version that has the consent tables.
CONSENT_SCHEMA_VERSION: Final = 6
#: Seconds a form of the objection page stays valid, and a spent form token is kept.
FORM_TTL_S: Final = 3600
#: Rows per ``INSERT`` transaction of an import.
_IMPORT_BATCH: Final = 10_000
#: Addresses per ``IN (...)`` look-up.
_IN_CHUNK: Final = 500

_T = TypeVar("_T")


#: A connection of either backend: :class:`sqlite3.Connection` or ``PgConnection``.
Conn = Any


def canonical_address(address: str) -> str:
    """*address* as the registry keeps it: lower case, without angle brackets or spaces.

    :raises ValueError: when it is not ``local@domain``.
    """
    text = address.strip().strip("<>").strip().lower()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in text):
        raise ValueError(f"{address!r} is not an address (local@domain)")
    return text


@dataclass(frozen=True, slots=True)
class ConsentEntry:
    """One address of the registry.

    :param address: lower-cased address.
    :param state: ``denied`` or ``granted``.
    :param at: when it was set (aware, UTC).
    :param source: where it came from (``cli``, ``import:FILE``, ``optout-link``...).
    """

    address: str
    state: ConsentState
    at: datetime
    source: str

    def to_dict(self) -> dict[str, str]:
        """The JSON shape: address, state, at (ISO 8601, UTC), source."""
        return {
            "address": self.address,
            "state": self.state,
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class OptoutLink:
    """A message's objection link: its token, tracking id and recipients."""

    token: str
    tracking_id: str
    recipients: tuple[str, ...]
    created: datetime


# -- the registry -----------------------------------------------------------------------


def set_states(
    conn: Conn,
    entries: Iterable[tuple[str, ConsentState]],
    *,
    source: str,
    at_us: int | None = None,
) -> int:
    """Set the state of each ``(address, state)``, in transactions of 10,000 rows.

    Addresses are taken as :func:`canonical_address` makes them; a later entry
    for the same address wins.

    :returns: how many rows were written.
    :raises ValueError: when an address or state is invalid (nothing after it is written).
    :raises sqlite3.Error: when the database cannot be written.
    """
    at_us = now_us() if at_us is None else Instant.of(at_us)
    written = 0
    batch: list[tuple[str, str, int, str]] = []

    def flush() -> None:
        with write_transaction(conn):
            conn.executemany(
                "INSERT INTO consent (address, state, at_us, source) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (address) DO UPDATE SET state = excluded.state,"
                " at_us = excluded.at_us, source = excluded.source",
                list({row[0]: row for row in batch}.values()),  # the last one wins
            )

    for address, state in entries:
        if state not in STATES:
            raise ValueError(f"{state!r} is not a consent state ({', '.join(STATES)})")
        batch.append((canonical_address(address), state, at_us, source))
        if len(batch) >= _IMPORT_BATCH:
            flush()
            written += len(batch)
            batch = []
    if batch:
        flush()
        written += len(batch)
    return written


def states_of(conn: Conn, addresses: Iterable[str]) -> dict[str, ConsentState]:
    """The registry's state of each of *addresses* that has one (keyed as given).

    Each address is looked up in every form it may be written in (lower case,
    its domain in A-labels and in U-labels: :func:`.retention.recipient_forms`);
    ``denied`` wins over ``granted`` when two forms disagree.  One primary-key
    probe per form.

    :raises sqlite3.Error: when the database cannot be read.
    """
    forms: dict[str, list[str]] = {}
    for address in addresses:
        forms.setdefault(address, recipient_forms(address))
    wanted = sorted({form for each in forms.values() for form in each})
    found: dict[str, str] = {}
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start : start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for address, state in conn.execute(
            f"SELECT address, state FROM consent WHERE address IN ({marks})",  # noqa: S608 - marks only
            chunk,
        ):
            found[str(address)] = str(state)
    result: dict[str, ConsentState] = {}
    for address, each in forms.items():
        seen = {found[form] for form in each if form in found}
        if "denied" in seen:
            result[address] = "denied"
        elif "granted" in seen:
            result[address] = "granted"
    return result


def _entry(row: Sequence[object]) -> ConsentEntry:
    address, state, at_us, source = row
    return ConsentEntry(
        address=str(address),
        state="denied" if state == "denied" else "granted",
        at=from_us(int(str(at_us))),
        source=str(source),
    )


def get_entry(conn: Conn, address: str) -> ConsentEntry | None:
    """The registry's row for *address* (any of its forms), or None."""
    for form in recipient_forms(address):
        row = conn.execute(
            "SELECT address, state, at_us, source FROM consent WHERE address = ?", (form,)
        ).fetchone()
        if row is not None:
            return _entry(row)
    return None


def iter_entries(
    conn: Conn, *, state: ConsentState | None = None, page_rows: int = 5000
) -> Iterator[ConsentEntry]:
    """Every entry (of *state*), by address, read *page_rows* at a time (keyset paging)."""
    after = ""
    where = "" if state is None else " AND state = ?"
    while True:
        params: tuple[Any, ...] = (after, page_rows) if state is None else (after, state, page_rows)
        rows = conn.execute(
            "SELECT address, state, at_us, source FROM consent"  # noqa: S608 - constant
            f" WHERE address > ?{where} ORDER BY address LIMIT ?",
            params,
        ).fetchall()
        if not rows:
            return
        for row in rows:
            yield _entry(row)
        after = str(rows[-1][0])


def count_entries(conn: Conn) -> dict[str, int]:
    """``{"denied": n, "granted": n}``."""
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    for state, count in conn.execute("SELECT state, count(*) FROM consent GROUP BY state"):
        counts[str(state)] = int(count)
    return counts


def parse_csv(
    text: str, *, default_state: ConsentState | None = None
) -> Iterator[tuple[str, ConsentState]]:
    """``(address, state)`` pairs from CSV text.

    Either one address per row (first column; *default_state* for all), or a
    header row naming ``address`` and ``state`` columns (as :func:`export_csv`
    writes; other columns ignored).  Blank lines and rows starting with ``#``
    are skipped.

    :raises ValueError: naming the line, when a row has no valid address or
        state, or when no state is known.
    """
    reader = csv.reader(io.StringIO(text))
    address_col, state_col = 0, None
    for number, row in enumerate(reader, 1):
        cells = [cell.strip() for cell in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        lowered = [cell.lower() for cell in cells]
        if number == 1 and "address" in lowered:
            address_col = lowered.index("address")
            state_col = lowered.index("state") if "state" in lowered else None
            continue
        try:
            address = cells[address_col]
            state: str | None = default_state
            if state_col is not None and state_col < len(cells) and cells[state_col]:
                state = cells[state_col].lower()
            if state is None:
                raise ValueError("no state: give --state or a state column")
            if state not in STATES:
                raise ValueError(f"{state!r} is not a consent state ({', '.join(STATES)})")
            yield canonical_address(address), "denied" if state == "denied" else "granted"
        except (ValueError, IndexError) as exc:
            raise ValueError(f"line {number}: {exc}") from None


def export_csv(entries: Iterable[ConsentEntry], out: io.TextIOBase | object) -> int:
    """Write *entries* as CSV (header ``address,state,at,source``) to *out*; returns the rows."""
    writer = csv.writer(out, lineterminator="\n")  # type: ignore[arg-type]
    writer.writerow(["address", "state", "at", "source"])
    count = 0
    for entry in entries:
        row = entry.to_dict()
        writer.writerow([row["address"], row["state"], row["at"], row["source"]])
        count += 1
    return count


# -- objection links ---------------------------------------------------------------------


def add_optout_link(
    conn: Conn,
    token: str,
    tracking_id: str,
    recipients: Sequence[str],
    *,
    created_us: int | None = None,
) -> None:
    """Keep the objection link *token* of message *tracking_id* sent to *recipients*.

    :raises sqlite3.Error: when it cannot be written.
    """
    conn.execute(
        "INSERT INTO optout_links (token, tracking_id, recipients, created_us)"
        " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (
            token,
            tracking_id,
            json.dumps(list(dict.fromkeys(r.lower() for r in recipients))),
            now_us() if created_us is None else Instant.of(created_us),
        ),
    )


def find_optout_link(conn: Conn, token: str) -> OptoutLink | None:
    """The objection link with *token*, or None (unknown, pruned or forgotten)."""
    row = conn.execute(
        "SELECT tracking_id, recipients, created_us FROM optout_links WHERE token = ?", (token,)
    ).fetchone()
    if row is None:
        return None
    return OptoutLink(
        token=token,
        tracking_id=str(row[0]),
        recipients=tuple(str(r) for r in json.loads(row[1])),
        created=from_us(int(row[2])),
    )


def object_via_link(
    conn: Conn, token: str, index: int, nonce: str, *, at_us: int | None = None
) -> str | None:
    """Record ``denied`` for recipient *index* of link *token*, spending form token *nonce*.

    One transaction: the nonce is spent (a second use is refused) and the
    state set with source ``optout-link``; spent nonces older than
    :data:`FORM_TTL_S` are dropped.

    :returns: the address now denied, or None when the link or recipient is
        unknown or *nonce* was already spent (nothing written).
    :raises sqlite3.Error: when the database cannot be written.
    """
    at_us = now_us() if at_us is None else Instant.of(at_us)
    with write_transaction(conn):
        link = find_optout_link(conn, token)
        if link is None or not 0 <= index < len(link.recipients):
            return None
        spent = conn.execute(
            "INSERT INTO optout_used (nonce, used_us) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (nonce, at_us),
        ).rowcount
        if spent != 1:
            return None
        conn.execute(
            "DELETE FROM optout_used WHERE used_us < ?", (at_us - 2 * FORM_TTL_S * 1_000_000,)
        )
        address = canonical_address(link.recipients[index])
        conn.execute(
            "INSERT INTO consent (address, state, at_us, source) VALUES (?, 'denied', ?, ?)"
            " ON CONFLICT (address) DO UPDATE SET state = excluded.state,"
            " at_us = excluded.at_us, source = excluded.source",
            (address, at_us, "optout-link"),
        )
    return address


def forget_address(conn: Conn, address: str) -> dict[str, int]:
    """Remove what names *address* here, but an objection.

    The objection links naming it go, and a ``granted`` row; a ``denied``
    row stays: it is what keeps the person untracked (and holds nothing
    but the address, the state, when and from where).

    :returns: ``{"optout_links": n, "consent": n}`` rows deleted.
    """
    forms = recipient_forms(address)
    marks = ", ".join("?" * len(forms))
    # recipients is a JSON array as json.dumps writes it: each form, quoted and
    # escaped the same way, is a substring of it (LIKE's own characters escaped)
    likes = ["%" + _like_escape(json.dumps(form)) + "%" for form in forms]
    matches = " OR ".join("recipients LIKE ? ESCAPE '!'" for _ in likes)
    with write_transaction(conn):
        links = conn.execute(
            f"DELETE FROM optout_links WHERE {matches}",  # noqa: S608 - marks only
            likes,
        ).rowcount
        granted = conn.execute(
            f"DELETE FROM consent WHERE state = 'granted' AND address IN ({marks})",  # noqa: S608
            forms,
        ).rowcount
    return {"optout_links": links, "consent": granted}


def _like_escape(text: str) -> str:
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


# -- the async registry ------------------------------------------------------------------


class ConsentRegistry:
    """The registry and the objection links, for the relay and the pixel listener.

    Keeps one connection of its own on one thread of its own: to
    ``DATA_DIR/tracker.sqlite3`` (which the store created and migrated), or,
    given *connect*, to the PostgreSQL store (:func:`.backends.open_registry`).  The
    connection is opened at the first call and opened again after a failure,
    so a store repaired (or a server back) while running is used again.

    :param data_dir: the data directory (SQLite).
    :param busy_timeout_s: how long a statement waits for another writer's lock.
    :param suspended: why the store is suspended (it could not be opened at
        start): then the database is never touched, every call raises
        :class:`StoreError`, and the relay tracks nobody (``consent-unavailable``).
    :param connect: instead of *data_dir*: opens a connection and gives it with
        the function that closes it.
    :raises ValueError: unless exactly one of *data_dir* and *connect* is given.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        busy_timeout_s: float = 5.0,
        suspended: str | None = None,
        connect: Callable[[], tuple[Conn, Callable[[], None]]] | None = None,
    ) -> None:
        if (data_dir is None) == (connect is None):
            raise ValueError("give data_dir or connect")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.suspended = suspended
        self._busy_timeout_s = busy_timeout_s
        self._connect = connect or self._connect_sqlite
        self._conn: Conn | None = None
        self._close: Callable[[], None] = lambda: None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="consent")
        self._closed = False

    def _connect_sqlite(self) -> tuple[Conn, Callable[[], None]]:
        assert self.data_dir is not None
        path = self.data_dir / DB_FILENAME
        if not path.is_file():
            raise StoreError(f"no tracking store at {path}")
        conn = sqlite3.connect(
            path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            if schema_version(conn) < CONSENT_SCHEMA_VERSION:
                raise StoreError(f"{path} has no consent tables (schema older than v6)")
        except BaseException:
            conn.close()
            raise
        return conn, conn.close

    def _connection(self) -> Conn:
        if self.suspended is not None:  # left as it is, for recovery
            raise StoreError(self.suspended)
        if self._conn is None:
            self._conn, self._close = self._connect()
        return self._conn

    def _call(self, op: Callable[[Conn], _T]) -> _T:
        try:
            return op(self._connection())
        except (StoreError, ValueError):
            raise
        except Exception as exc:  # sqlite3.Error, psycopg.Error: a fresh connection next time
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._close()
                self._conn = None
            raise StoreError(f"consent registry: {exc}") from exc

    async def _run(self, op: Callable[[Conn], _T]) -> _T:
        if self._closed:
            raise StoreError("the consent registry is closed")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._call(op)
        )

    async def states(self, addresses: Sequence[str]) -> Mapping[str, ConsentState]:
        """See :func:`states_of`.

        :raises StoreError: when the registry cannot be read.
        """
        wanted = list(addresses)
        return await self._run(lambda conn: states_of(conn, wanted))

    async def set_states(self, entries: Sequence[tuple[str, ConsentState]], *, source: str) -> int:
        """See :func:`set_states`.

        :raises ValueError: when an address or state is invalid.
        :raises StoreError: when the registry cannot be written.
        """
        batch = list(entries)
        return await self._run(lambda conn: set_states(conn, batch, source=source))

    async def add_optout_link(
        self, token: str, tracking_id: str, recipients: Sequence[str]
    ) -> None:
        """See :func:`add_optout_link`.

        :raises StoreError: when it cannot be written.
        """
        wanted = list(recipients)
        await self._run(lambda conn: add_optout_link(conn, token, tracking_id, wanted))

    async def find_optout_link(self, token: str) -> OptoutLink | None:
        """See :func:`find_optout_link`.

        :raises StoreError: when the store cannot be read.
        """
        return await self._run(lambda conn: find_optout_link(conn, token))

    async def object_via_link(self, token: str, index: int, nonce: str) -> str | None:
        """See :func:`object_via_link`.

        :raises StoreError: when the store cannot be written.
        """
        return await self._run(lambda conn: object_via_link(conn, token, index, nonce))

    async def aclose(self) -> None:
        """Close the connection and the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=False)
