"""The SQLite schema's history, as numbered migrations recorded in ``PRAGMA user_version``.

A new store is made from the one definition of the current schema
(:mod:`.schema`); a store of version *n* reaches it by applying
:data:`MIGRATIONS` ``[n..]`` in order (version *n* of the schema is
:data:`MIGRATIONS` ``[0..n-1]``, which the tests build old stores with, and
compare, once migrated, with a new one).  :func:`migrate` runs the missing
ones in one ``BEGIN IMMEDIATE`` transaction, so two processes opening the
same database at once migrate it exactly once, and a failure leaves the
database at its old version.

Times are stored as integer microseconds since the Unix epoch, UTC (``*_us``);
recipients as a JSON array of strings.

* **v1** - tables ``messages`` and ``opens``.
* **v2** - column ``messages.subject``; indexes for the look-ups by queue id,
  Message-ID, time, and for the opens of a message.
* **v3** - open classification (``opens.verdict``, ``opens.verdict_reason``);
  per-message counters (``open_count``, ``counted_open_count``,
  ``first_open_at_us``, ``click_count``, ``counted_click_count``) and
  ``sender_domain``; table ``message_recipients`` (one lower-cased
  forward-path per row, for the recipient filter and ``forget``); tables
  ``links`` and ``clicks`` for click tracking; the ``daily_stats`` rollup,
  one row per UTC relay day and sender domain, kept current by every write so
  that reports never scan messages.  Existing data is carried over into the
  new columns, tables and rollup (old opens become ``unknown``).
* **v4** - signals (issue 19): ``opens.signals`` and ``clicks.signals``, the
  JSON of what each event was judged on (rules that held, seconds since the
  relay, network lists hit), for ``smtp-tracker reclassify``; a counted click
  means the message was read: ``daily_stats.opened`` now also counts messages
  with a counted click and no counted open, and ``daily_stats.opened_via_click``
  counts those.  Existing rollup rows are brought to that meaning from the
  messages' counters.
* **v5** - the webhook outbox (issue 18, :mod:`smtp_tracker.webhooks.outbox`):
  ``webhook_events`` (one row per event), ``webhook_deliveries`` (one per event
  and target), ``webhook_hooks`` (hooks a 410 disabled) and
  ``webhook_outbox_state`` (the outbox's depth, kept by triggers, and the
  events dropped when it was full).
* **v6** - consent (issue 20, :mod:`smtp_tracker.store.consent`): ``consent``
  (one row per lower-cased address: ``denied`` or ``granted``, when, from
  where), ``optout_links`` (the objection link of each tracked message: its
  token, tracking id and recipients), ``optout_used`` (the single-use form
  tokens of the objection page already spent); ``links.relayed_at_us`` (links
  outlive their message for ``link_retention_days``);
  ``daily_stats.relayed_aggregate`` (messages recorded with
  ``tracking_mode = "aggregate"``, so reports say which mode made a figure).
* **v7** - ``messages.dkim`` (issue 13): what became of the message's DKIM
  signatures: ``resigned``, or why it was relayed as received
  (``dkim-signed`` under ``dkim_policy = "skip"``, ``dkim-invalid``,
  ``dkim-foreign``, ``dkim-length-tag``, ``arc-sealed``,
  ``dkim-resign-failed``); NULL for a message without signatures.  Older
  rows take it from ``not_tracked_reason`` when that names a DKIM reason;
  ``dkim_stats``, a rollup beside ``daily_stats`` (per UTC relay day and
  sender domain, one counter per outcome, kept by every message written,
  filled from the stored messages) for the per-outcome counts of ``stats``.
* **v8** - no change on SQLite: the number keeps step with PostgreSQL's v8,
  where times became ``timestamptz`` and client addresses ``inet``
  (:mod:`.pg_schema`), so that a store has one version on either backend.
* **v9** - no change on SQLite either: PostgreSQL's v9 adds ``dashboard_users``
  (the reports dashboard's users, shared by every reports host on the store);
  with SQLite they stay in the users file (``reports_users_file``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Final

from smtp_tracker.errors import StoreError
from smtp_tracker.store import schema

#: ``dkim_stats``' counters, in table order (one per outcome of ``queries.DKIM_OUTCOMES``).
DKIM_ROLLUP: Final = schema.DKIM_ROLLUP

__all__ = [
    "CURRENT_VERSION",
    "DKIM_ROLLUP",
    "MIGRATIONS",
    "check_known_version",
    "immediate_transaction",
    "migrate",
    "schema_version",
]

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # v1: initial tables
    (
        """
        CREATE TABLE messages (
            id                 INTEGER PRIMARY KEY,
            tracking_id        TEXT    NOT NULL UNIQUE,
            queue_id           TEXT    NOT NULL,
            message_id         TEXT,
            sender             TEXT    NOT NULL,
            recipients         TEXT    NOT NULL,
            size_bytes         INTEGER NOT NULL,
            received_at_us     INTEGER NOT NULL,
            relayed_at_us      INTEGER NOT NULL,
            upstream_reply     TEXT    NOT NULL,
            tracked            INTEGER NOT NULL,
            not_tracked_reason TEXT
        )
        """,
        """
        CREATE TABLE opens (
            id          INTEGER PRIMARY KEY,
            tracking_id TEXT    NOT NULL,
            at_us       INTEGER NOT NULL,
            ip          TEXT,
            user_agent  TEXT
        )
        """,
    ),
    # v2: subject column and indexes
    (
        "ALTER TABLE messages ADD COLUMN subject TEXT",
        "CREATE INDEX messages_queue_id ON messages (queue_id)",
        "CREATE INDEX messages_message_id ON messages (message_id)",
        "CREATE INDEX messages_relayed_at ON messages (relayed_at_us, id)",
        "CREATE INDEX opens_tracking_id ON opens (tracking_id, at_us)",
    ),
    # v3: classification, counters, recipients, clicks, daily rollup
    (
        "ALTER TABLE messages ADD COLUMN sender_domain TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE messages ADD COLUMN open_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN counted_open_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN first_open_at_us INTEGER",
        "ALTER TABLE messages ADD COLUMN click_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN counted_click_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE opens ADD COLUMN verdict TEXT NOT NULL DEFAULT 'unknown'",
        "ALTER TABLE opens ADD COLUMN verdict_reason TEXT",
        """
        UPDATE messages SET
            sender_domain = CASE WHEN instr(sender, '@') > 0
                THEN lower(substr(sender, length(rtrim(sender, replace(sender, '@', ''))) + 1))
                ELSE '' END,
            open_count = (SELECT count(*) FROM opens o WHERE o.tracking_id = messages.tracking_id)
        """,
        """
        CREATE TABLE message_recipients (
            message_rowid INTEGER NOT NULL,
            address       TEXT    NOT NULL
        )
        """,
        """
        INSERT INTO message_recipients (message_rowid, address)
        SELECT m.id, lower(j.value) FROM messages m, json_each(m.recipients) j
        """,
        "CREATE INDEX message_recipients_address ON message_recipients (address, message_rowid)",
        "CREATE INDEX message_recipients_message ON message_recipients (message_rowid)",
        "CREATE INDEX messages_sender ON messages (sender, relayed_at_us, id)",
        "CREATE INDEX messages_sender_domain ON messages (sender_domain, relayed_at_us, id)",
        """
        CREATE TABLE links (
            token       TEXT    PRIMARY KEY,
            tracking_id TEXT    NOT NULL,
            url         TEXT    NOT NULL,
            position    INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX links_tracking_id ON links (tracking_id)",
        """
        CREATE TABLE clicks (
            id             INTEGER PRIMARY KEY,
            link_token     TEXT    NOT NULL,
            tracking_id    TEXT    NOT NULL,
            at_us          INTEGER NOT NULL,
            ip             TEXT,
            user_agent     TEXT,
            verdict        TEXT    NOT NULL DEFAULT 'unknown',
            verdict_reason TEXT
        )
        """,
        "CREATE INDEX clicks_tracking_id ON clicks (tracking_id, at_us)",
        "CREATE INDEX opens_at ON opens (at_us)",
        """
        CREATE TABLE daily_stats (
            day                 TEXT    NOT NULL,
            sender_domain       TEXT    NOT NULL,
            relayed             INTEGER NOT NULL DEFAULT 0,
            tracked             INTEGER NOT NULL DEFAULT 0,
            opened              INTEGER NOT NULL DEFAULT 0,
            opened_any          INTEGER NOT NULL DEFAULT 0,
            opens               INTEGER NOT NULL DEFAULT 0,
            opens_human         INTEGER NOT NULL DEFAULT 0,
            opens_privacy_proxy INTEGER NOT NULL DEFAULT 0,
            opens_mail_proxy    INTEGER NOT NULL DEFAULT 0,
            opens_scanner       INTEGER NOT NULL DEFAULT 0,
            opens_unknown       INTEGER NOT NULL DEFAULT 0,
            clicks              INTEGER NOT NULL DEFAULT 0,
            clicked             INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, sender_domain)
        ) WITHOUT ROWID
        """,
        """
        INSERT INTO daily_stats (day, sender_domain, relayed, tracked, opened_any, opens,
                                 opens_unknown)
        SELECT date(relayed_at_us / 1000000, 'unixepoch'), sender_domain, count(*),
               sum(tracked), sum(open_count > 0), sum(open_count), sum(open_count)
        FROM messages GROUP BY 1, 2
        """,
    ),
    # v4: the signals of each event; a counted click counts as an open (opened_via_click)
    (
        "ALTER TABLE opens ADD COLUMN signals TEXT",
        "ALTER TABLE clicks ADD COLUMN signals TEXT",
        "ALTER TABLE daily_stats ADD COLUMN opened_via_click INTEGER NOT NULL DEFAULT 0",
        """
        INSERT INTO daily_stats (day, sender_domain, opened, opened_via_click)
        SELECT date(relayed_at_us / 1000000, 'unixepoch'), sender_domain, count(*), count(*)
        FROM messages WHERE counted_open_count = 0 AND counted_click_count > 0 GROUP BY 1, 2
        ON CONFLICT (day, sender_domain) DO UPDATE SET
            opened = opened + excluded.opened,
            opened_via_click = opened_via_click + excluded.opened_via_click
        """,
    ),
    # v5: the webhook outbox (smtp_tracker.webhooks.outbox)
    (
        """
        CREATE TABLE webhook_events (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            id         TEXT    NOT NULL UNIQUE,
            type       TEXT    NOT NULL,
            created_us INTEGER NOT NULL,
            body       TEXT    NOT NULL
        )
        """,
        """
        CREATE TABLE webhook_deliveries (
            hook       TEXT    NOT NULL,
            seq        INTEGER NOT NULL,
            order_key  TEXT    NOT NULL,
            state      TEXT    NOT NULL DEFAULT 'pending',
            attempts   INTEGER NOT NULL DEFAULT 0,
            due_us     INTEGER NOT NULL,
            since_us   INTEGER NOT NULL,
            last_error TEXT,
            PRIMARY KEY (hook, seq)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX webhook_deliveries_due ON webhook_deliveries (hook, state, due_us)",
        "CREATE INDEX webhook_deliveries_order ON webhook_deliveries (hook, order_key, seq)",
        "CREATE INDEX webhook_deliveries_seq ON webhook_deliveries (seq)",
        """
        CREATE TABLE webhook_hooks (
            hook            TEXT    PRIMARY KEY,
            disabled_at_us  INTEGER NOT NULL,
            disabled_reason TEXT    NOT NULL
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE webhook_outbox_state (
            one     INTEGER PRIMARY KEY CHECK (one = 1),
            depth   INTEGER NOT NULL,
            dropped INTEGER NOT NULL
        )
        """,
        "INSERT INTO webhook_outbox_state (one, depth, dropped) VALUES (1, 0, 0)",
        """
        CREATE TRIGGER webhook_events_added AFTER INSERT ON webhook_events
        BEGIN UPDATE webhook_outbox_state SET depth = depth + 1; END
        """,
        """
        CREATE TRIGGER webhook_events_removed AFTER DELETE ON webhook_events
        BEGIN UPDATE webhook_outbox_state SET depth = depth - 1; END
        """,
        """
        CREATE TRIGGER webhook_deliveries_done AFTER DELETE ON webhook_deliveries
        WHEN NOT EXISTS (SELECT 1 FROM webhook_deliveries WHERE seq = old.seq)
        BEGIN DELETE FROM webhook_events WHERE seq = old.seq; END
        """,
    ),
    # v6: consent registry, objection links, links that outlive records, aggregate mode
    (
        """
        CREATE TABLE consent (
            address TEXT    PRIMARY KEY,
            state   TEXT    NOT NULL CHECK (state IN ('denied', 'granted')),
            at_us   INTEGER NOT NULL,
            source  TEXT    NOT NULL
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE optout_links (
            token       TEXT    PRIMARY KEY,
            tracking_id TEXT    NOT NULL,
            recipients  TEXT    NOT NULL,
            created_us  INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX optout_links_created ON optout_links (created_us)",
        "CREATE INDEX optout_links_tracking_id ON optout_links (tracking_id)",
        """
        CREATE TABLE optout_used (
            nonce   TEXT    PRIMARY KEY,
            used_us INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
        "ALTER TABLE links ADD COLUMN relayed_at_us INTEGER",
        """
        UPDATE links SET relayed_at_us =
            (SELECT m.relayed_at_us FROM messages m WHERE m.tracking_id = links.tracking_id)
        """,
        "CREATE INDEX links_relayed_at ON links (relayed_at_us)",
        "ALTER TABLE daily_stats ADD COLUMN relayed_aggregate INTEGER NOT NULL DEFAULT 0",
    ),
    # v7: the DKIM outcome of each message
    (
        "ALTER TABLE messages ADD COLUMN dkim TEXT",
        "UPDATE messages SET dkim = not_tracked_reason WHERE not_tracked_reason IN"
        " ('dkim-signed', 'dkim-invalid', 'dkim-foreign', 'dkim-length-tag', 'arc-sealed',"
        " 'dkim-resign-failed')",
        """
        CREATE TABLE dkim_stats (
            day                TEXT    NOT NULL,
            sender_domain      TEXT    NOT NULL,
            dkim_resigned      INTEGER NOT NULL DEFAULT 0,
            dkim_signed        INTEGER NOT NULL DEFAULT 0,
            dkim_invalid       INTEGER NOT NULL DEFAULT 0,
            dkim_foreign       INTEGER NOT NULL DEFAULT 0,
            dkim_length_tag    INTEGER NOT NULL DEFAULT 0,
            dkim_arc_sealed    INTEGER NOT NULL DEFAULT 0,
            dkim_resign_failed INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, sender_domain)
        ) WITHOUT ROWID
        """,
        """
        INSERT INTO dkim_stats (day, sender_domain, dkim_resigned, dkim_signed, dkim_invalid,
            dkim_foreign, dkim_length_tag, dkim_arc_sealed, dkim_resign_failed)
        SELECT strftime('%Y-%m-%d', relayed_at_us / 1000000, 'unixepoch'), sender_domain,
            SUM(CASE WHEN dkim = 'resigned' THEN 1 ELSE 0 END),
            SUM(CASE WHEN dkim = 'dkim-signed' THEN 1 ELSE 0 END),
            SUM(CASE WHEN dkim = 'dkim-invalid' THEN 1 ELSE 0 END),
            SUM(CASE WHEN dkim = 'dkim-foreign' THEN 1 ELSE 0 END),
            SUM(CASE WHEN dkim = 'dkim-length-tag' THEN 1 ELSE 0 END),
            SUM(CASE WHEN dkim = 'arc-sealed' THEN 1 ELSE 0 END),
            SUM(CASE WHEN dkim = 'dkim-resign-failed' THEN 1 ELSE 0 END)
        FROM messages WHERE dkim IS NOT NULL GROUP BY 1, 2
        """,
    ),
    # v8: nothing on SQLite (PostgreSQL's times became timestamptz, its addresses inet)
    (),
    # v9: nothing on SQLite (the dashboard's users stay in the users file; PostgreSQL's
    # v9 adds dashboard_users, shared by every reports host on the store)
    (),
)

CURRENT_VERSION: Final[int] = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's ``PRAGMA user_version``."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


@contextlib.contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any exception.

    IMMEDIATE takes the write lock at once, so a writer waits for another
    process's writer (up to the busy timeout) instead of failing at COMMIT
    (SQLite "Transaction" documentation).  The connection is in autocommit mode.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection, *, target: int = CURRENT_VERSION) -> int:
    """Bring the database on *conn* to schema version *target*.

    *conn* must be in autocommit mode (``isolation_level=None``).  Blocking:
    call it from a worker thread.

    :param target: the version to reach; lower than current only in tests that
        build an old database.
    :returns: the version the database was at before.
    :raises StoreError: when the database is newer than this code knows, or a
        migration fails (the database is then left unchanged).
    """
    if not 0 <= target <= CURRENT_VERSION:
        raise ValueError(f"no schema version {target}")
    try:
        if schema_version(conn) >= target:
            return check_known_version(conn)
        with immediate_transaction(conn):
            before = check_known_version(conn)  # re-read under the write lock
            if before == 0 and target == schema.VERSION:  # a new store: the one definition
                for statement in schema.sqlite_statements():
                    conn.execute(statement)
            else:
                for version in range(before + 1, target + 1):
                    for statement in MIGRATIONS[version - 1]:
                        conn.execute(statement)
            if before < target:
                conn.execute(f"PRAGMA user_version = {int(target)}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot migrate the store's schema to v{target}: {exc}") from exc
    return before


def check_known_version(conn: sqlite3.Connection) -> int:
    """The database's schema version.

    :raises StoreError: when it is newer than :data:`CURRENT_VERSION`.
    """
    version = schema_version(conn)
    if version > CURRENT_VERSION:
        raise StoreError(
            f"the store's schema is v{version}, newer than this smtp-tracker (v{CURRENT_VERSION})"
        )
    return version
