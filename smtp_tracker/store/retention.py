"""Retention and erasure in the store: prune old message records, forget a recipient.

Functions over a :class:`sqlite3.Connection` in autocommit mode (the
:class:`~smtp_tracker.store.sqlite.SqliteDatabase` connection), on the schema
v3 tables.  A message record goes as a whole: the ``messages`` row with its
``opens``, ``clicks`` and ``message_recipients`` rows.  Its ``links`` stay
(issue 20): a link in a message still in someone's mailbox keeps redirecting
for ``link_retention_days`` after the relay (:func:`prune_links_batch`), and
a click on it once the message record is gone records nothing; ``forget``
removes the links whose destination names the address.  The
``daily_stats`` rollup is left as it is: it holds counts per day and sender
domain, nothing about a person, so reports over past days stay the same.
The webhook outbox (schema v5, :mod:`smtp_tracker.webhooks.outbox`) holds
events not yet delivered, which carry recipients, senders, client addresses and
link destinations: a prune removes its events created before the cutoff
(pending or dead letters), ``forget`` those whose payload names the address,
each with its deliveries, and the outbox's ``depth`` is set to what is left.

Deletions run in batches of about ``batch_rows`` rows (whole messages with
everything hanging off them, at least one message), each batch its own
``BEGIN IMMEDIATE`` transaction, so the relay's and the pixel endpoint's
writes get the lock between two batches instead of waiting for the whole run.
The default, 1,000 rows, keeps what a relay write waits during a prune to a
median of 1.4 ms (p99 11 ms) on a quiet machine, against 20-24 ms (p99 45 ms)
with 5,000-row batches, for about a tenth less throughput; under load, 12 ms
against 62 ms (``bench/retention.py``).
Blocking: call them from a worker thread.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import idna

from smtp_tracker.store.migrations import immediate_transaction
from smtp_tracker.store.queries import Connection

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "Removed",
    "bodies_naming",
    "body_hints",
    "count_older",
    "count_recipient",
    "delete_old_links",
    "forget_recipient_batch",
    "outbox_events_naming",
    "prune_batch",
    "prune_links_batch",
    "recipient_forms",
]

#: Rows deleted per transaction: messages with their events, links and recipients.
DEFAULT_BATCH_ROWS = 1000

_COLUMNS = "id, tracking_id, queue_id, relayed_at_us, open_count, click_count, recipients"
_OLDER = f"SELECT {_COLUMNS} FROM messages WHERE relayed_at_us < :before_us"  # noqa: S608 - constants
_OLDER_ORDER = "relayed_at_us, id"
_OF_RECIPIENT = (
    f"SELECT {_COLUMNS} FROM messages WHERE id IN"  # noqa: S608 - constants
    " (SELECT message_rowid FROM message_recipients"
    "  WHERE address IN (SELECT value FROM json_each(:forms)))"
)
_OF_RECIPIENT_ORDER = "id"
#: The first messages of ``{select}`` (in ``{order}``) whose rows add up to at most
#: ``:batch_rows``, or the first message alone: each message counts for itself,
#: its events (its counters), its recipients and its links.
_BATCH = """
SELECT id, tracking_id, queue_id FROM (
    SELECT id, tracking_id, queue_id, row_number() OVER w AS n, sum(
        1 + open_count + click_count + json_array_length(recipients)
        + (SELECT count(*) FROM links WHERE links.tracking_id = candidate.tracking_id)
    ) OVER w AS rows_so_far
    FROM ({select} ORDER BY {order} LIMIT :batch_rows) AS candidate
    WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)
)
WHERE n = 1 OR rows_so_far <= :batch_rows
"""
#: What hangs off a batch of messages, given as JSON arrays of ids / tracking ids.
_DEPENDENTS = (
    (
        "opens",
        "DELETE FROM opens WHERE tracking_id IN (SELECT value FROM json_each(:tracking_ids))",
    ),
    (
        "clicks",
        "DELETE FROM clicks WHERE tracking_id IN (SELECT value FROM json_each(:tracking_ids))",
    ),
    (
        "recipients",
        "DELETE FROM message_recipients WHERE message_rowid IN (SELECT value FROM json_each(:ids))",
    ),
    ("messages", "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(:ids))"),
)
#: Links of a batch (``:tracking_ids``) whose destination holds one of ``:needles``.
_LINKS_NAMING = (
    "DELETE FROM links WHERE tracking_id IN (SELECT value FROM json_each(:tracking_ids))"
    " AND EXISTS (SELECT 1 FROM json_each(:needles) n WHERE instr(lower(links.url), n.value) > 0)"
)
_COUNTS = (
    "SELECT (SELECT count(*) FROM sel),"
    " (SELECT count(*) FROM opens WHERE tracking_id IN (SELECT tracking_id FROM sel)),"
    " (SELECT count(*) FROM clicks WHERE tracking_id IN (SELECT tracking_id FROM sel)),"
    " (SELECT count(*) FROM links WHERE tracking_id IN (SELECT tracking_id FROM sel)),"
    " (SELECT count(*) FROM message_recipients WHERE message_rowid IN (SELECT id FROM sel))"
)


@dataclass(frozen=True, slots=True)
class Removed:
    """Rows removed (or, for a dry run, that would be), per table.

    :param queue_ids: smtp-tracker queue ids of the removed messages (kept by
        :func:`forget_recipient_batch`, for their capture files; empty for a prune).
    :param outbox_events: webhook events removed from the outbox (not yet
        delivered: pending or dead letters), with their deliveries.
    """

    messages: int = 0
    opens: int = 0
    clicks: int = 0
    links: int = 0
    recipients: int = 0
    queue_ids: tuple[str, ...] = ()
    outbox_events: int = 0

    def __add__(self, other: Removed) -> Removed:
        return Removed(
            messages=self.messages + other.messages,
            opens=self.opens + other.opens,
            clicks=self.clicks + other.clicks,
            links=self.links + other.links,
            recipients=self.recipients + other.recipients,
            queue_ids=self.queue_ids + other.queue_ids,
            outbox_events=self.outbox_events + other.outbox_events,
        )

    def counts(self) -> dict[str, int]:
        """``{"messages": n, "opens": n, "clicks": n, "links": n, "recipients": n}``,
        and ``"outbox_events": n`` when webhook events were (or would be) removed."""
        counts = {
            f.name: int(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("queue_ids", "outbox_events")
        }
        if self.outbox_events:
            counts["outbox_events"] = self.outbox_events
        return counts


def check_batch(batch_rows: int) -> None:
    """:raises ValueError: unless *batch_rows* is a positive integer (both backends)."""
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r}")


def _delete_batch(
    conn: sqlite3.Connection,
    select: str,
    order: str,
    params: dict[str, object],
    batch_rows: int,
    *,
    outbox: Callable[[sqlite3.Connection], int] | None = None,
) -> Removed:
    """Delete the first messages ``select`` finds: about ``batch_rows`` rows with dependents.

    When it finds none, ``outbox(conn)`` (the webhook outbox's events removed)
    runs in the same transaction.
    """
    statement = _BATCH.format(select=select, order=order)
    with immediate_transaction(conn):
        rows = conn.execute(statement, {**params, "batch_rows": batch_rows}).fetchall()
        if not rows:
            return Removed(outbox_events=0 if outbox is None else outbox(conn))
        batch = {
            "ids": json.dumps([row[0] for row in rows]),
            "tracking_ids": json.dumps([row[1] for row in rows]),
        }
        counts = {name: conn.execute(statement, batch).rowcount for name, statement in _DEPENDENTS}
        if "needles" in params:  # forget: the links whose destination names the address
            counts["links"] = conn.execute(
                _LINKS_NAMING, {"tracking_ids": batch["tracking_ids"], "needles": params["needles"]}
            ).rowcount
    return Removed(**counts, queue_ids=tuple(str(row[2]) for row in rows))


def _count(conn: sqlite3.Connection, select: str, params: dict[str, object]) -> Removed:
    row = conn.execute(f"WITH sel AS ({select}) {_COUNTS}", params).fetchone()
    messages, opens, clicks, links, recipients = (int(v) for v in row)
    return Removed(
        messages=messages, opens=opens, clicks=clicks, links=links, recipients=recipients
    )


def prune_batch(
    conn: sqlite3.Connection, before_us: int, *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Removed:
    """Delete, in one transaction, the oldest messages relayed before ``before_us``.

    As many as fit in about ``batch_rows`` rows with their events, links and
    recipients (at least one).  Call it until it returns ``messages == 0``: that
    last call, with no message left to delete, removes the webhook outbox's
    events created before ``before_us`` (pending or dead letters), ``batch_rows``
    events per transaction.

    :param before_us: the cutoff, microseconds since the epoch (UTC):
        messages with ``relayed_at_us < before_us`` go.
    :returns: the rows deleted per table; ``queue_ids`` left empty.
    :raises ValueError: when ``batch_rows`` is not a positive integer.
    :raises sqlite3.Error: when the database cannot be written (the batch is rolled back).
    """
    check_batch(batch_rows)

    def older_events(conn: sqlite3.Connection) -> int:
        seqs = conn.execute(_OUTBOX_OLDER, {"before_us": before_us, "n": batch_rows})
        return _drop_outbox_events(conn, [int(row[0]) for row in seqs])

    removed = _delete_batch(
        conn, _OLDER, _OLDER_ORDER, {"before_us": before_us}, batch_rows, outbox=older_events
    )
    if removed.messages:
        return dataclasses.replace(removed, queue_ids=())
    events = removed.outbox_events
    while events and events % batch_rows == 0:  # maybe more: one transaction per batch
        with immediate_transaction(conn):
            more = older_events(conn)
        if not more:
            break
        events += more
    return Removed(outbox_events=events)


def prune_links_batch(
    conn: sqlite3.Connection, before_us: int, *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> int:
    """Delete, in one transaction, up to ``batch_rows`` links relayed before ``before_us``
    whose message record is gone, and the objection links made before it.

    ``link_retention_days``: until then a wrapped link keeps redirecting.  Call
    it until it returns 0.

    :returns: the rows deleted: links and objection links.
    :raises sqlite3.Error: when the database cannot be written (rolled back).
    """
    check_batch(batch_rows)
    with immediate_transaction(conn):
        return delete_old_links(conn, before_us, batch_rows)


def delete_old_links(conn: Connection, before_us: int, batch_rows: int) -> int:
    """Up to *batch_rows* links relayed before *before_us* whose message record is gone,
    and up to *batch_rows* objection links made before it, deleted in the caller's
    transaction (the same SQL on both backends).

    :returns: the rows deleted: links and objection links.
    """
    links = conn.execute(
        "DELETE FROM links WHERE token IN (SELECT token FROM links l"
        " WHERE l.relayed_at_us < ? AND NOT EXISTS"
        " (SELECT 1 FROM messages m WHERE m.tracking_id = l.tracking_id) LIMIT ?)",
        (before_us, batch_rows),
    ).rowcount
    optout = conn.execute(
        "DELETE FROM optout_links WHERE token IN"
        " (SELECT token FROM optout_links WHERE created_us < ? LIMIT ?)",
        (before_us, batch_rows),
    ).rowcount
    return int(links) + int(optout)


def count_older(conn: sqlite3.Connection, before_us: int) -> Removed:
    """What :func:`prune_batch` calls would delete for ``before_us``;
    links are kept (:func:`prune_links_batch`), so counted as 0."""
    counted = _count(conn, _OLDER, {"before_us": before_us})
    (events,) = conn.execute(
        "SELECT count(*) FROM webhook_events WHERE created_us < ?", (before_us,)
    ).fetchone()
    return dataclasses.replace(counted, links=0, outbox_events=int(events))


def recipient_forms(address: str) -> list[str]:
    """The forms a forward-path may be stored in: lower case, domain as A-labels and as U-labels.

    A-labels as :func:`smtp_tracker.tracking.domains.normalise_domain` writes
    them (IDNA 2008 with the UTS #46 mapping), computed here with :mod:`idna`
    because the store sits below the tracking stage and never imports it.
    """
    text = address.strip().strip("<>").lower()
    forms = [text]
    local, at, domain = text.rpartition("@")
    domain = domain.rstrip(".")
    if at and domain and not domain.startswith("["):
        try:
            a_labels = idna.encode(domain, uts46=True).decode("ascii").lower()
            forms.append(f"{local}@{a_labels}")
            forms.append(f"{local}@{idna.decode(a_labels)}")
        except (ValueError, UnicodeError, idna.IDNAError):
            pass
    return list(dict.fromkeys(forms))


def _json(values: Iterable[str]) -> str:
    return json.dumps(list(values), ensure_ascii=False)


def forget_recipient_batch(
    conn: sqlite3.Connection, address: str, *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Removed:
    """Delete, in one transaction, messages sent to ``address`` (about ``batch_rows`` rows).

    Every message record among whose forward-paths ``address`` is
    (case-insensitively, its domain in either IDNA form) goes whole, other
    recipients included: one pixel served them all, so their open events
    cannot be told apart.  Its links stay (they keep redirecting, recording
    nothing), but those whose destination holds the address, as written or
    percent-encoded.  Call it until ``messages == 0``: that last call, with no
    message left to delete, removes in one transaction the webhook outbox's
    events (pending or dead letters) whose payload names the address
    (:func:`outbox_events_naming`).

    :returns: the rows deleted per table and the queue ids of the messages.
    :raises ValueError: when ``batch_rows`` is not a positive integer.
    :raises sqlite3.Error: when the database cannot be written (the batch is rolled back).
    """
    check_batch(batch_rows)
    params: dict[str, object] = {
        "forms": _json(recipient_forms(address)),
        "needles": _json(needles(address)),
    }
    return _delete_batch(
        conn,
        _OF_RECIPIENT,
        _OF_RECIPIENT_ORDER,
        params,
        batch_rows,
        outbox=lambda conn: _drop_outbox_events(conn, outbox_events_naming(conn, address)),
    )


def needles(address: str) -> list[str]:
    """What a destination URL naming *address* holds: each form, as written and
    percent-encoded (``@`` as ``%40``), in lower case."""
    found: list[str] = []
    for form in recipient_forms(address):
        found.append(form)
        found.append(urllib.parse.quote(form, safe="").lower())
        found.append(urllib.parse.quote_plus(form, safe="").lower())
    return list(dict.fromkeys(found))


def count_recipient(conn: sqlite3.Connection, address: str) -> Removed:
    """What :func:`forget_recipient_batch` calls would delete, queue ids included.

    Call it in a read transaction for one snapshot.
    """
    params: dict[str, object] = {"forms": _json(recipient_forms(address))}
    counted = _count(conn, _OF_RECIPIENT, params)
    rows = conn.execute(_OF_RECIPIENT, params).fetchall()
    links = conn.execute(
        _LINKS_NAMING.replace("DELETE FROM links", "SELECT count(*) FROM links"),
        {"tracking_ids": _json(str(row[1]) for row in rows), "needles": _json(needles(address))},
    ).fetchone()[0]
    queue_ids = tuple(str(row[2]) for row in rows)
    events = len(outbox_events_naming(conn, address))
    return dataclasses.replace(counted, links=int(links), queue_ids=queue_ids, outbox_events=events)


# -- the webhook outbox (schema v5; smtp_tracker.webhooks.outbox writes and sends it) -----

#: The oldest ``:n`` outbox events created before ``:before_us``.
_OUTBOX_OLDER = "SELECT seq FROM webhook_events WHERE created_us < :before_us ORDER BY seq LIMIT :n"


def _drop_outbox_events(conn: sqlite3.Connection, seqs: list[int]) -> int:
    """Delete the outbox events *seqs* (read in this transaction) with their deliveries,
    and set the outbox's ``depth`` to the events left; inside the caller's transaction.

    ``depth`` is counted again rather than left to the triggers: a store copied
    by ``store recover`` has none until the sender's
    :func:`smtp_tracker.webhooks.outbox.repair` runs.

    :returns: ``len(seqs)``.
    """
    if not seqs:
        return 0
    batch = json.dumps(seqs)
    conn.execute(
        "DELETE FROM webhook_deliveries WHERE seq IN (SELECT value FROM json_each(?))", (batch,)
    )
    conn.execute(
        "DELETE FROM webhook_events WHERE seq IN (SELECT value FROM json_each(?))", (batch,)
    )
    conn.execute("UPDATE webhook_outbox_state SET depth = (SELECT count(*) FROM webhook_events)")
    return len(seqs)


def outbox_events_naming(conn: sqlite3.Connection, address: str) -> list[int]:
    """The ``seq`` of each webhook outbox event whose payload names *address*.

    An event names it when one of its ``recipients`` or its ``sender`` is the
    address in one of :func:`recipient_forms` (case-insensitively, the domain
    in either IDNA form), or when another of its texts (a link's destination,
    the upstream's reply) holds one of those forms, as written or
    percent-encoded, as a whole address (``bob@example.net`` is not in
    ``jimbob@example.net``).  Only events whose JSON holds the address's local
    part (when that is plain ASCII) are read from SQL, then checked here.
    """
    query, params = "SELECT seq, body FROM webhook_events", {}
    hints = body_hints(address)
    if hints:
        query += " WHERE instr(lower(body), :at) > 0 OR instr(lower(body), :pct) > 0"
        params = {"at": hints[0], "pct": hints[1]}
    return bodies_naming(conn.execute(query, params), address)


def body_hints(address: str) -> tuple[str, str] | None:
    """Texts one of which the lower-cased JSON of an event naming *address* holds (its
    local part and ``@``, as written and percent-encoded), for a first cut in SQL; None
    when the local part is not plain ASCII (every event must then be read)."""
    local = recipient_forms(address)[0].rpartition("@")[0]
    if local and local.isascii() and '"' not in local and "\\" not in local:
        return f"{local}@", urllib.parse.quote(f"{local}@", safe="").lower()
    return None


def bodies_naming(rows: Iterable[Sequence[Any]], address: str) -> list[int]:
    """The ``seq`` of each ``(seq, body)`` of *rows* whose event names *address*
    (see :func:`outbox_events_naming`; the same test on either backend)."""
    forms = set(recipient_forms(address))
    pattern = re.compile(
        "|".join(
            rf"(?<![\w.+%-]){re.escape(needle)}(?![\w-]|\.[\w])"
            for needle in sorted(needles(address), key=len, reverse=True)
        )
    )
    found = []
    for seq, body in rows:
        try:
            document = json.loads(body)
        except ValueError:
            continue
        if _names(document, forms, pattern):
            found.append(int(seq))
    return found


def _names(document: Any, forms: set[str], pattern: re.Pattern[str]) -> bool:
    if isinstance(document, dict):
        for field in ("recipients", "sender"):
            value = document.get(field)
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and text and forms & set(recipient_forms(text)):
                    return True
    return any(pattern.search(text.lower()) for text in _texts(document))


def _texts(document: Any) -> Iterator[str]:
    if isinstance(document, str):
        yield document
    elif isinstance(document, dict):
        for value in document.values():
            yield from _texts(value)
    elif isinstance(document, list):
        for value in document:
            yield from _texts(value)
