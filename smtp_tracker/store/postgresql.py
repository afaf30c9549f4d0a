"""The PostgreSQL backend of the tracking store (``store = "postgresql://user@host/db"``).

For several relays and pixel endpoints on several hosts sharing one store
(issue 14).  psycopg 3 with a bounded :class:`psycopg_pool.ConnectionPool`;
each call borrows a connection in one of as many worker threads as the pool
has connections, so the report queries of :mod:`.queries` are the very
functions SQLite runs (the dialect differences live in :class:`PgConnection`:
``?`` placeholders become ``%s``).

Several writers at once
    Every write is one transaction.  Recording events locks the messages'
    rows (``SELECT ... FOR UPDATE``, in id order, so two writers never wait
    on each other in a circle) before their counters change, and the
    ``daily_stats`` rollup grows by ``INSERT ... ON CONFLICT DO UPDATE SET
    n = daily_stats.n + excluded.n`` (rows in sorted key order): no update is
    lost however many relays and pixel endpoints write.

Faults
    A call fails with :class:`~smtp_tracker.errors.StoreError` within
    *timeout_s* when the server is down or slow (the pool's wait and libpq's
    ``connect_timeout``); callers fail open (the relay relays, the pixel
    endpoint serves its GIF, counting the drop).  The first failure of an
    outage is logged as an error, the recovery as a warning, nothing in
    between; :attr:`PostgresStore.degraded` says why while it lasts.  Broken
    connections are dropped by the pool and new ones made when the server is
    back: writing resumes by itself.

Passwords
    Never in the DSN of a configuration file or flag: libpq reads
    ``PGPASSWORD``, ``PGPASSFILE`` or ``~/.pgpass``, or *password_file* (the
    ``store_password_file`` key) names a file holding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import urlsplit

from smtp_tracker.errors import StoreError
from smtp_tracker.store import consent, pg_outbox, pg_schema, queries, reclassify, retention
from smtp_tracker.store.address import AddressPolicy, IpPolicy
from smtp_tracker.store.integrity import StoreSuspendedError
from smtp_tracker.store.records import (
    ClickEvent,
    EventClassifier,
    EventKind,
    LinkRecord,
    MessageRecord,
    OpenEvent,
    StoredMessage,
    unclassified,
)
from smtp_tracker.store.rows import (
    MESSAGE_COLUMNS,
    ORDER,
    KnownTokens,
    MessageState,
    add_to_rollup,
    count_message,
    event_rows,
    link_rows,
    listing_clauses,
    message_from_row,
    message_row,
    recipient_rows,
    to_us,
    with_events,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = [
    "PgConnection",
    "PgDatabase",
    "PostgresStore",
    "ServerCheck",
    "StoreUnavailableError",
    "check_server",
    "is_dsn",
    "redacted",
]

log = logging.getLogger("smtp_tracker.store")

_T = TypeVar("_T")
_COPY_OPENS = (
    "COPY opens (tracking_id, at_us, ip, user_agent, verdict, verdict_reason, signals) FROM STDIN"
)
_COPY_CLICKS = (
    "COPY clicks (link_token, tracking_id, at_us, ip, user_agent, verdict, verdict_reason,"
    " signals) FROM STDIN"
)
#: The ids of the first messages of ``{select}`` (in ``{order}``) whose rows add up to at
#: most the batch size, or the first message alone (SQLite's ``retention._BATCH``): each
#: message counts for itself, its events (its counters), its recipients and its links.
#: Parameters: those of ``{select}``, then the batch size twice.
_BATCH = """
SELECT id FROM (
    SELECT id, row_number() OVER w AS n, sum(
        1 + open_count + click_count + json_array_length(recipients::json)
        + (SELECT count(*) FROM links WHERE links.tracking_id = candidate.tracking_id)
    ) OVER w AS rows_so_far
    FROM ({select} ORDER BY {order} LIMIT ?) AS candidate
    WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)
) AS batch
WHERE n = 1 OR rows_so_far <= ?
"""
_CANDIDATES = "SELECT id, tracking_id, relayed_at_us, open_count, click_count, recipients"
_OLDER = _BATCH.format(
    select=f"{_CANDIDATES} FROM messages WHERE relayed_at_us < ?", order="relayed_at_us, id"
)
_OF_RECIPIENT = _BATCH.format(
    select=f"{_CANDIDATES} FROM messages WHERE id IN"  # noqa: S608 - constants
    " (SELECT message_rowid FROM message_recipients WHERE address = ANY(?))",
    order="id",
)

#: Seconds a call waits for a connection (and libpq for the server) before it fails.
DEFAULT_TIMEOUT_S = 3.0
#: Seconds between two tries of the server during an outage (calls between fail at once).
RETRY_INTERVAL_S = 1.0
#: Connections (and worker threads) per process.
DEFAULT_POOL_SIZE = 4


class StoreUnavailableError(StoreSuspendedError):
    """The PostgreSQL server does not answer: an outage, logged once by the store.

    A :class:`~.integrity.StoreSuspendedError`, so callers count it without a
    line of their own (the relay relays, the event writer drops the opens).
    """


def is_dsn(store: str | None) -> bool:
    """Whether *store* (the ``store`` key) names a PostgreSQL server rather than a path."""
    return store is not None and store.startswith(("postgresql://", "postgres://"))


def redacted(dsn: str) -> str:
    """*dsn* without a password, for logs and errors."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_dsn(dsn: str) -> None:
    """Refuse a DSN carrying a password (it belongs in ``PGPASSFILE`` or ``store_password_file``).

    :raises ValueError: when *dsn* has a password or is not a ``postgresql://`` URL.
    """
    if not is_dsn(dsn):
        raise ValueError(f"not a postgresql:// URL: {redacted(dsn)!r}")
    parts = urlsplit(dsn)
    if parts.password is not None or "password=" in parts.query:
        raise ValueError(
            "the store's DSN must not hold the password: use PGPASSFILE, ~/.pgpass, "
            "PGPASSWORD or store_password_file"
        )


