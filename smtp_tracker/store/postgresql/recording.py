"""The PostgreSQL write path: message records, their recipients and links, and
batches of events, safe beside other writers.

Several writers at once
    Every write is one transaction.  Recording events locks the messages'
    rows (``SELECT ... FOR UPDATE``, in id order, so two writers never wait
    on each other in a circle) before their counters change, and the
    ``daily_stats`` rollup grows by ``INSERT ... ON CONFLICT DO UPDATE SET
    n = daily_stats.n + excluded.n`` (rows in sorted key order): no update is
    lost however many relays and pixel endpoints write.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from smtp_tracker.errors import StoreError
from smtp_tracker.store.postgresql.connection import Connected, error_text
from smtp_tracker.store.records import ClickEvent, EventKind, MessageRecord, OpenEvent
from smtp_tracker.store.rows import (
    MESSAGE_COLUMNS,
    MessageState,
    add_to_rollup,
    count_message,
    event_rows,
    link_rows,
    message_row,
    recipient_rows,
)

__all__ = ["Recording"]

_EVENT_COLUMNS = "at, {ip}, user_agent, verdict, verdict_reason, signals"


def _copy_statement(kind: EventKind, hashed: bool) -> str:
    """COPY of an event batch; the address into ``ip_hash`` when *hashed*, else ``ip_address``."""
    columns = _EVENT_COLUMNS.format(ip="ip_hash" if hashed else "ip_address")
    if kind == "click":
        return f"COPY clicks (link_token, tracking_id, {columns}) FROM STDIN"
    return f"COPY opens (tracking_id, {columns}) FROM STDIN"


class Recording(Connected):
    """The writes of :class:`~.database.PgDatabase`."""

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
                        "INSERT INTO links (token, tracking_id, url, position, relayed_at)"
                        " VALUES (%s, %s, %s, %s, %s)",
                        link_rows(record, relayed_us),
                    )
                count_message(conn, record, domain, relayed_us, aggregate=aggregate)
                if options.outbox is not None:
                    options.outbox.message_recorded(conn, record)
        except psycopg.errors.UniqueViolation as exc:
            raise StoreError(f"tracking id {record.tracking_id} is already recorded") from exc
        except psycopg.Error as exc:
            raise StoreError(f"cannot record message {record.queue_id}: {error_text(exc)}") from exc

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
                    hashed = options.address_policy.policy == "hash"
                    ip = 3 if kind == "click" else 2  # the address's place in a row
                    with (
                        self._raw.cursor() as cursor,
                        cursor.copy(_copy_statement(kind, hashed)) as copy,
                    ):
                        for event in rows:
                            if hashed and event[ip] is not None:
                                event = (*event[:ip], bytes.fromhex(event[ip]), *event[ip + 1 :])
                            copy.write_row(event)
                self._save(messages.values())
                if options.outbox is not None:  # last: the outbox's lock is the last taken
                    options.outbox.events_recorded(conn, kind, rows)
        except psycopg.Error as exc:
            raise StoreError(f"cannot record {len(hits)} {kind}s: {error_text(exc)}") from exc
        return len(rows)

    def _save(self, states: Iterable[MessageState]) -> None:
        """The locked messages' new counters, then the rollup's increments in key order."""
        updates, rollup = MessageState.changes(states)
        if updates:  # one statement for the batch: arrays of the new counters
            columns = list(zip(*updates, strict=True))
            self._raw.execute(
                "UPDATE messages AS m SET open_count = v.o, counted_open_count = v.co,"
                " first_open_at = v.f, click_count = v.c, counted_click_count = v.cc"
                " FROM unnest(%s::bigint[], %s::bigint[], %s::timestamptz[], %s::bigint[],"
                " %s::bigint[], %s::bigint[]) AS v(o, co, f, c, cc, id) WHERE m.id = v.id",
                [list(column) for column in columns],
            )
        for (day, domain), counts in sorted(rollup.items()):
            add_to_rollup(self._conn, day, domain, counts)
