"""The webhook outbox's share of the PostgreSQL store: the hook its write transactions
call, and the outbox events that retention (``prune``) and ``forget`` remove.

The tables are those of SQLite's v5 (:mod:`.migrations`, :mod:`.pg_schema`).
SQLite keeps ``webhook_outbox_state.depth`` with triggers; PostgreSQL's is kept
by the code that adds and removes events (:mod:`smtp_tracker.webhooks.pg_outbox`
and :func:`drop_events` here), each taking the state row's lock
(``SELECT ... FOR UPDATE``) before it changes the events, so that the depth
counted by several processes at once stays exact and two transactions
removing an event's last deliveries never both leave the event behind.

Every function runs in the caller's transaction on a connection of the shared
queries' dialect (:class:`~.postgresql.PgConnection`, ``?`` placeholders).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from smtp_tracker.store.queries import Connection
from smtp_tracker.store.records import EventKind, MessageRecord
from smtp_tracker.store.retention import bodies_naming, body_hints

__all__ = [
    "PgOutboxHook",
    "count_older",
    "drop_events",
    "events_naming",
    "lock_state",
    "older_events",
]


class PgOutboxHook(Protocol):
    """Called inside the PostgreSQL store's write transactions (the webhook outbox);
    :class:`smtp_tracker.webhooks.outbox.Outbox` is one.

    Must not raise: what it writes is its own business (in a savepoint), never
    the record's.
    """

    def message_recorded(self, conn: Any, record: MessageRecord) -> None:
        """*record* was inserted; the transaction is still open."""
        ...

    def events_recorded(self, conn: Any, kind: EventKind, rows: Sequence[Sequence[Any]]) -> None:
        """*rows* (opens or clicks, as :func:`.rows.event_rows` makes them) were inserted
        and the messages' counters and rollups updated; the transaction is still open.

        Last in the transaction, as :meth:`message_recorded` is: the hook locks the
        outbox's state row (:func:`lock_state`), and a writer that took it before the
        rollup rows another writer holds while it waits for the state row would
        deadlock with it.
        """
        ...


def lock_state(conn: Connection) -> int:
    """Lock the outbox's state row until the transaction ends; its ``depth``.

    Every change to the outbox's events takes this lock first (adding, settling,
    pruning), so they never wait on each other in a circle.
    """
    row = conn.execute("SELECT depth FROM webhook_outbox_state FOR UPDATE").fetchone()
    return int(row[0]) if row else 0


def drop_events(conn: Connection, seqs: Sequence[int]) -> int:
    """Delete the events *seqs* with every delivery of theirs, and take them off ``depth``.

    Call :func:`lock_state` first, in the same transaction.

    :returns: the events deleted.
    """
    if not seqs:
        return 0
    batch = sorted({int(seq) for seq in seqs})
    conn.execute("DELETE FROM webhook_deliveries WHERE seq = ANY(?)", (batch,))
    gone = int(conn.execute("DELETE FROM webhook_events WHERE seq = ANY(?)", (batch,)).rowcount)
    conn.execute("UPDATE webhook_outbox_state SET depth = greatest(depth - ?, 0)", (gone,))
    return gone


def older_events(conn: Connection, before_us: int, limit: int) -> list[int]:
    """The ``seq`` of the oldest *limit* events created before *before_us* (µs since the epoch)."""
    return [
        int(row[0])
        for row in conn.execute(
            "SELECT seq FROM webhook_events WHERE created_us < ? ORDER BY seq LIMIT ?",
            (before_us, limit),
        )
    ]


def count_older(conn: Connection, before_us: int) -> int:
    """How many events were created before *before_us* (what prune would remove)."""
    row = conn.execute(
        "SELECT count(*) FROM webhook_events WHERE created_us < ?", (before_us,)
    ).fetchone()
    return int(row[0]) if row else 0


def events_naming(conn: Connection, address: str) -> list[int]:
    """The ``seq`` of each event naming *address*, by the test SQLite's ``forget`` uses
    (:func:`.retention.bodies_naming`), after a first cut in SQL (``strpos``)."""
    query = "SELECT seq, body FROM webhook_events"
    params: tuple[str, ...] = ()
    hints = body_hints(address)
    if hints:
        query += " WHERE strpos(lower(body), ?) > 0 OR strpos(lower(body), ?) > 0"
        params = hints
    return bodies_naming(conn.execute(query, params), address)