def _address_policy(dsn: str, ip_policy: IpPolicy, hash_key: bytes | None) -> AddressPolicy:
    """The address policy of *ip_policy* once *dsn* is found fit to open.

    :raises StoreError: when *dsn* holds a password or is not a PostgreSQL URL, or
        *ip_policy* is unknown or ``hash`` without a key of 16 bytes or more.
    """
    try:
        check_dsn(dsn)
        return AddressPolicy(ip_policy, hash_key=hash_key)
    except ValueError as exc:
        raise StoreError(str(exc)) from None


def _connect_kwargs(password_file: Path | None, timeout_s: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": max(1, round(timeout_s))}
    if password_file is not None:
        try:
            kwargs["password"] = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StoreError(
                f"cannot read store_password_file {password_file}: {exc.strerror}"
            ) from None
    return kwargs


@functools.lru_cache(maxsize=512)
def _dialect(sql: str) -> str:
    """*sql* written for :mod:`sqlite3` (``?`` placeholders) as psycopg takes it (``%s``)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """A psycopg connection speaking the shared queries' dialect (:class:`.base.Connection`)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, parameters: Any = (), /) -> psycopg.Cursor[Any]:
        """Run *sql* (``?`` placeholders) with *parameters*; the cursor."""
        return self.raw.execute(_dialect(sql), parameters)

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A transaction block (psycopg's ``Connection.transaction``)."""
        return self.raw.transaction()


# -- schema --------------------------------------------------------------------------------


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The database's schema version; 0 when it holds no store yet."""
    row = conn.execute("SELECT to_regclass('smtp_tracker_schema')").fetchone()
    if row is None or row[0] is None:
        return 0
    found = conn.execute("SELECT version FROM smtp_tracker_schema").fetchone()
    return 0 if found is None else int(found[0])


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Create or migrate the schema to :data:`.pg_schema.CURRENT_VERSION`; the version before.

    Under an advisory lock, so that several processes starting at once create it once.

    :raises StoreError: when the database's schema is newer than this code.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(74617263)")
        version = schema_version(conn)
        if version > pg_schema.CURRENT_VERSION:
            raise StoreError(
                f"the store's schema is v{version}, newer than this smtp-tracker"
                f" (v{pg_schema.CURRENT_VERSION})"
            )
        if version == 0:
            for statement in pg_schema.BASELINE:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO smtp_tracker_schema (one, version) VALUES (1, %s)",
                (pg_schema.BASELINE_VERSION,),
            )
            conn.execute("INSERT INTO webhook_outbox_state (one, depth, dropped) VALUES (1, 0, 0)")
            version_before, version = 0, pg_schema.BASELINE_VERSION
        else:
            version_before = version
        for number in sorted(pg_schema.MIGRATIONS):
            if number > version:
                for statement in pg_schema.MIGRATIONS[number]:
                    conn.execute(statement)
                conn.execute("UPDATE smtp_tracker_schema SET version = %s", (number,))
                version = number
        for statement in pg_schema.VIEWS:
            conn.execute(statement)
    return version_before


@dataclass(frozen=True)
class ServerCheck:
    """What :func:`check_server` found (``smtp-tracker store check`` on PostgreSQL)."""

    #: the DSN without a password
    where: str
    #: the schema version; ``None`` when the server could not be asked
    schema_version: int | None
    #: what is wrong, one line each; empty when sound
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether the store is sound: reached, at this code's schema, writable."""
        return not self.problems

    def lines(self) -> list[str]:
        """The report as text lines, for the command line (as SQLite's report)."""
        head = f"{self.where}: {'ok' if self.ok else 'DAMAGED'}"
        schema = "unreadable" if self.schema_version is None else f"v{self.schema_version}"
        return [head, f"  schema: {schema}", *(f"  problem: {p}" for p in self.problems)]


def check_server(
    dsn: str, *, password_file: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ServerCheck:
    """Check a PostgreSQL store without changing it: a connection, the schema
    version (:data:`.pg_schema.CURRENT_VERSION`), and a trivial write read back
    (``smtp_tracker_schema`` updated to its own value and read in a transaction
    that is rolled back, so a read-only server or a role without write rights
    is found).

    :raises StoreError: when *dsn* holds a password or is not a PostgreSQL URL,
        or *password_file* cannot be read.
    """
    import psycopg

    try:
        check_dsn(dsn)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    where = redacted(dsn)
    try:
        conn = psycopg.connect(dsn, **_connect_kwargs(password_file, timeout_s))
    except psycopg.Error as exc:
        return ServerCheck(where, None, (f"cannot connect: {_reason(exc)}",))
    with conn:
        try:
            version = schema_version(conn)
        except psycopg.Error as exc:
            return ServerCheck(where, None, (f"cannot read the schema: {_reason(exc)}",))
        if version == 0:
            return ServerCheck(where, 0, ("no tracking store in this database",))
        problems: list[str] = []
        if version != pg_schema.CURRENT_VERSION:
            relation = "newer" if version > pg_schema.CURRENT_VERSION else "older"
            problems.append(
                f"schema v{version} is {relation} than this smtp-tracker's"
                f" (v{pg_schema.CURRENT_VERSION})"
            )
        try:
            conn.execute("BEGIN")
            try:
                conn.execute("UPDATE smtp_tracker_schema SET version = version")
                read = conn.execute("SELECT version FROM smtp_tracker_schema").fetchone()
            finally:
                conn.execute("ROLLBACK")
            if read is None or int(read[0]) != version:
                problems.append("a write was not read back")
        except psycopg.Error as exc:
            problems.append(f"cannot write: {_reason(exc)}")
        return ServerCheck(where, version, tuple(problems))


# -- the blocking core ------------------------------------------------------------------


@dataclass
class _Options:
    store_subject: bool
    address_policy: AddressPolicy
    classifier: EventClassifier
    tracking_mode: str = "per-person"
    aggregate_per_message: bool = False
    link_retention_days: int = 1825
    #: told of each record and event inside the transaction that writes it (webhooks)
    outbox: pg_outbox.PgOutboxHook | None = None


class PgDatabase:
    """The blocking store over one PostgreSQL connection (the CLI's; the async store's calls).

    The methods are those of :class:`~.sqlite.SqliteDatabase` the CLI and the
    async store use, with the same meaning.  Open with :meth:`open`; a context
    manager (closes on exit).
    """

    def __init__(self, conn: psycopg.Connection[Any], options: _Options) -> None:
        self._raw = conn
        self._conn = PgConnection(conn)
        self._options = options

    @classmethod
    def open(
        cls,
        dsn: str,
        *,
        store_subject: bool = False,
        ip_policy: IpPolicy = "truncate",
        hash_key: bytes | None = None,
        password_file: Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        migrate_schema: bool = True,
        create: bool = True,
        classifier: EventClassifier = unclassified,
    ) -> PgDatabase:
        """Connect to *dsn* and (by default) create or migrate the schema.

        :param create: make the schema in a database without one; when false such a
            database is an error, as a missing SQLite store is (the read-only CLI
            commands: a mistyped database name must not get the store's tables).
        :raises StoreError: when the server cannot be reached, the DSN holds a
            password, the database holds no store and *create* or *migrate_schema*
            is false, or the schema is newer than this code.
        """
        import psycopg

        policy = _address_policy(dsn, ip_policy, hash_key)
        try:
            conn = psycopg.connect(dsn, **_connect_kwargs(password_file, timeout_s))
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {redacted(dsn)}: {_reason(exc)}") from exc
        try:
            if (not migrate_schema or not create) and schema_version(conn) == 0:
                raise StoreError(f"no tracking store in {redacted(dsn)}")
            if migrate_schema:
                migrate(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"cannot open {redacted(dsn)}: {_reason(exc)}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, _Options(store_subject, policy, classifier))

    @property
    def connection(self) -> PgConnection:
        """The connection in the shared queries' dialect."""
        return self._conn

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._raw.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------------

    def record_message(self, record: MessageRecord) -> None:
        """See :meth:`.base.Store.record_message`."""
        import psycopg

        options = self._options
        aggregate = options.tracking_mode == "aggregate"
        record, row = message_row(
            record,
            aggregate=aggregate,
            per_message=options.aggregate_per_message,
            store_subject=options.store_subject,
        )
        relayed_us, domain = row[7], row[-1]
        conn = self._conn
        try:
            with self._raw.transaction():
                inserted = conn.execute(
                    f"INSERT INTO messages ({MESSAGE_COLUMNS}, sender_domain)"  # noqa: S608 - constant
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                    row,
                ).fetchone()
                assert inserted is not None
                rowid = inserted[0]
                with self._raw.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO message_recipients (message_rowid, address) VALUES (%s, %s)",
                        recipient_rows(rowid, record),
                    )
                    cursor.executemany(
                        "INSERT INTO links (token, tracking_id, url, position, relayed_at_us)"
                        " VALUES (%s, %s, %s, %s, %s)",
                        link_rows(record, relayed_us),
                    )
                count_message(conn, record, domain, relayed_us, aggregate=aggregate)
                if options.outbox is not None:
                    options.outbox.message_recorded(conn, record)
        except psycopg.errors.UniqueViolation as exc:
            raise StoreError(f"tracking id {record.tracking_id} is already recorded") from exc
        except psycopg.Error as exc:
            raise StoreError(f"cannot record message {record.queue_id}: {_reason(exc)}") from exc

    def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        """See :meth:`.base.Store.record_opens`."""
        return self._record_events("open", hits)

    def record_clicks(self, hits: Sequence[ClickEvent]) -> int:
        """See :meth:`.base.Store.record_clicks`."""
        return self._record_events("click", hits)

    def _record_events(
        self, kind: EventKind, hits: Sequence[OpenEvent] | Sequence[ClickEvent]
    ) -> int:
        """As :meth:`.sqlite.SqliteDatabase._record_events`, safe beside other writers.

        The messages' rows are locked (``FOR UPDATE``, id order) before their
        counters are read, so two endpoints recording opens of one message
        serialise on it; the rollup grows by atomic upserts.
        """
        import psycopg

        if not hits:
            return 0
        options = self._options
        aggregate = options.tracking_mode == "aggregate"
        conn = self._conn
        try:
            with self._raw.transaction():
                owners: dict[str, str] = {}
                if kind == "click":
                    tokens = sorted({h.link_token for h in hits if isinstance(h, ClickEvent)})
                    owners = {
                        str(t): str(m)
                        for t, m in conn.execute(
                            "SELECT token, tracking_id FROM links WHERE token = ANY(?)", (tokens,)
                        )
                    }
                wanted = sorted(
                    {
                        owners.get(h.link_token, "") if isinstance(h, ClickEvent) else h.tracking_id
                        for h in hits
                    }
                    - {""}
                )
                messages = {
                    str(row[0]): MessageState(row[1:])
                    for row in conn.execute(
                        MessageState.SELECT_BY_TRACKING_IDS.format("SELECT unnest(?::text[])")
                        + " ORDER BY id FOR UPDATE",
                        (wanted,),
                    )
                }
                rows = event_rows(
                    kind,
                    hits,
                    owners,
                    messages,
                    classify=options.classifier,
                    apply=options.address_policy.apply,
                    aggregate=aggregate,
                )
                if rows and not aggregate:  # COPY: one round trip for the batch
                    with (
                        self._raw.cursor() as cursor,
                        cursor.copy(_COPY_CLICKS if kind == "click" else _COPY_OPENS) as copy,
                    ):
                        for event in rows:
                            copy.write_row(event)
                self._save(messages.values())
                if options.outbox is not None:  # last: the outbox's lock is the last taken
                    options.outbox.events_recorded(conn, kind, rows)
        except psycopg.Error as exc:
            raise StoreError(f"cannot record {len(hits)} {kind}s: {_reason(exc)}") from exc
        return len(rows)

    def _save(self, states: Iterable[MessageState]) -> None:
        """The locked messages' new counters, then the rollup's increments in key order."""
        updates, rollup = MessageState.changes(states)
        if updates:  # one statement for the batch: arrays of the new counters
            columns = list(zip(*updates, strict=True))
            self._raw.execute(
                "UPDATE messages AS m SET open_count = v.o, counted_open_count = v.co,"
                " first_open_at_us = v.f, click_count = v.c, counted_click_count = v.cc"
                " FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[],"
                " %s::bigint[], %s::bigint[]) AS v(o, co, f, c, cc, id) WHERE m.id = v.id",
                [list(column) for column in columns],
            )
        for (day, domain), counts in sorted(rollup.items()):
            add_to_rollup(self._conn, day, domain, counts)

    # -- reads --------------------------------------------------------------------------

    def _read(self, query: Callable[[], _T]) -> _T:
        """Run *query* in one read-only snapshot (``REPEATABLE READ``)."""
        import psycopg

        try:
            with self._raw.transaction():
                self._raw.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return query()
        except psycopg.Error as exc:
            raise StoreError(f"cannot read the store: {_reason(exc)}") from exc

    def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`.base.Store.find_message` (look-ups of :func:`.queries.ident_candidates`)."""

        def query() -> StoredMessage | None:
            for column, value in queries.ident_candidates(ident):
                row = self._conn.execute(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE {column} = ? {ORDER} LIMIT 1",  # noqa: S608 - constants
                    (value,),
                ).fetchone()
                if row is not None:
                    return self._with_events([message_from_row(row)])[0]
            return None

        return self._read(query)

    def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`.base.Store.list_messages`."""
        where, tail, params = listing_clauses(since, limit)
        sql = f"SELECT {MESSAGE_COLUMNS} FROM messages {where} {ORDER} {tail}"  # noqa: S608 - constants

        def query() -> list[StoredMessage]:
            rows = self._conn.execute(sql, params).fetchall()
            return self._with_events([message_from_row(row) for row in rows])

        return self._read(query)

    def _with_events(self, records: list[MessageRecord]) -> list[StoredMessage]:
        ids = [record.tracking_id for record in records]
        return with_events(self._conn, records, "tracking_id = ANY(?)", (ids,))

    def is_known_token(self, tracking_id: str) -> bool:
        """See :meth:`.base.Store.is_known_token`."""
        return self._read(
            lambda: (
                self._conn.execute(
                    "SELECT 1 FROM messages WHERE tracking_id = ?", (tracking_id,)
                ).fetchone()
                is not None
            )
        )

    def find_link(self, token: str) -> tuple[LinkRecord, str] | None:
        """See :meth:`.base.Store.find_link`."""
        row = self._read(
            lambda: self._conn.execute(
                "SELECT url, position, tracking_id FROM links WHERE token = ?", (token,)
            ).fetchone()
        )
        if row is None:
            return None
        return LinkRecord(token=token, url=row[0], position=int(row[1])), str(row[2])

    # -- reports: the shared queries ------------------------------------------------------

    def query_messages(
        self,
        message_filter: queries.MessageFilter,
        *,
        limit: int = queries.DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> queries.MessagePage:
        """See :func:`.queries.query_messages`."""
        return self._read(
            lambda: queries.query_messages(self._conn, message_filter, limit=limit, cursor=cursor)
        )

    def query_message(self, ident: str) -> queries.MessageDetail | None:
        """See :func:`.queries.query_message`."""
        return self._read(lambda: queries.query_message(self._conn, ident))

    def query_stats(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        group: queries.StatsGroup = "day",
    ) -> list[queries.StatsRow]:
        """See :func:`.queries.query_stats`."""
        return self._read(
            lambda: queries.query_stats(self._conn, since=since, until=until, group=group)
        )

    def export_rows(
        self, message_filter: queries.MessageFilter, *, page_rows: int = queries.MAX_LIMIT
    ) -> Iterator[queries.MessageSummary]:
        """Every message *message_filter* selects, newest first, one page per read."""
        yield from queries.pages(
            lambda cursor: self.query_messages(message_filter, limit=page_rows, cursor=cursor)
        )

    # -- retention ---------------------------------------------------------------------------

    def _delete_messages(
        self, select_ids: str, params: Sequence[Any], failure: str, needles: Sequence[str] = ()
    ) -> retention.Removed:
        """Delete the messages whose ids *select_ids* gives, whole, in one transaction;
        with *needles*, their links whose destination holds one (forget).

        :raises StoreError: ``"{failure}: {reason}"`` when the store cannot be written
            (the transaction rolled back).
        """
        import psycopg

        conn = self._conn
        try:
            with self._raw.transaction():
                named = conn.execute(
                    f"SELECT id, tracking_id, queue_id FROM messages WHERE id IN ({select_ids})"  # noqa: S608 - constant selects
                    " ORDER BY id FOR UPDATE",
                    params,
                ).fetchall()
                if not named:
                    return retention.Removed()
                ids = [int(row[0]) for row in named]
                tracking = [str(row[1]) for row in named]
                counts = {
                    "opens": conn.execute(
                        "DELETE FROM opens WHERE tracking_id = ANY(?)", (tracking,)
                    ).rowcount,
                    "clicks": conn.execute(
                        "DELETE FROM clicks WHERE tracking_id = ANY(?)", (tracking,)
                    ).rowcount,
                    "recipients": conn.execute(
                        "DELETE FROM message_recipients WHERE message_rowid = ANY(?)", (ids,)
                    ).rowcount,
                }
                messages = conn.execute("DELETE FROM messages WHERE id = ANY(?)", (ids,)).rowcount
                if needles:
                    counts["links"] = conn.execute(
                        "DELETE FROM links WHERE tracking_id = ANY(?) AND EXISTS (SELECT 1 FROM"
                        " unnest(?::text[]) AS n(v) WHERE strpos(lower(links.url), n.v) > 0)",
                        (tracking, list(needles)),
                    ).rowcount
        except psycopg.Error as exc:
            raise StoreError(f"{failure}: {_reason(exc)}") from exc
        queue_ids = tuple(str(row[2]) for row in named) if needles else ()
        return retention.Removed(messages=messages, queue_ids=queue_ids, **counts)

    def prune_batch(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """The oldest messages relayed before *before*, as many as fit in about
        *batch_rows* rows with their events, links and recipients (at least one);
        once none is left, the webhook outbox's events created before it (as SQLite's
        :func:`.retention.prune_batch`)."""
        retention.check_batch(batch_rows)
        removed = self._delete_messages(
            _OLDER, (to_us(before), batch_rows, batch_rows), "cannot prune the store"
        )
        if removed.messages:
            return removed
        before_us = to_us(before)
        events = self._drop_outbox_events(
            lambda: pg_outbox.older_events(self._conn, before_us, batch_rows), batch_rows
        )
        return retention.Removed(outbox_events=events)

    def _drop_outbox_events(self, select: Callable[[], list[int]], limit: int | None) -> int:
        """Delete the webhook outbox events *select* names (read under the outbox's lock,
        :func:`.pg_outbox.lock_state`), one transaction per round, again while a round
        removes *limit* (None: one round).

        :raises StoreError: when the store cannot be written.
        """
        import psycopg

        total = 0
        try:
            while True:
                with self._raw.transaction():
                    pg_outbox.lock_state(self._conn)
                    gone = pg_outbox.drop_events(self._conn, select())
                total += gone
                if limit is None or gone < limit:
                    return total
        except psycopg.Error as exc:
            raise StoreError(f"cannot remove webhook events: {_reason(exc)}") from exc

    def prune_links_batch(
        self, *, now: datetime | None = None, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> int:
        """Links older than ``link_retention_days`` whose message record is gone."""
        import psycopg

        days = self._options.link_retention_days
        if days <= 0:
            return 0
        cutoff = to_us((now or datetime.now(UTC)) - timedelta(days=days))
        try:
            with self._raw.transaction():
                return retention.delete_old_links(self._conn, cutoff, batch_rows)
        except psycopg.Error as exc:
            raise StoreError(f"cannot prune the store's links: {_reason(exc)}") from exc

    def prune(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """Every message relayed before *before*, with its events, links and recipients."""
        total = retention.Removed()
        while (removed := self.prune_batch(before, batch_rows=batch_rows)).messages:
            total += removed
        total += removed  # the last: the webhook outbox's old events
        while links := self.prune_links_batch(batch_rows=batch_rows):
            total += retention.Removed(links=links)
        return total

    def count_prunable(self, before: datetime) -> retention.Removed:
        """What :meth:`prune` would delete (links left aside)."""
        counted = self._count("SELECT id FROM messages WHERE relayed_at_us < ?", (to_us(before),))
        events = self._read(lambda: pg_outbox.count_older(self._conn, to_us(before)))
        return dataclasses.replace(counted, outbox_events=events)

    def _count(self, select_ids: str, params: Sequence[Any]) -> retention.Removed:
        row = self._read(
            lambda: self._conn.execute(
                f"WITH sel AS (SELECT id, tracking_id FROM messages WHERE id IN ({select_ids}))"  # noqa: S608 - constant selects
                " SELECT (SELECT count(*) FROM sel),"
                " (SELECT count(*) FROM opens WHERE tracking_id IN (SELECT tracking_id FROM sel)),"
                " (SELECT count(*) FROM clicks WHERE tracking_id IN (SELECT tracking_id FROM sel)),"
                " (SELECT count(*) FROM message_recipients WHERE message_rowid IN"
                " (SELECT id FROM sel))",
                params,
            ).fetchone()
        )
        assert row is not None
        messages, opens, clicks, recipients = (int(v) for v in row)
        return retention.Removed(
            messages=messages, opens=opens, clicks=clicks, recipients=recipients
        )

    def forget_recipient(
        self, address: str, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """Every message sent to *address* (any of :func:`.retention.recipient_forms`), whole."""
        retention.check_batch(batch_rows)
        forms = retention.recipient_forms(address)
        total = retention.Removed()
        while (
            removed := self._delete_messages(
                _OF_RECIPIENT,
                (forms, batch_rows, batch_rows),
                f"cannot forget {address}",
                retention.needles(address),
            )
        ).messages:
            total += removed
        total += retention.Removed(
            outbox_events=self._drop_outbox_events(
                lambda: pg_outbox.events_naming(self._conn, address), None
            )
        )
        import psycopg

        try:  # objection links naming the address and a grant; an objection itself stays
            consent.forget_address(self._conn, address)
        except psycopg.Error as exc:
            raise StoreError(f"cannot forget {address}: {_reason(exc)}") from exc
        return total

    def count_recipient(self, address: str) -> retention.Removed:
        """What :meth:`forget_recipient` would delete, queue ids and links naming it included."""
        forms = retention.recipient_forms(address)
        select = "SELECT message_rowid FROM message_recipients WHERE address = ANY(?)"
        counted = self._count(select, (forms,))

        def named() -> tuple[list[Any], int]:
            rows = self._conn.execute(
                f"SELECT tracking_id, queue_id FROM messages WHERE id IN ({select})"  # noqa: S608 - constant
                " ORDER BY id",
                (forms,),
            ).fetchall()
            links = self._conn.execute(
                "SELECT count(*) FROM links WHERE tracking_id = ANY(?) AND EXISTS (SELECT 1"
                " FROM unnest(?::text[]) AS n(v) WHERE strpos(lower(links.url), n.v) > 0)",
                ([str(row[0]) for row in rows], retention.needles(address)),
            ).fetchone()
            return rows, int(links[0]) if links else 0

        rows, links = self._read(named)
        events = len(self._read(lambda: pg_outbox.events_naming(self._conn, address)))
        return dataclasses.replace(
            counted, links=links, queue_ids=tuple(str(row[1]) for row in rows), outbox_events=events
        )

    # -- reclassification (smtp_tracker.store.reclassify) ------------------------------

    def reclassify_scope(self, since: date | None) -> tuple[int, list[str]]:
        """As :meth:`.sqlite.SqliteDatabase.reclassify_scope`.

        :raises StoreError: when the store cannot be read.
        """
        return self._read(
            lambda: (
                reclassify.count_messages(self._conn, since),
                reclassify.days_from(self._conn, since),
            )
        )

    def reclassify_batch(
        self,
        *,
        since: date | None = None,
        after_rowid: int = 0,
        batch_messages: int = reclassify.DEFAULT_BATCH_MESSAGES,
    ) -> reclassify.Batch:
        """See :func:`.reclassify.reclassify_batch` (the messages' rows locked, as the
        writers lock them), with this store's classifier.

        :raises StoreError: when the store cannot be written.
        """
        import psycopg

        try:
            return reclassify.reclassify_batch(
                self._conn,
                self._options.classifier,
                since=since,
                after_rowid=after_rowid,
                batch_messages=batch_messages,
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot reclassify: {_reason(exc)}") from exc

    def rebuild_rollup_day(self, day: str) -> reclassify.DayRebuild:
        """See :func:`.reclassify.rebuild_rollup_day` (``daily_stats`` locked against writers).

        :raises StoreError: when the store cannot be written.
        """
        import psycopg

        try:
            return reclassify.rebuild_rollup_day(self._conn, day)
        except psycopg.Error as exc:
            raise StoreError(f"cannot rebuild the daily counts of {day}: {_reason(exc)}") from exc

    def integrity_check(self) -> str:
        """``"ok"`` when the server answers (PostgreSQL checks its own pages)."""
        return self._read(lambda: "ok" if self._conn.execute("SELECT 1").fetchone() else "no")


def _reason(exc: BaseException) -> str:
    """One line naming what went wrong (the server's message, first line)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- the async store ---------------------------------------------------------------------


@dataclass
class PgCounters:
    """What the store counts about its own health.

    :ivar failures: calls that failed because the server was down, slow or refused.
    :ivar outages: outages seen (a failure after a success).
    """

    failures: int = 0
    outages: int = 0
    health_checks: int = 0
    suspended_calls: int = 0
    health_failures: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class PostgresStore:
    """The async :class:`~.base.ReportingStore` over a bounded psycopg connection pool.

    Open with ``await PostgresStore.open(dsn, ...)``; close with :meth:`aclose`
    or ``async with``.  Positive :meth:`is_known_token` answers are cached as
    :class:`~.sqlite.SqliteStore` does.
    """

    def __init__(
        self,
        dsn: str,
        pool: psycopg_pool.ConnectionPool[Any],
        executor: ThreadPoolExecutor,
        options: _Options,
        *,
        known_cache_size: int = 4096,
    ) -> None:
        self.dsn = dsn
        self._pool = pool
        self._executor = executor
        self._options = options
        self._known = KnownTokens(known_cache_size)
        self._closed = False
        self._outage: str | None = None
        self._retry_at = 0.0
        self._timeout_s = DEFAULT_TIMEOUT_S
        self._lock = threading.Lock()
        self.counters = PgCounters()
        #: never set: a PostgreSQL store is not suspended, it waits for its server
        self.suspended: str | None = None

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        store_subject: bool = False,
        ip_policy: IpPolicy = "truncate",
        hash_key: bytes | None = None,
        password_file: Path | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        known_cache_size: int = 4096,
        classifier: EventClassifier = unclassified,
        require_server: bool = True,
    ) -> PostgresStore:
        """Open a pool on *dsn*, creating or migrating the schema when the server answers.

        :param pool_size: connections (and threads) at most, >= 1.
        :param timeout_s: seconds a call waits for a connection before failing.
        :param require_server: when false, a server down at start is logged
            (the first outage) and the store opens anyway: mail flows and the
            schema is made when the server comes (``serve``, ``pixel``).
        :raises StoreError: when the DSN holds a password, or (with
            *require_server*) the server cannot be reached or migrated.
        """
        from psycopg_pool import ConnectionPool

        # the pool logs each failed reconnection; the store logs an outage once
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        policy = _address_policy(dsn, ip_policy, hash_key)
        kwargs = _connect_kwargs(password_file, timeout_s)
        pool: ConnectionPool[Any] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs=kwargs,
            timeout=timeout_s,
            open=False,
            check=ConnectionPool.check_connection,
            reconnect_timeout=timeout_s * 4,
            name="smtp-tracker-store",
        )
        executor = ThreadPoolExecutor(max(1, pool_size), thread_name_prefix="store-pg")
        store = cls(
            dsn,
            pool,
            executor,
            _Options(store_subject, policy, classifier),
            known_cache_size=known_cache_size,
        )
        store._timeout_s = timeout_s
        await asyncio.get_running_loop().run_in_executor(executor, lambda: pool.open(wait=False))
        store._migrated = False
        try:
            await store._ensure_schema()
        except StoreError:
            if require_server:
                await store.aclose()
                raise
        return store

    _migrated: bool = False

    async def _ensure_schema(self) -> None:
        if not self._migrated:
            await self._call(lambda db: migrate(db._raw), migrate_first=False)
            self._migrated = True

    @property
    def degraded(self) -> str | None:
        """None while the server answers; else why records are not being kept (one line)."""
        return self._outage

    @property
    def data_dir(self) -> None:
        """No data directory: the store is on a server."""
        return None

    def set_tracking_mode(
        self, mode: str, *, per_message: bool = False, link_retention_days: int = 1825
    ) -> None:
        """As :meth:`.sqlite.SqliteStore.set_tracking_mode`."""
        if mode not in ("per-person", "aggregate"):
            raise ValueError(f"tracking_mode must be per-person or aggregate, got {mode!r}")
        self._options.tracking_mode = mode
        self._options.aggregate_per_message = per_message
        self._options.link_retention_days = link_retention_days

    def set_outbox(self, hook: pg_outbox.PgOutboxHook | None) -> None:
        """Have *hook* told of each record and event inside the transaction that writes
        it (the webhook outbox, :mod:`.pg_outbox`); None: no longer."""
        self._options.outbox = hook

    # -- plumbing -----------------------------------------------------------------------

    def _run_sync(self, call: Callable[[PgDatabase], _T]) -> _T:
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn:
                result = call(PgDatabase(conn, self._options))
        except PoolTimeout as exc:
            self._failed(f"no connection within {self._timeout_s:g} s")
            raise StoreUnavailableError(
                f"the store at {redacted(self.dsn)} does not answer"
            ) from exc
        except StoreError as exc:
            if _is_outage(exc):
                self._failed(_reason(exc.__cause__ or exc))
                raise StoreUnavailableError(str(exc)) from exc.__cause__
            raise
        except Exception as exc:
            import psycopg

            if isinstance(exc, psycopg.OperationalError):
                self._failed(_reason(exc))
                raise StoreUnavailableError(f"the store failed: {_reason(exc)}") from exc
            if isinstance(exc, psycopg.Error):
                raise StoreError(f"the store failed: {_reason(exc)}") from exc
            raise
        self._succeeded()
        return result

    def _failed(self, reason: str) -> None:
        with self._lock:
            self.counters.failures += 1
            self._retry_at = time.monotonic() + RETRY_INTERVAL_S
            if self._outage is None:
                self.counters.outages += 1
                self._outage = f"store: PostgreSQL unavailable ({reason})"
                log.error(
                    "TRACKING STORE UNAVAILABLE: %s; mail is relayed but not recorded and "
                    "opens are dropped (counted) until it is back (logged once per outage)",
                    self._outage,
                )

    def _succeeded(self) -> None:
        if self._outage is None:
            return
        with self._lock:
            if self._outage is not None:
                log.warning(
                    "tracking store back after an outage: recording again (%d calls failed)",
                    self.counters.failures,
                )
                self._outage = None

    async def _call(self, call: Callable[[PgDatabase], _T], *, migrate_first: bool = True) -> _T:
        if self._closed:
            raise StoreError("the tracking store is closed")
        if self._outage is not None and time.monotonic() < self._retry_at:
            # fail fast while the server is away: one call tries it again each interval
            with self._lock:
                self.counters.failures += 1
            raise StoreUnavailableError(self._outage)
        if migrate_first and not self._migrated:
            await self._ensure_schema()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._run_sync(call)
        )

    async def aclose(self) -> None:
        """Close the pool and its threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._pool.close)
        self._executor.shutdown(wait=False)
        if self.counters.failures:
            log.warning("tracking store closed: %s", self.counters)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the Store ----------------------------------------------------------------------

    async def record_message(self, record: MessageRecord) -> None:
        """See :meth:`.base.Store.record_message`."""
        to_us(record.relayed_at)
        to_us(record.received_at)
        await self._call(lambda db: db.record_message(record))

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        """See :meth:`.base.Store.record_opens`."""
        batch = list(hits)
        return await self._call(lambda db: db.record_opens(batch))

    async def record_clicks(self, hits: Sequence[ClickEvent]) -> int:
        """See :meth:`.base.Store.record_clicks`."""
        batch = list(hits)
        return await self._call(lambda db: db.record_clicks(batch))

    async def find_link(self, token: str) -> tuple[LinkRecord, str] | None:
        """See :meth:`.base.Store.find_link`."""
        return await self._call(lambda db: db.find_link(token))

    async def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`.base.Store.find_message`."""
        return await self._call(lambda db: db.find_message(ident))

    async def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`.base.Store.list_messages`."""
        if since is not None:
            to_us(since)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return await self._call(lambda db: db.list_messages(since=since, limit=limit))

    async def is_known_token(self, tracking_id: str) -> bool:
        """See :meth:`.base.Store.is_known_token`; positive answers are cached."""
        if self._known.hit(tracking_id):
            return True
        known = await self._call(lambda db: db.is_known_token(tracking_id))
        if known:
            self._known.add(tracking_id)
        return known

    async def integrity_check(self) -> str:
        """``"ok"`` when the server answers."""
        return await self._call(lambda db: db.integrity_check())

    async def check_health(self) -> str | None:
        """Ask the server now; :attr:`degraded` follows the answer."""
        self.counters.health_checks += 1
        with contextlib.suppress(StoreError):
            await self._call(lambda db: db.integrity_check())
        return self.degraded

    async def query_messages(
        self,
        message_filter: queries.MessageFilter,
        *,
        limit: int = queries.DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> queries.MessagePage:
        """See :func:`.queries.query_messages`."""
        queries.check_limit(limit)
        return await self._call(
            lambda db: db.query_messages(message_filter, limit=limit, cursor=cursor)
        )

    async def query_message(self, ident: str) -> queries.MessageDetail | None:
        """See :func:`.queries.query_message`."""
        return await self._call(lambda db: db.query_message(ident))

    async def query_stats(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        group: queries.StatsGroup = "day",
    ) -> list[queries.StatsRow]:
        """See :func:`.queries.query_stats`."""
        return await self._call(lambda db: db.query_stats(since=since, until=until, group=group))

    async def prune(
        self, before: datetime, *, batch_rows: int = retention.DEFAULT_BATCH_ROWS
    ) -> retention.Removed:
        """See :meth:`PgDatabase.prune`; one batch per call, so writers run between them."""
        to_us(before)
        total = retention.Removed()
        try:
            while (
                removed := await self._call(
                    lambda db: db.prune_batch(before, batch_rows=batch_rows)
                )
            ).messages:
                total += removed
            total += removed  # the last: the webhook outbox's old events
            while links := await self._call(lambda db: db.prune_links_batch(batch_rows=batch_rows)):
                total += retention.Removed(links=links)
            return total
        finally:
            self._known.clear()


def _is_outage(exc: StoreError) -> bool:
    """Whether *exc* came from the server being away (not from a bad record)."""
    import psycopg

    cause = exc.__cause__
    return isinstance(cause, psycopg.OperationalError | psycopg.errors.AdminShutdown)
