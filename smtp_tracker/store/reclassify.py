"""Judge stored events again with the current rules and lists: ``smtp-tracker reclassify``.

After an upgrade that changed the rules (:mod:`smtp_tracker.classification`)
or a ``smtp-tracker networks import``, the stored verdicts are those of the
old rules.  :func:`reclassify_batch` reads a batch of messages with their
opens and clicks, judges each event again from what was stored of it (the
User-Agent, the time since the relay, the address as ``ip_policy`` kept it,
the signals recorded with it), writes the verdicts, reasons and signals that
changed, sets the message's counters from its event rows, and adjusts the
``daily_stats`` rollup by the difference, all in one ``BEGIN IMMEDIATE``
transaction.  :func:`rebuild_rollup_day` then sets each day's rollup rows to a
count of the stored rows.  Both are short transactions, so they are safe while
``serve`` runs: its writes wait for the lock (the busy timeout) between two
batches, and every write of either side moves counters and rollup together.

The client address, as ``ip_policy`` kept it (issue 19, item 2):

* ``full``: the address is looked up in the current network lists;
* ``truncate``: the network (``192.0.2.0/24``, ``2001:db8:1::/48``) is looked
  up by its first address, which is exact whenever a list's entries are that
  wide or wider (the shipped lists' are);
* ``hash`` or ``none``: nothing to look up; the lists the address was in when
  the event was recorded (its stored signals) stand in, so a newly imported
  list cannot change those verdicts.

Pruned and forgotten messages: :mod:`.retention` leaves their counts in the
rollup on purpose (reports over past days stay the same), so a day that lost
messages keeps its rollup as adjusted by the batches, with only the
differences of the messages still stored; every other day is set to a count
of its rows (:func:`rebuild_rollup_day` says which it did).

On PostgreSQL (issue 14) the same functions run on a
:class:`~.postgresql.PgConnection`: a batch locks its messages' rows
(``SELECT ... FOR UPDATE``, in id order, as the writers do) before reading
their events, and a day's rebuild locks ``daily_stats`` against writers
(``SHARE ROW EXCLUSIVE``) before counting, so no open or click recorded
meanwhile is lost or counted twice.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from smtp_tracker.store.instant import Instant, from_us, to_us
from smtp_tracker.store.queries import ROLLUP_COLUMNS
from smtp_tracker.store.records import (
    COUNTED_VERDICTS,
    VERDICTS,
    EventClassifier,
    EventContext,
    EventKind,
    Verdict,
)
from smtp_tracker.store.rows import add_to_rollup, write_transaction

if TYPE_CHECKING:
    from smtp_tracker.store.queries import Connection

__all__ = [
    "DEFAULT_BATCH_MESSAGES",
    "Batch",
    "DayRebuild",
    "count_messages",
    "days_from",
    "rebuild_rollup_day",
    "reclassify_batch",
    "rollup_from_rows",
    "run",
]

#: Messages (with their events) judged per transaction.
DEFAULT_BATCH_MESSAGES: Final = 200

_DAY_US = 86_400_000_000


@dataclass(frozen=True, slots=True)
class Batch:
    """What one :func:`reclassify_batch` did.

    :param messages: messages read (0: nothing left).
    :param events: open and click events judged.
    :param changed: events whose verdict changed.
    :param last_rowid: ``messages.id`` of the last message read; give it back
        as ``after_rowid``.
    """

    messages: int
    events: int
    changed: int
    last_rowid: int


@dataclass(frozen=True, slots=True)
class DayRebuild:
    """What :func:`rebuild_rollup_day` did for one UTC relay day.

    :param day: ``YYYY-MM-DD``.
    :param rebuilt: sender domains whose rollup row was set to a count of the rows.
    :param kept: sender domains kept as adjusted, because some of their
        messages were pruned or forgotten (their rollup relayed more than is stored).
    """

    day: str
    rebuilt: int
    kept: int


def _is_sqlite(conn: Connection) -> bool:
    return isinstance(conn, sqlite3.Connection)


def _signals_text(signals: Any) -> str | None:
    """The stored signals as JSON text (PostgreSQL's ``jsonb`` is read as Python values)."""
    if signals is None or isinstance(signals, str):
        return signals
    return json.dumps(signals, separators=(",", ":"))


def _us(value: date) -> Instant:
    return to_us(datetime(value.year, value.month, value.day, tzinfo=UTC))


def count_messages(conn: Connection, since: date | None) -> int:
    """How many stored messages were relayed on or after the UTC day *since* (None: all)."""
    if since is None:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    return int(
        conn.execute(
            "SELECT count(*) FROM messages WHERE relayed_at_us >= ?", (_us(since),)
        ).fetchone()[0]
    )


def days_from(conn: Connection, since: date | None) -> list[str]:
    """The UTC relay days (``YYYY-MM-DD``) on or after *since* with messages or rollup rows."""
    start_us = Instant(0) if since is None else _us(since)
    rollup_days = (
        conn.execute("SELECT DISTINCT day FROM daily_stats")
        if since is None
        else conn.execute(
            "SELECT DISTINCT day FROM daily_stats WHERE day >= ?", (since.isoformat(),)
        )
    )
    days = {str(row[0]) for row in rollup_days}
    while True:  # day by day through the (relayed_at_us, id) index: a seek per day
        row = conn.execute(
            "SELECT min(relayed_at_us) FROM messages WHERE relayed_at_us >= ?", (start_us,)
        ).fetchone()
        if row is None or row[0] is None:
            return sorted(days)
        day = from_us(row[0]).date()
        days.add(day.isoformat())
        start_us = _us(day + timedelta(days=1))


def _address_for_lookup(ip: str | None) -> str | None:
    """The address to look up for a stored ``ip`` (an address, a network's first address)."""
    if not ip:
        return None
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        pass
    try:
        return str(ipaddress.ip_network(ip, strict=False).network_address)
    except ValueError:
        return None


def _recorded_networks(signals: str | None) -> frozenset[str]:
    try:
        data: Any = json.loads(signals) if signals else {}
        return frozenset(str(name) for name in data.get("networks", ()))
    except (ValueError, TypeError, AttributeError):
        return frozenset()


def _contribution(
    counted_opens: int, counted_clicks: int, opens_by_verdict: dict[str, int]
) -> dict[str, int]:
    """The verdict-dependent rollup columns one message adds to its day's row."""
    counts = {f"opens_{verdict}": opens_by_verdict.get(verdict, 0) for verdict in VERDICTS}
    counts["opened"] = int(counted_opens > 0 or counted_clicks > 0)
    counts["opened_via_click"] = int(counted_opens == 0 and counted_clicks > 0)
    counts["clicked"] = int(counted_clicks > 0)
    return counts


def reclassify_batch(
    conn: Connection,
    classify: EventClassifier,
    *,
    since: date | None = None,
    after_rowid: int = 0,
    batch_messages: int = DEFAULT_BATCH_MESSAGES,
) -> Batch:
    """Judge again the events of the next *batch_messages* messages, in one transaction.

    Messages relayed on or after the UTC day *since* (None: all), in row order
    after *after_rowid*.  Each event's verdict, reason and signals are set to
    what *classify* says now; the message's counters are set from its rows;
    the ``daily_stats`` row of its relay day and sender domain moves by the
    difference in ``opened``, ``opened_via_click``, ``clicked`` and the opens
    per verdict.  A classifier that raises judges that event ``unknown``
    (``classifier-failed``), as when it is recorded.

    :param conn: a connection in autocommit mode (the writer's).
    :raises sqlite3.Error: (:class:`psycopg.Error` on PostgreSQL) when the store
        cannot be read or written (the batch is rolled back).
    """
    if batch_messages < 1:
        raise ValueError("batch_messages must be at least 1")
    start_us = Instant(0) if since is None else _us(since)
    events = changed = 0
    last = after_rowid
    select = (
        "SELECT id, tracking_id, relayed_at_us, sender_domain FROM messages"
        " WHERE id > ? AND relayed_at_us >= ? ORDER BY id LIMIT ?"
    )
    if not _is_sqlite(conn):  # SQLite's BEGIN IMMEDIATE already keeps the writers out
        select += " FOR UPDATE"  # the writers' row locks, in their (id) order
    with write_transaction(conn):
        messages = conn.execute(
            select,
            (after_rowid, start_us, batch_messages),
        ).fetchall()
        rollup: dict[tuple[str, str], dict[str, int]] = {}
        for rowid, tracking_id, relayed_at_us, domain in messages:
            last = int(rowid)
            relayed_at = from_us(relayed_at_us)
            before: dict[str, int] = {}
            after: dict[str, int] = {}
            counted = {"open": [0, 0], "click": [0, 0]}  # [before, after]
            first_open_us: Instant | None = None
            totals = {"open": 0, "click": 0}
            kinds: tuple[tuple[EventKind, str], ...] = (("open", "opens"), ("click", "clicks"))
            for kind, table in kinds:
                rows = conn.execute(
                    f"SELECT id, at_us, ip, user_agent, verdict, verdict_reason, signals"  # noqa: S608 - constant table names
                    f" FROM {table} WHERE tracking_id = ? ORDER BY id",
                    (tracking_id,),
                ).fetchall()
                updates: list[tuple[Any, ...]] = []
                for event_id, at_us, ip, user_agent, verdict, reason, stored in rows:
                    signals = _signals_text(stored)
                    events += 1
                    totals[kind] += 1
                    new_verdict, new_reason, new_signals = _judge(
                        classify, kind, int(at_us), ip, user_agent, relayed_at, signals
                    )
                    if (new_verdict, new_reason, new_signals) != (verdict, reason, signals):
                        updates.append((new_verdict, new_reason, new_signals, event_id))
                    if new_verdict != verdict:
                        changed += 1
                    counted[kind][0] += verdict in COUNTED_VERDICTS
                    counted[kind][1] += new_verdict in COUNTED_VERDICTS
                    if kind == "open":
                        before[verdict] = before.get(verdict, 0) + 1
                        after[new_verdict] = after.get(new_verdict, 0) + 1
                        if new_verdict in COUNTED_VERDICTS and (
                            first_open_us is None or int(at_us) < first_open_us
                        ):
                            first_open_us = Instant.of(at_us)
                for update in updates:
                    conn.execute(
                        f"UPDATE {table} SET verdict = ?, verdict_reason = ?, signals = ?"  # noqa: S608 - constant table names
                        " WHERE id = ?",
                        update,
                    )
            conn.execute(
                "UPDATE messages SET open_count = ?, counted_open_count = ?,"
                " first_open_at_us = ?, click_count = ?, counted_click_count = ? WHERE id = ?",
                (
                    totals["open"],
                    counted["open"][1],
                    first_open_us,
                    totals["click"],
                    counted["click"][1],
                    rowid,
                ),
            )
            old = _contribution(counted["open"][0], counted["click"][0], before)
            new = _contribution(counted["open"][1], counted["click"][1], after)
            key = (relayed_at.strftime("%Y-%m-%d"), str(domain))
            delta = rollup.setdefault(key, {})
            for column, value in new.items():
                delta[column] = delta.get(column, 0) + value - old[column]
        for (day, domain), delta in sorted(rollup.items()):  # one order: no deadlock
            add_to_rollup(conn, day, domain, delta)
    return Batch(messages=len(messages), events=events, changed=changed, last_rowid=last)


def _judge(
    classify: EventClassifier,
    kind: EventKind,
    at_us: int,
    ip: str | None,
    user_agent: str | None,
    relayed_at: datetime,
    signals: str | None,
) -> tuple[Verdict, str, str | None]:
    address = _address_for_lookup(ip)  # None for a hash (ip_policy hash) or nothing (none)
    looked_up = address is not None
    event = EventContext(
        kind=kind,
        at=from_us(at_us),
        client_address=address if looked_up else None,
        user_agent=user_agent,
        relayed_at=relayed_at,
        networks=None if looked_up else _recorded_networks(signals),
    )
    try:
        judged = classify(event)
        verdict, reason = judged[0], judged[1]
        new_signals = getattr(judged, "signals", None)
    except Exception:  # as when recorded: one event never costs the batch
        return "unknown", "classifier-failed", signals
    if verdict not in VERDICTS:
        return "unknown", f"bad verdict from {reason}", signals
    return verdict, reason, new_signals if new_signals is not None else signals


def rollup_from_rows(conn: Connection, day: str) -> dict[str, dict[str, int]]:
    """The rollup of UTC relay *day* counted from the stored rows: ``{sender domain: {column: n}}``.

    ``opened`` counts messages with a counted open or a counted click,
    ``opened_via_click`` those with a counted click and no counted open
    (:data:`~.records.COUNTED_VERDICTS`), from the event rows themselves.
    """
    start = _us(date.fromisoformat(day))
    marks = ", ".join("?" * len(COUNTED_VERDICTS))
    counted = sorted(COUNTED_VERDICTS)
    result: dict[str, dict[str, int]] = {}
    for row in conn.execute(
        f"""
        WITH m AS (
            SELECT sender_domain, tracked,
                CASE WHEN recipients = '[]' THEN 1 ELSE 0 END AS aggregate,
                (SELECT count(*) FROM opens o WHERE o.tracking_id = messages.tracking_id)
                    AS opens,
                (SELECT count(*) FROM opens o WHERE o.tracking_id = messages.tracking_id
                    AND o.verdict IN ({marks})) AS counted_opens,
                (SELECT count(*) FROM clicks c WHERE c.tracking_id = messages.tracking_id)
                    AS clicks,
                (SELECT count(*) FROM clicks c WHERE c.tracking_id = messages.tracking_id
                    AND c.verdict IN ({marks})) AS counted_clicks
            FROM messages WHERE relayed_at_us >= ? AND relayed_at_us < ?
        )
        SELECT sender_domain, count(*), sum(tracked),
            sum(CASE WHEN counted_opens > 0 OR counted_clicks > 0 THEN 1 ELSE 0 END),
            sum(CASE WHEN opens > 0 THEN 1 ELSE 0 END), sum(opens), sum(clicks),
            sum(CASE WHEN counted_clicks > 0 THEN 1 ELSE 0 END),
            sum(CASE WHEN counted_opens = 0 AND counted_clicks > 0 THEN 1 ELSE 0 END),
            sum(aggregate)
        FROM m GROUP BY sender_domain
        """,  # noqa: S608 - placeholders only
        (*counted, *counted, start, start + _DAY_US),
    ):
        domain, relayed, tracked, opened, opened_any, opens, clicks, clicked, via_click, aggr = row
        result[str(domain)] = {
            "relayed": int(relayed),
            "tracked": int(tracked or 0),
            "opened": int(opened or 0),
            "opened_any": int(opened_any or 0),
            "opens": int(opens or 0),
            **{f"opens_{verdict}": 0 for verdict in VERDICTS},
            "clicks": int(clicks or 0),
            "clicked": int(clicked or 0),
            "opened_via_click": int(via_click or 0),
            # tracking_mode = "aggregate" records no recipient (issue 20)
            "relayed_aggregate": int(aggr or 0),
        }
    for domain, verdict, count in conn.execute(
        "SELECT m.sender_domain, o.verdict, count(*) FROM opens o"
        " JOIN messages m ON m.tracking_id = o.tracking_id"
        " WHERE m.relayed_at_us >= ? AND m.relayed_at_us < ? GROUP BY 1, 2",
        (start, start + _DAY_US),
    ):
        column = f"opens_{verdict}"
        if column in result[str(domain)]:
            result[str(domain)][column] = int(count)
    return result


def rebuild_rollup_day(conn: Connection, day: str) -> DayRebuild:
    """Set the rollup rows of *day* to a count of the stored rows, in one transaction.

    A sender domain whose rollup row counts more messages relayed than are
    stored (some were pruned or forgotten: their counts stay, see
    :mod:`.retention`) is left as it is.  A domain with rows but no rollup
    row gets one.

    :raises sqlite3.Error: (:class:`psycopg.Error` on PostgreSQL) when the store
        cannot be read or written.
    """
    rebuilt = kept = 0
    with write_transaction(conn):
        if not _is_sqlite(conn):  # writers' upserts wait; those under way finish first
            conn.execute("LOCK TABLE daily_stats IN SHARE ROW EXCLUSIVE MODE")
        counted = rollup_from_rows(conn, day)
        stored = {
            str(row[0]): int(row[1])
            for row in conn.execute(
                "SELECT sender_domain, relayed FROM daily_stats WHERE day = ?", (day,)
            )
        }
        # tracking_mode = "aggregate" keeps no event rows: its counts cannot be recounted
        aggregate = {
            str(row[0])
            for row in conn.execute(
                "SELECT sender_domain FROM daily_stats WHERE day = ? AND relayed_aggregate > 0",
                (day,),
            )
        }
        for domain in sorted(set(counted) | set(stored)):
            rows = counted.get(domain)
            if rows is None or stored.get(domain, 0) > rows["relayed"] or domain in aggregate:
                kept += 1
                continue
            columns = ", ".join(ROLLUP_COLUMNS)
            marks = ", ".join("?" * len(ROLLUP_COLUMNS))
            updates = ", ".join(f"{column} = excluded.{column}" for column in ROLLUP_COLUMNS)
            conn.execute(
                f"INSERT INTO daily_stats (day, sender_domain, {columns})"  # noqa: S608 - constant columns
                f" VALUES (?, ?, {marks}) ON CONFLICT (day, sender_domain) DO UPDATE SET {updates}",
                (day, domain, *(rows[column] for column in ROLLUP_COLUMNS)),
            )
            rebuilt += 1
    return DayRebuild(day=day, rebuilt=rebuilt, kept=kept)


def run(
    conn: Connection,
    classify: EventClassifier,
    *,
    since: date | None = None,
    batch_messages: int = DEFAULT_BATCH_MESSAGES,
) -> tuple[Batch, list[DayRebuild]]:
    """Every batch, then every day's rollup: what ``smtp-tracker reclassify`` does, without a bar.

    :returns: the totals (messages, events, changed; ``last_rowid`` the last
        message read) and each day's rebuild.
    :raises sqlite3.Error: (:class:`psycopg.Error` on PostgreSQL) when the store
        cannot be read or written.
    """
    after = 0
    messages = events = changed = 0
    while True:
        batch = reclassify_batch(
            conn, classify, since=since, after_rowid=after, batch_messages=batch_messages
        )
        if batch.messages == 0:
            break
        messages += batch.messages
        events += batch.events
        changed += batch.changed
        after = batch.last_rowid
    days = [rebuild_rollup_day(conn, day) for day in days_from(conn, since)]
    return Batch(messages=messages, events=events, changed=changed, last_rowid=after), days
