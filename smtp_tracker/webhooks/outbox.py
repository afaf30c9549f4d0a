"""The outbox: events kept in the store until every target has them.

Tables (schema v5, :mod:`smtp_tracker.store.migrations`):

``webhook_events``
    One row per event: ``seq`` (the order written), ``id`` (UUIDv7), ``type``,
    ``created_us``, ``body`` (the JSON).  Deleted with its last delivery.
``webhook_deliveries``
    One row per event and target (a webhook's name, or ``events_log``):
    ``state`` ``pending`` or ``dead``, ``attempts``, ``due_us`` (the next
    attempt, or the end of a claim), ``since_us`` (the start of its retry
    window), ``order_key`` (the message) and ``last_error``.
``webhook_hooks``
    Hooks disabled by a ``410 Gone``.
``webhook_outbox_state``
    One row: ``depth`` (events in the outbox; SQLite keeps it by triggers) and
    ``dropped`` (events not written because the outbox was full).

Events are written by :class:`Outbox` inside the store's own transaction (the
message record, the batch of opens or clicks): a crash either keeps both or
neither.  A failure to write them costs only the events (a savepoint is rolled
back, logged once, counted): never the record, never the mail.

The functions below run on a connection in autocommit mode, each in one
transaction (SQLite's ``BEGIN IMMEDIATE``); they are blocking (run them in a
thread).

Both backends
    Every function takes a :class:`sqlite3.Connection` (:func:`connect`) or a
    PostgreSQL store's :class:`~smtp_tracker.store.postgresql.PgConnection`
    (:func:`connect_postgresql`), with the same meaning.  On PostgreSQL,
    several processes (relays, pixel endpoints, ``webhooks send``) write and
    deliver one outbox at once: :func:`claim` takes deliveries with ``SELECT
    ... FOR UPDATE SKIP LOCKED`` and moves them past a lease in the same
    transaction, so two senders never hold one delivery at once; ``depth`` is
    kept by the code instead of triggers, every change of the events taking the
    state row's lock first (:func:`smtp_tracker.store.pg_outbox.lock_state`),
    so the bound holds however many processes write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from smtp_tracker.store import pg_outbox
from smtp_tracker.store.instant import Instant, from_us
from smtp_tracker.store.integrity import DB_FILENAME
from smtp_tracker.store.migrations import MIGRATIONS, immediate_transaction
from smtp_tracker.store.records import COUNTED_VERDICTS, MessageRecord
from smtp_tracker.webhooks.events import Event

if TYPE_CHECKING:
    from smtp_tracker.store.postgresql import PgConnection

#: A connection to the outbox: SQLite's own, or a PostgreSQL store's (``?`` placeholders).
Conn: TypeAlias = "sqlite3.Connection | PgConnection"

__all__ = [
    "Claimed",
    "Conn",
    "HookStatus",
    "Outbox",
    "OutboxStatus",
    "Settled",
    "any_due",
    "claim",
    "connect",
    "connect_postgresql",
    "db_errors",
    "disable_hook",
    "disabled_hooks",
    "list_failed",
    "next_due",
    "outbox_depth",
    "repair",
    "retry",
    "settle",
    "status",
    "transaction",
]

log = logging.getLogger("smtp_tracker.webhooks")

#: A target: its name and whether it takes an event of a type (and counted or not).
Target = tuple[str, Callable[[str, bool], bool]]


def connect(data_dir: Path, *, busy_timeout_s: float = 5.0) -> sqlite3.Connection:
    """A connection of its own to the store in *data_dir* (autocommit; the store made it WAL).

    :raises sqlite3.Error: when it cannot be opened.
    """
    conn = sqlite3.connect(
        data_dir / DB_FILENAME,
        timeout=busy_timeout_s,
        isolation_level=None,
        check_same_thread=False,
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def connect_postgresql(
    dsn: str, *, password_file: Path | None = None, timeout_s: float = 10.0, create: bool = True
) -> PgConnection:
    """A connection of its own to the PostgreSQL store *dsn* (autocommit), its schema
    migrated first (and created, with *create*); close it with ``conn.raw.close()``.

    :raises StoreError: when the server cannot be reached, the DSN holds a
        password, the schema is newer than this code, or (without *create*) the
        database holds no store.
    """
    from smtp_tracker.store.postgresql import PgDatabase

    return PgDatabase.open(
        dsn, password_file=password_file, timeout_s=timeout_s, create=create
    ).connection


def db_errors(conn: Conn) -> tuple[type[Exception], ...]:
    """What the database of *conn* raises when it fails (sqlite3's or psycopg's errors)."""
    if isinstance(conn, sqlite3.Connection):
        return (sqlite3.Error,)
    import psycopg

    return (psycopg.Error,)


def transaction(conn: Conn) -> contextlib.AbstractContextManager[Any]:
    """One write transaction: SQLite's ``BEGIN IMMEDIATE``, or psycopg's (a savepoint
    when one is open)."""
    if isinstance(conn, sqlite3.Connection):
        return immediate_transaction(conn)
    return conn.transaction()


class Outbox:
    """Writes events to the outbox in the caller's transaction; the store calls it.

    :param targets: the webhooks (and ``events_log``) with their filters.
    :param max_events: the most events the outbox holds; beyond, new events
        are dropped and counted (:attr:`dropped`, and ``dropped`` in the
        outbox's state row).
    :param on_written: called (from the writing thread) after events were
        written, to wake the sender.

    Counters: :attr:`written`, :attr:`dropped` (the outbox full), :attr:`failed`
    (events lost because writing them raised).
    """

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        max_events: int,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        self._targets = list(targets)
        self._max_events = max_events
        self.on_written = on_written
        #: hooks disabled by a 410 (the sender keeps it current)
        self.disabled: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._full = False
        self._failing = False
        self.written = 0
        self.dropped = 0
        self.failed = 0

    # -- the store's hooks (called in its writer thread, inside its transaction) --------

    def message_recorded(self, conn: Conn, record: MessageRecord) -> None:
        """``message.relayed`` for *record*, in the transaction that records it."""
        if not self._targets:
            return
        event = Event.make(
            "message.relayed",
            occurred_at=record.relayed_at,
            tracking_id=record.tracking_id,
            queue_id=record.queue_id,
            message_id=record.message_id,
            sender=record.sender,
            recipients=list(record.recipients),
            tracked=bool(record.tracked),
            not_tracked_reason=record.not_tracked_reason,
            size_bytes=int(record.size_bytes),
            upstream_reply=record.upstream_reply,
        )
        self.add(conn, [event])

    def events_recorded(self, conn: Conn, kind: str, rows: Sequence[Sequence[Any]]) -> None:
        """``message.opened`` or ``link.clicked`` for each row the store inserts.

        Called in the same transaction: by SQLite before the messages' counters
        are updated, by PostgreSQL after (so that the outbox's lock is the last
        its writers take, :mod:`smtp_tracker.store.pg_outbox`); ``first`` is
        worked out from the counters as they were before the batch either way.

        :param kind: ``"open"`` or ``"click"``.
        :param rows: as inserted: opens ``(tracking_id, at_us, ip, user_agent,
            verdict, verdict_reason, signals)``; clicks ``(link_token,
            tracking_id, at_us, ...)`` (the same after the token).
        """
        if not self._targets or not rows:
            return
        saved = not isinstance(conn, sqlite3.Connection)
        self._write(conn, lambda: _hit_events(conn, kind, rows, counters_saved=saved), len(rows))

    # -- writing ---------------------------------------------------------------------

    def add(self, conn: Conn, events: Iterable[Event]) -> int:
        """Write *events* for the targets that want them, inside the caller's transaction.

        Never raises: a failure rolls back these events alone (a savepoint),
        is logged once and counted in :attr:`failed`.

        :returns: how many events were written.
        """
        events = list(events)
        return self._write(conn, lambda: events, len(events))

    def _write(self, conn: Conn, build: Callable[[], list[Event]], count: int) -> int:
        """Build the events and insert them in a savepoint; a failure of either costs
        *count* events, logged once and counted, never the caller's transaction."""
        written = 0
        try:
            if isinstance(conn, sqlite3.Connection):
                conn.execute("SAVEPOINT webhook_outbox")
                try:
                    written = self._insert(conn, build())
                except BaseException:
                    conn.execute("ROLLBACK TO webhook_outbox")
                    raise
                finally:
                    conn.execute("RELEASE webhook_outbox")
            else:
                with conn.transaction():  # nested in the store's: a savepoint
                    written = self._insert(conn, build())
        except Exception as exc:
            if not isinstance(exc, (*db_errors(conn), ValueError, TypeError)):
                raise
            self._lost(count, exc)
            return 0
        with self._lock:
            self.written += written
            self._failing = False
        if written and self.on_written is not None:
            self.on_written()
        return written

    def _insert(self, conn: Conn, events: list[Event]) -> int:
        disabled = self.disabled
        wanted: list[tuple[Event, list[str]]] = []
        for event in events:
            targets = [
                name
                for name, wants in self._targets
                if name not in disabled and wants(event.type, event.counted)
            ]
            if targets:
                wanted.append((event, targets))
        if not wanted:
            return 0
        if isinstance(conn, sqlite3.Connection):
            written, dropped = _insert_sqlite(conn, wanted, self._max_events)
        else:
            written, dropped = _insert_postgresql(conn, wanted, self._max_events)
        if dropped:
            with self._lock:
                self.dropped += dropped
                first = not self._full
                self._full = True
            if first:
                log.error(
                    "webhook outbox full (webhook_outbox_max_events = %d): new events are "
                    "dropped and counted until the receivers catch up ('smtp-tracker "
                    "webhooks status')",
                    self._max_events,
                )
        elif written:
            with self._lock:
                if self._full:
                    log.warning("webhook outbox has room again; events are kept again")
                self._full = False
        return written

    def count_failed(self, count: int = 1) -> None:
        """Add *count* to :attr:`failed` under the lock the outbox's own writes take
        (the sender counts from its writer thread and from the event loop)."""
        with self._lock:
            self.failed += count

    def _lost(self, count: int, exc: BaseException) -> None:
        with self._lock:
            self.failed += count
            first = not self._failing
            self._failing = True
        if first:
            log.error(
                "webhook outbox: %d events not written (%s); records and mail go on",
                count,
                exc,
            )


def _insert_sqlite(
    conn: sqlite3.Connection, wanted: list[tuple[Event, list[str]]], max_events: int
) -> tuple[int, int]:
    """Insert each event of *wanted* with a delivery per target, while the outbox
    has room (the triggers keep ``depth``); the events written and dropped."""
    depth = outbox_depth(conn)
    written = dropped = 0
    for event, targets in wanted:
        if depth >= max_events:
            dropped += 1
            continue
        created_us = event.occurred_us
        seq = conn.execute(
            "INSERT INTO webhook_events (id, type, created_us, body) VALUES (?, ?, ?, ?)",
            (event.id, event.type, created_us, event.body),
        ).lastrowid
        conn.executemany(
            "INSERT INTO webhook_deliveries (hook, seq, order_key, due_us, since_us)"
            " VALUES (?, ?, ?, ?, ?)",
            [(name, seq, event.order_key, created_us, created_us) for name in targets],
        )
        depth += 1
        written += 1
    if dropped:
        conn.execute("UPDATE webhook_outbox_state SET dropped = dropped + ?", (dropped,))
    return written, dropped


def _insert_postgresql(
    conn: PgConnection, wanted: list[tuple[Event, list[str]]], max_events: int
) -> tuple[int, int]:
    """As :func:`_insert_sqlite`, on PostgreSQL: room is taken under the state row's
    lock (held to the end of the record's transaction, so several writers never
    overfill the outbox), and the events and deliveries go in one statement each,
    the events' ``seq`` in the order written."""
    depth = pg_outbox.lock_state(conn)
    kept = wanted[: max(0, max_events - depth)]
    dropped = len(wanted) - len(kept)
    if kept:
        events = [event for event, _ in kept]
        seqs = {
            str(event_id): int(seq)
            for seq, event_id in conn.execute(
                "INSERT INTO webhook_events (id, type, created_us, body)"
                " SELECT i, t, c, b FROM unnest(?::text[], ?::text[], ?::timestamptz[], ?::text[])"
                " WITH ORDINALITY AS v(i, t, c, b, n) ORDER BY n RETURNING seq, id",
                (
                    [e.id for e in events],
                    [e.type for e in events],
                    [e.occurred_us for e in events],
                    [e.body for e in events],
                ),
            )
        }
        deliveries = [
            (name, seqs[event.id], event.order_key, event.occurred_us)
            for event, targets in kept
            for name in targets
        ]
        hooks, seq_list, keys, times = (list(column) for column in zip(*deliveries, strict=True))
        conn.execute(
            "INSERT INTO webhook_deliveries (hook, seq, order_key, due_us, since_us)"
            " SELECT h, s, k, t, t FROM unnest(?::text[], ?::bigint[], ?::text[], ?::timestamptz[])"
            " AS v(h, s, k, t)",
            (hooks, seq_list, keys, times),
        )
    conn.execute(
        "UPDATE webhook_outbox_state SET depth = depth + ?, dropped = dropped + ?",
        (len(kept), dropped),
    )
    return len(kept), dropped


def _hit_events(
    conn: Conn, kind: str, rows: Sequence[Sequence[Any]], *, counters_saved: bool = False
) -> list[Event]:
    """The events of *rows*; with *counters_saved*, the messages' counters already
    count the batch's counted events (taken off again to find each ``first``)."""
    click = kind == "click"
    hits = [tuple(row[1:]) for row in rows] if click else [tuple(row) for row in rows]
    tokens = [str(row[0]) for row in rows] if click else []
    ids = sorted({str(hit[0]) for hit in hits})
    marks = ", ".join("?" * len(ids))
    messages = {
        str(r[0]): r
        for r in conn.execute(
            "SELECT tracking_id, queue_id, message_id, sender, recipients, counted_open_count,"  # noqa: S608 - marks
            f" counted_click_count FROM messages WHERE tracking_id IN ({marks})",
            ids,
        )
    }
    links: dict[str, tuple[str, int]] = {}
    if click:
        token_marks = ", ".join("?" * len(set(tokens)))
        links = {
            str(r[0]): (str(r[1]), int(r[2]))
            for r in conn.execute(
                f"SELECT token, url, position FROM links WHERE token IN ({token_marks})",  # noqa: S608
                sorted(set(tokens)),
            )
        }
    counted_before = {tid: int(m[6] if click else m[5]) for tid, m in messages.items()}
    if counters_saved:
        for hit in hits:
            if hit[4] in COUNTED_VERDICTS and str(hit[0]) in counted_before:
                counted_before[str(hit[0])] -= 1
    events = []
    for index, (tracking_id, at_us, ip, user_agent, verdict, reason, *_rest) in enumerate(hits):
        message = messages.get(str(tracking_id))
        if message is None:
            continue
        counted = verdict in COUNTED_VERDICTS
        first = counted and counted_before[str(tracking_id)] == 0
        if counted:
            counted_before[str(tracking_id)] += 1
        extra: dict[str, Any] = {}
        if click:
            url, position = links.get(tokens[index], ("", -1))
            extra["link"] = {"position": position, "url": url}
        events.append(
            Event.make(
                "link.clicked" if click else "message.opened",
                occurred_at=from_us(int(at_us)),
                tracking_id=str(tracking_id),
                queue_id=str(message[1]),
                message_id=message[2],
                sender=str(message[3]),
                recipients=list(json.loads(message[4])),
                counted=counted,
                verdict=verdict,
                verdict_reason=reason,
                first=first,
                ip=ip,
                user_agent=user_agent,
                **extra,
            )
        )
    return events


# -- the sender's side and the CLI's -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """One delivery taken for an attempt."""

    hook: str
    seq: int
    event_id: str
    body: str
    attempts: int
    since_us: int
    created_us: int
    order_key: str = ""
    due_us: int = 0


@dataclass(frozen=True, slots=True)
class Settled:
    """What became of one attempt.

    :ivar outcome: ``"delivered"``, ``"retry"`` (at *due_us*), ``"dead"``, or
        ``"release"`` (not tried: due again at *due_us*, attempts unchanged).
    """

    hook: str
    seq: int
    outcome: str
    attempts: int = 0
    due_us: int = 0
    error: str | None = None


def repair(conn: Conn) -> int:
    """Make the outbox's bookkeeping sound again; run at the sender's start.

    The triggers are created if missing (SQLite: ``smtp-tracker store recover``
    copies tables and indexes, not triggers), events left without a delivery
    are deleted, and ``depth`` is set to the events counted (on PostgreSQL
    under the state row's lock, so that writers at work are counted exactly).

    :returns: the outbox's depth.
    """
    if not isinstance(conn, sqlite3.Connection):
        with conn.transaction():
            pg_outbox.lock_state(conn)
            conn.execute(
                "DELETE FROM webhook_events e WHERE NOT EXISTS"
                " (SELECT 1 FROM webhook_deliveries d WHERE d.seq = e.seq)"
            )
            conn.execute(
                "UPDATE webhook_outbox_state SET depth = (SELECT count(*) FROM webhook_events)"
            )
        return outbox_depth(conn)
    triggers = [
        statement.replace("CREATE TRIGGER ", "CREATE TRIGGER IF NOT EXISTS ", 1)
        for version in MIGRATIONS
        for statement in version
        if "CREATE TRIGGER webhook_" in statement
    ]
    with immediate_transaction(conn):
        for statement in triggers:
            conn.execute(statement)
        conn.execute(
            "DELETE FROM webhook_events WHERE seq NOT IN (SELECT seq FROM webhook_deliveries)"
        )
        conn.execute(
            "UPDATE webhook_outbox_state SET depth = (SELECT count(*) FROM webhook_events)"
        )
    return outbox_depth(conn)


def claim(conn: Conn, hook: str, *, now_us: int, limit: int, lease_us: int) -> list[Claimed]:
    """Take up to *limit* due deliveries of *hook*, oldest first, keeping each message's order.

    A message's deliveries are taken only as a prefix of its pending ones: none
    while an earlier one of the same message is pending and not due (in
    backoff, or claimed by another sender).  The caller sends each message's
    in order and stops at its first failure (:func:`settle` ``release`` for
    the rest).  Taking a delivery moves its time to ``now + lease``, so that
    another sender (a second process on the same store) leaves it alone while
    it is tried.  SQLite's ``BEGIN IMMEDIATE`` makes claims one at a time; on
    PostgreSQL the rows are locked as they are read (``FOR UPDATE SKIP
    LOCKED``: another sender's claim in flight is passed over, and a row it
    moved past its lease no longer matches ``due_us <= now``), and an earlier
    pending delivery of the same message, locked or not, holds the later back.
    """
    now_us = Instant.of(now_us)
    postgresql = not isinstance(conn, sqlite3.Connection)
    lock = " FOR UPDATE OF d SKIP LOCKED" if postgresql else ""
    with transaction(conn):
        rows = conn.execute(
            "SELECT d.seq, e.id, e.body, d.attempts, d.since_us, e.created_us, d.order_key,"  # noqa: S608 - constant lock clause
            " d.due_us FROM webhook_deliveries d JOIN webhook_events e ON e.seq = d.seq"
            " WHERE d.hook = ? AND d.state = 'pending' AND d.due_us <= ?"
            f" ORDER BY d.seq LIMIT ?{lock}",
            (hook, now_us, limit),
        ).fetchall()
        keys = sorted({str(r[6]) for r in rows})
        pending: dict[str, list[int]] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for key, seq in conn.execute(
                "SELECT order_key, seq FROM webhook_deliveries WHERE hook = ?"  # noqa: S608 - marks
                f" AND state = 'pending' AND order_key IN ({marks}) ORDER BY seq",
                (hook, *chunk),
            ):
                pending.setdefault(str(key), []).append(int(seq))
        taken = []
        position: dict[str, int] = {}
        for row in rows:  # in seq order: each message's rows must be its pending prefix
            key, index = str(row[6]), position.get(str(row[6]), 0)
            if index < 0:
                continue
            if pending[key][index] != int(row[0]):
                position[key] = -1  # an earlier one is not due: none of this message now
                continue
            position[key] = index + 1
            taken.append(row)
        if isinstance(conn, sqlite3.Connection):
            conn.executemany(
                "UPDATE webhook_deliveries SET due_us = ? WHERE hook = ? AND seq = ?",
                [(now_us + lease_us, hook, row[0]) for row in taken],
            )
        elif taken:
            conn.execute(
                "UPDATE webhook_deliveries SET due_us = ? WHERE hook = ? AND seq = ANY(?)",
                (now_us + lease_us, hook, [int(row[0]) for row in taken]),
            )
    return [
        Claimed(
            hook,
            int(r[0]),
            str(r[1]),
            str(r[2]),
            int(r[3]),
            int(r[4]),
            int(r[5]),
            str(r[6]),
            int(r[7]),
        )
        for r in taken
    ]


def any_due(conn: Conn, hook: str, *, now_us: int) -> bool:
    """Whether *hook* has a pending delivery due (maybe behind its message's earlier one);
    a read, without the write lock :func:`claim` takes."""
    now_us = Instant.of(now_us)
    row = conn.execute(
        "SELECT 1 FROM webhook_deliveries WHERE hook = ? AND state = 'pending' AND due_us <= ?"
        " LIMIT 1",
        (hook, now_us),
    ).fetchone()
    return row is not None


def next_due(conn: Conn, hook: str) -> int | None:
    """When the next delivery of *hook* that :func:`claim` could take comes due, or None."""
    row = conn.execute(
        "SELECT min(d.due_us) FROM webhook_deliveries d WHERE d.hook = ? AND d.state = 'pending'"
        " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.hook = d.hook"
        "   AND p.order_key = d.order_key AND p.seq < d.seq AND p.state = 'pending')",
        (hook,),
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def settle(conn: Conn, results: Sequence[Settled]) -> None:
    """Write what became of attempts: delete the delivered, reschedule or bury the rest.

    An event whose last delivery goes is deleted with it (SQLite: a trigger;
    PostgreSQL: here, under the state row's lock, ``depth`` taken down).
    """
    if not results:
        return
    if not isinstance(conn, sqlite3.Connection):
        _settle_postgresql(conn, results)
        return
    with immediate_transaction(conn):
        conn.executemany(
            "DELETE FROM webhook_deliveries WHERE hook = ? AND seq = ?",
            [(r.hook, r.seq) for r in results if r.outcome == "delivered"],
        )
        conn.executemany(
            "UPDATE webhook_deliveries SET attempts = ?, due_us = ?, last_error = ?,"
            " state = CASE WHEN ? THEN 'dead' ELSE 'pending' END WHERE hook = ? AND seq = ?",
            [
                (r.attempts, r.due_us, r.error, r.outcome == "dead", r.hook, r.seq)
                for r in results
                if r.outcome in ("retry", "dead")
            ],
        )
        conn.executemany(
            "UPDATE webhook_deliveries SET due_us = ? WHERE hook = ? AND seq = ?",
            [(r.due_us, r.hook, r.seq) for r in results if r.outcome == "release"],
        )


def _settle_postgresql(conn: PgConnection, results: Sequence[Settled]) -> None:
    delivered = [r for r in results if r.outcome == "delivered"]
    failed = [r for r in results if r.outcome in ("retry", "dead")]
    released = [r for r in results if r.outcome == "release"]
    with conn.transaction():
        if delivered:
            pg_outbox.lock_state(conn)
            conn.execute(
                "DELETE FROM webhook_deliveries d USING unnest(?::text[], ?::bigint[]) AS v(h, s)"
                " WHERE d.hook = v.h AND d.seq = v.s",
                ([r.hook for r in delivered], [r.seq for r in delivered]),
            )
            gone = conn.execute(
                "DELETE FROM webhook_events e WHERE e.seq = ANY(?) AND NOT EXISTS"
                " (SELECT 1 FROM webhook_deliveries d WHERE d.seq = e.seq)",
                (sorted({r.seq for r in delivered}),),
            ).rowcount
            conn.execute("UPDATE webhook_outbox_state SET depth = greatest(depth - ?, 0)", (gone,))
        if failed:
            conn.execute(
                "UPDATE webhook_deliveries d SET attempts = v.a, due_us = v.du, last_error = v.e,"
                " state = CASE WHEN v.dead THEN 'dead' ELSE 'pending' END"
                " FROM unnest(?::text[], ?::bigint[], ?::integer[], ?::timestamptz[], ?::text[],"
                " ?::boolean[]) AS v(h, s, a, du, e, dead) WHERE d.hook = v.h AND d.seq = v.s",
                (
                    [r.hook for r in failed],
                    [r.seq for r in failed],
                    [r.attempts for r in failed],
                    [Instant.of(r.due_us) for r in failed],
                    [r.error for r in failed],
                    [r.outcome == "dead" for r in failed],
                ),
            )
        if released:
            conn.execute(
                "UPDATE webhook_deliveries d SET due_us = v.du"
                " FROM unnest(?::text[], ?::bigint[], ?::timestamptz[]) AS v(h, s, du)"
                " WHERE d.hook = v.h AND d.seq = v.s",
                (
                    [r.hook for r in released],
                    [r.seq for r in released],
                    [Instant.of(r.due_us) for r in released],
                ),
            )


def disable_hook(conn: Conn, hook: str, *, reason: str, now_us: int) -> int:
    """Disable *hook* (it answered 410 Gone): its pending deliveries become dead.

    :returns: how many deliveries became dead.
    """
    now_us = Instant.of(now_us)
    with transaction(conn):
        conn.execute(
            "INSERT INTO webhook_hooks (hook, disabled_at_us, disabled_reason) VALUES (?, ?, ?)"
            " ON CONFLICT (hook) DO UPDATE SET disabled_at_us = excluded.disabled_at_us,"
            " disabled_reason = excluded.disabled_reason",
            (hook, now_us, reason),
        )
        return int(
            conn.execute(
                "UPDATE webhook_deliveries SET state = 'dead', last_error = ?"
                " WHERE hook = ? AND state = 'pending'",
                (reason, hook),
            ).rowcount
        )


def outbox_depth(conn: Conn) -> int:
    """How many events the outbox holds (its kept count; 0 before the first)."""
    row = conn.execute("SELECT depth FROM webhook_outbox_state").fetchone()
    return int(row[0]) if row else 0


def disabled_hooks(conn: Conn) -> frozenset[str]:
    """The hooks a 410 disabled (until ``webhooks retry``)."""
    return frozenset(str(r[0]) for r in conn.execute("SELECT hook FROM webhook_hooks"))


@dataclass(frozen=True, slots=True)
class HookStatus:
    """One target's deliveries: pending, dead, the oldest pending's creation, disabled."""

    hook: str
    pending: int
    dead: int
    oldest_pending_us: int | None
    disabled: str | None


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """The outbox as a whole: events held, events dropped (full), and each target."""

    depth: int
    dropped: int
    hooks: tuple[HookStatus, ...]


def status(conn: Conn) -> OutboxStatus:
    """The outbox's state (one read snapshot; no write lock)."""
    with _snapshot(conn):
        depth, dropped = conn.execute(
            "SELECT depth, dropped FROM webhook_outbox_state"
        ).fetchone() or (0, 0)
        disabled = dict(conn.execute("SELECT hook, disabled_reason FROM webhook_hooks").fetchall())
        rows = conn.execute(
            "SELECT d.hook, sum(CASE WHEN d.state = 'pending' THEN 1 ELSE 0 END),"
            " sum(CASE WHEN d.state = 'dead' THEN 1 ELSE 0 END),"
            " min(CASE WHEN d.state = 'pending' THEN e.created_us END)"
            " FROM webhook_deliveries d JOIN webhook_events e ON e.seq = d.seq GROUP BY d.hook"
        ).fetchall()
    hooks = {
        str(r[0]): HookStatus(
            str(r[0]),
            int(r[1]),
            int(r[2]),
            None if r[3] is None else int(r[3]),
            disabled.get(r[0]),
        )
        for r in rows
    }
    for hook, reason in disabled.items():
        hooks.setdefault(hook, HookStatus(hook, 0, 0, None, reason))
    return OutboxStatus(int(depth), int(dropped), tuple(hooks[h] for h in sorted(hooks)))


@contextlib.contextmanager
def _snapshot(conn: Conn) -> Iterator[None]:
    """One read snapshot: SQLite's deferred transaction, PostgreSQL's ``REPEATABLE READ``."""
    if isinstance(conn, sqlite3.Connection):
        conn.execute("BEGIN")  # deferred: a read transaction, one snapshot
        try:
            yield
        finally:
            conn.execute("COMMIT")
        return
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        yield


def list_failed(conn: Conn, *, limit: int = 100) -> list[dict[str, Any]]:
    """Dead deliveries, oldest first: event id, type, hook, attempts, last error, created."""
    rows = conn.execute(
        "SELECT e.id, e.type, d.hook, d.attempts, d.last_error, e.created_us"
        " FROM webhook_deliveries d JOIN webhook_events e ON e.seq = d.seq"
        " WHERE d.state = 'dead' ORDER BY d.seq LIMIT ?",
        (limit,),
    ).fetchall()
    keys = ("id", "type", "hook", "attempts", "last_error", "created_us")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def retry(conn: Conn, event_id: str | None, *, now_us: int) -> int:
    """Make dead deliveries pending again, due now, with a new retry window.

    :param event_id: one event's id, or None for every dead delivery; every
        hook a 410 disabled is enabled again then.
    :returns: how many deliveries were made pending.
    """
    now_us = Instant.of(now_us)
    with transaction(conn):
        where, params = "state = 'dead'", []
        if event_id is not None:
            where += " AND seq IN (SELECT seq FROM webhook_events WHERE id = ?)"
            params.append(event_id)
            conn.execute(
                "DELETE FROM webhook_hooks WHERE hook IN (SELECT hook FROM webhook_deliveries"  # noqa: S608 - constant
                f" WHERE {where})",
                params,
            )
        else:
            conn.execute("DELETE FROM webhook_hooks")
        return int(
            conn.execute(
                "UPDATE webhook_deliveries SET state = 'pending', attempts = 0,"  # noqa: S608 - constant
                f" last_error = NULL, due_us = ?, since_us = ? WHERE {where}",
                (now_us, now_us, *params),
            ).rowcount
        )
