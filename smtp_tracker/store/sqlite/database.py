"""The blocking SQLite store: :class:`SqliteDatabase`, one connection for one thread at a time."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Self

from smtp_tracker.errors import StoreError
from smtp_tracker.store.address import (
    HASH_KEY_FILENAME,
    AddressPolicy,
    IpPolicy,
    load_or_create_hash_key,
)
from smtp_tracker.store.integrity import DB_FILENAME
from smtp_tracker.store.records import EventClassifier, unclassified
from smtp_tracker.store.sqlite.connection import connect, prepare
from smtp_tracker.store.sqlite.maintenance import Maintenance
from smtp_tracker.store.sqlite.reading import Reading
from smtp_tracker.store.sqlite.recording import OutboxHook, Recording

__all__ = ["SqliteDatabase"]


class SqliteDatabase(Recording, Reading, Maintenance):
    """The blocking store over one SQLite connection; for one thread at a time.

    Use :meth:`open`; usable as a context manager (closes on exit).  The CLI may
    use it directly; async code uses :class:`~.store.SqliteStore`.

    Its parts are in their own modules: the writes (:class:`~.recording.Recording`),
    the reads and reports (:class:`~.reading.Reading`), retention and
    reclassification (:class:`~.maintenance.Maintenance`).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        data_dir: Path,
        store_subject: bool,
        address_policy: AddressPolicy,
        classifier: EventClassifier = unclassified,
    ) -> None:
        self._conn = conn
        self.data_dir = data_dir
        #: ``messages.id`` of the last message committed here (:func:`.integrity.probe` reads it).
        self.last_message_rowid: int | None = None
        #: told of each record and event inside the transaction that writes it (webhooks)
        self.outbox: OutboxHook | None = None
        self.store_subject = store_subject
        self.address_policy = address_policy
        self.classifier = classifier
        #: ``tracking_mode`` (issue 20): ``"aggregate"`` records no recipient, sender,
        #: client address, User-Agent or event row (:func:`.rows.aggregate_record`).
        self.tracking_mode = "per-person"
        #: with ``"aggregate"``: keep each message's queue id, Message-ID and subject.
        self.aggregate_per_message = False
        #: days a link outlives its message record (:meth:`prune_links_batch`; 0: forever).
        self.link_retention_days = 1825

    # -- life cycle -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        store_subject: bool = False,
        ip_policy: IpPolicy = "truncate",
        busy_timeout_s: float = 5.0,
        create: bool = True,
        migrate_schema: bool = True,
        classifier: EventClassifier = unclassified,
    ) -> SqliteDatabase:
        """Open (and by default create and migrate) the store in *data_dir*.

        :param store_subject: keep :attr:`MessageRecord.subject`; otherwise it is
            stored as ``None``.
        :param ip_policy: what of client addresses :meth:`record_opens` keeps
            (see :mod:`smtp_tracker.store.address`); ``"hash"`` reads or creates
            ``DATA_DIR/ip-hash.key``.
        :param busy_timeout_s: how long a statement waits for another
            connection's lock, in seconds.
        :param create: create the directory and database when missing; when
            false a missing database is an error (for read-only CLI commands).
        :param migrate_schema: apply pending migrations (tests turn it off to
            build old databases).
        :param classifier: judges each open and click event as it is recorded
            (:mod:`smtp_tracker.classification`); by default every event is
            ``unknown``.
        :raises StoreError: when the directory or database cannot be created,
            opened, put in WAL mode or migrated, or is newer than this code.
        """
        data_dir = Path(data_dir)
        db_path = data_dir / DB_FILENAME
        if create:
            prepare(data_dir, db_path)
        elif not db_path.is_file():
            raise StoreError(f"no tracking store at {db_path}")
        try:
            policy = AddressPolicy(
                ip_policy,
                hash_key=(
                    load_or_create_hash_key(data_dir / HASH_KEY_FILENAME)
                    if ip_policy == "hash"
                    else None
                ),
            )
        except ValueError as exc:
            raise StoreError(str(exc)) from exc
        conn = connect(db_path, busy_timeout_s=busy_timeout_s, migrate_schema=migrate_schema)
        return cls(
            conn,
            data_dir=data_dir,
            store_subject=store_subject,
            address_policy=policy,
            classifier=classifier,
        )

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection, for the store's own modules (:mod:`.consent`) run from the CLI."""
        return self._conn

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
