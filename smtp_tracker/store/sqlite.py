"""The SQLite backend of the tracking store: ``DATA_DIR/tracker.sqlite3``.

Layout and sharing
    The data directory is created mode 0700 and the database file 0600 (by
    explicit ``mode``/``fchmod``, not by changing the process-wide umask,
    which would race with other threads); SQLite gives its ``-wal`` and
    ``-shm`` files the database file's mode.  An existing directory is used as
    it is.  The database runs in WAL mode with ``synchronous=NORMAL`` and a
    busy timeout, so the relay and the pixel endpoint may be one process or
    two processes on the same host sharing the directory (WAL needs a local
    file system, not NFS).  Every write is one short transaction started with
    ``BEGIN IMMEDIATE``, so a writer waits for the lock (up to the busy
    timeout) instead of failing on a snapshot upgrade.

Threads
    :class:`SqliteDatabase` is the blocking core: one connection, used by one
    thread at a time.  :class:`SqliteStore`, the async :class:`~.base.Store`,
    owns two of them, each confined to its own single-thread executor: one for
    writes (so writes from this process are serialised without lock
    contention) and one for reads (WAL readers do not wait for writers).  The
    event loop only ever awaits futures.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from smtp_tracker.errors import StoreError
from smtp_tracker.store.address import (
    HASH_KEY_FILENAME,
    AddressPolicy,
    IpPolicy,
    load_or_create_hash_key,
)
from smtp_tracker.store.migrations import check_known_version, immediate_transaction, migrate
from smtp_tracker.store.records import (
    USER_AGENT_MAX_CHARS,
    MessageRecord,
    OpenHit,
    OpenRecord,
    StoredMessage,
)

__all__ = ["DB_FILENAME", "SqliteDatabase", "SqliteStore"]

#: The database file's name inside the data directory.
DB_FILENAME = "tracker.sqlite3"

_T = TypeVar("_T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

_MESSAGE_COLUMNS = (
    "tracking_id, queue_id, message_id, sender, recipients, size_bytes, received_at_us,"
    " relayed_at_us, upstream_reply, tracked, not_tracked_reason, subject"
)
_INSERT_MESSAGE = f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"  # noqa: S608 - constant
_INSERT_OPEN = (
    "INSERT INTO opens (tracking_id, at_us, ip, user_agent) SELECT ?1, ?2, ?3, ?4"
    " WHERE EXISTS (SELECT 1 FROM messages WHERE tracking_id = ?1)"
)
_ORDER = "ORDER BY relayed_at_us DESC, id DESC"


def to_us(value: datetime) -> int:
    """*value* as integer microseconds since the Unix epoch (UTC).

    :raises ValueError: when *value* is naive.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: give it a timezone (UTC)")
    return (value - _EPOCH) // _US


def from_us(value: int) -> datetime:
    """The UTC datetime *value* microseconds after the Unix epoch."""
    return _EPOCH + timedelta(microseconds=value)


class SqliteDatabase:
    """The blocking store over one SQLite connection; for one thread at a time.

    Use :meth:`open`; usable as a context manager (closes on exit).  The CLI may
    use it directly; async code uses :class:`SqliteStore`.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        data_dir: Path,
        store_subject: bool,
        address_policy: AddressPolicy,
    ) -> None:
        self._conn = conn
        self.data_dir = data_dir
        self.store_subject = store_subject
        self.address_policy = address_policy

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
        :raises StoreError: when the directory or database cannot be created,
            opened, put in WAL mode or migrated, or is newer than this code.
        """
        data_dir = Path(data_dir)
        db_path = data_dir / DB_FILENAME
        if create:
            _prepare(data_dir, db_path)
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
        try:
            conn = sqlite3.connect(
                db_path,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {db_path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{db_path}: cannot use WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA trusted_schema = OFF")
            if migrate_schema:
                migrate(conn)
            else:
                check_known_version(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open {db_path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, data_dir=data_dir, store_subject=store_subject, address_policy=policy)

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

    # -- writes -----------------------------------------------------------------

    def record_message(self, record: MessageRecord) -> None:
        """See :meth:`.base.Store.record_message`."""
        row = (
            record.tracking_id,
            record.queue_id,
            record.message_id,
            record.sender,
            json.dumps(list(record.recipients)),
            int(record.size_bytes),
            to_us(record.received_at),
            to_us(record.relayed_at),
            record.upstream_reply,
            int(bool(record.tracked)),
            record.not_tracked_reason,
            record.subject if self.store_subject else None,
        )
        try:
            self._conn.execute(_INSERT_MESSAGE, row)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"tracking id {record.tracking_id} is already recorded") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record message {record.queue_id}: {exc}") from exc

    def record_opens(self, hits: Sequence[OpenHit]) -> int:
        """See :meth:`.base.Store.record_opens`."""
        if not hits:
            return 0
        apply = self.address_policy.apply
        rows = [
            (
                hit.tracking_id,
                to_us(hit.at),
                apply(hit.client_address),
                None if hit.user_agent is None else hit.user_agent[:USER_AGENT_MAX_CHARS],
            )
            for hit in hits
        ]
        conn = self._conn
        try:
            with immediate_transaction(conn):
                before = conn.total_changes
                conn.executemany(_INSERT_OPEN, rows)
                recorded = conn.total_changes - before
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record {len(rows)} opens: {exc}") from exc
        return recorded

    # -- reads ------------------------------------------------------------------

    def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`.base.Store.find_message`."""

        def query() -> StoredMessage | None:
            candidates: list[tuple[str, str]] = [("tracking_id", ident), ("queue_id", ident)]
            candidates.append(("message_id", ident))
            if not ident.startswith("<"):
                candidates.append(("message_id", f"<{ident}>"))
            for column, value in candidates:
                row = self._conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {column} = ? {_ORDER} LIMIT 1",  # noqa: S608 - constants
                    (value,),
                ).fetchone()
                if row is not None:
                    record = _message_from_row(row)
                    opens = self._opens_where("tracking_id = ?", (record.tracking_id,))
                    return StoredMessage(
                        record=record, opens=tuple(opens.get(record.tracking_id, ()))
                    )
            return None

        return self._read(query)

    def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`.base.Store.list_messages`."""
        where, params = "", []
        if since is not None:
            where = "WHERE relayed_at_us >= ?"
            params.append(to_us(since))
        tail = ""
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            tail = "LIMIT ?"
            params.append(int(limit))
        selected = f"SELECT {{}} FROM messages {where} {_ORDER} {tail}"  # noqa: S608 - constants

        def query() -> list[StoredMessage]:
            rows = self._conn.execute(selected.format(_MESSAGE_COLUMNS), params).fetchall()
            opens = self._opens_where(f"tracking_id IN ({selected.format('tracking_id')})", params)
            return [
                StoredMessage(record=record, opens=tuple(opens.get(record.tracking_id, ())))
                for record in map(_message_from_row, rows)
            ]

        return self._read(query)

    def is_known_token(self, tracking_id: str) -> bool:
        """See :meth:`.base.Store.is_known_token`."""
        try:
            row = self._conn.execute(
                "SELECT 1 FROM messages WHERE tracking_id = ?", (tracking_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store: {exc}") from exc
        return row is not None

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"``, or the problems found, one per line."""
        rows = self._read(lambda: self._conn.execute("PRAGMA integrity_check").fetchall())
        return "\n".join(str(row[0]) for row in rows)

    def _opens_where(self, where: str, params: Iterable[Any]) -> dict[str, list[OpenRecord]]:
        opens: dict[str, list[OpenRecord]] = {}
        for tracking_id, at_us, ip, user_agent in self._conn.execute(
            "SELECT tracking_id, at_us, ip, user_agent FROM opens"  # noqa: S608 - constants
            f" WHERE {where} ORDER BY at_us, id",
            tuple(params),
        ):
            opens.setdefault(tracking_id, []).append(
                OpenRecord(tracking_id=tracking_id, at=from_us(at_us), ip=ip, user_agent=user_agent)
            )
        return opens

    def _read(self, query: Callable[[], _T]) -> _T:
        """Run *query* in one read transaction, so it sees one snapshot."""
        conn = self._conn
        try:
            conn.execute("BEGIN")
            try:
                return query()
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store: {exc}") from exc


def _message_from_row(row: Sequence[Any]) -> MessageRecord:
    (
        tracking_id,
        queue_id,
        message_id,
        sender,
        recipients,
        size_bytes,
        received_at_us,
        relayed_at_us,
        upstream_reply,
        tracked,
        not_tracked_reason,
        subject,
    ) = row
    return MessageRecord(
        tracking_id=tracking_id,
        queue_id=queue_id,
        message_id=message_id,
        sender=sender,
        recipients=[str(r) for r in json.loads(recipients)],
        size_bytes=int(size_bytes),
        received_at=from_us(received_at_us),
        relayed_at=from_us(relayed_at_us),
        upstream_reply=upstream_reply,
        tracked=bool(tracked),
        not_tracked_reason=not_tracked_reason,
        subject=subject,
    )


def _prepare(data_dir: Path, db_path: Path) -> None:
    """Create *data_dir* (0700) and an empty *db_path* (0600) when missing."""
    try:
        try:
            data_dir.mkdir(mode=0o700, parents=True)
            os.chmod(data_dir, 0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            if not stat.S_ISDIR(data_dir.stat().st_mode):
                raise StoreError(f"data directory {data_dir} is not a directory") from None
        try:
            fd = os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot create the tracking store in {data_dir}: {exc.strerror}") from exc


class SqliteStore:
    """The async :class:`~.base.Store` over :class:`SqliteDatabase`.

    Open with ``await SqliteStore.open(data_dir, ...)`` (same options as
    :meth:`SqliteDatabase.open`) and close with :meth:`aclose`, or use
    ``async with``.  Positive :meth:`is_known_token` answers are kept in an
    LRU cache of *known_cache_size* entries (tokens are never forgotten by the
    store, so a positive answer never goes stale).
    """

    def __init__(
        self,
        writer: SqliteDatabase,
        reader: SqliteDatabase,
        writer_executor: ThreadPoolExecutor,
        reader_executor: ThreadPoolExecutor,
        *,
        known_cache_size: int = 4096,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._writer_executor = writer_executor
        self._reader_executor = reader_executor
        self._known: OrderedDict[str, None] = OrderedDict()
        self._known_cache_size = known_cache_size
        self._closed = False

    @property
    def data_dir(self) -> Path:
        """The data directory."""
        return self._writer.data_dir

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        store_subject: bool = False,
        ip_policy: IpPolicy = "truncate",
        busy_timeout_s: float = 5.0,
        known_cache_size: int = 4096,
    ) -> SqliteStore:
        """Open, creating and migrating it if needed, the store in *data_dir*.

        :raises StoreError: as :meth:`SqliteDatabase.open`.
        """
        loop = asyncio.get_running_loop()
        writer_executor = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        reader_executor = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        writer: SqliteDatabase | None = None
        try:
            writer = await loop.run_in_executor(
                writer_executor,
                lambda: SqliteDatabase.open(
                    data_dir,
                    store_subject=store_subject,
                    ip_policy=ip_policy,
                    busy_timeout_s=busy_timeout_s,
                ),
            )
            reader = await loop.run_in_executor(
                reader_executor,
                lambda: SqliteDatabase.open(
                    data_dir,
                    store_subject=store_subject,
                    ip_policy="none",
                    busy_timeout_s=busy_timeout_s,
                    create=False,
                    migrate_schema=False,
                ),
            )
        except BaseException:
            if writer is not None:
                await loop.run_in_executor(writer_executor, writer.close)
            writer_executor.shutdown(wait=False)
            reader_executor.shutdown(wait=False)
            raise
        return cls(
            writer,
            reader,
            writer_executor,
            reader_executor,
            known_cache_size=known_cache_size,
        )

    async def aclose(self) -> None:
        """Let queued work finish, close both connections and their threads."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer_executor, self._writer.close)
        await loop.run_in_executor(self._reader_executor, self._reader.close)
        self._writer_executor.shutdown(wait=False)
        self._reader_executor.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self, executor: ThreadPoolExecutor, call: Callable[[], _T]) -> _T:
        if self._closed:
            raise StoreError("the tracking store is closed")
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def record_message(self, record: MessageRecord) -> None:
        """See :meth:`.base.Store.record_message`."""
        await self._run(self._writer_executor, lambda: self._writer.record_message(record))

    async def record_opens(self, hits: Sequence[OpenHit]) -> int:
        """See :meth:`.base.Store.record_opens`."""
        batch = list(hits)
        return await self._run(self._writer_executor, lambda: self._writer.record_opens(batch))

    async def find_message(self, ident: str) -> StoredMessage | None:
        """See :meth:`.base.Store.find_message`."""
        return await self._run(self._reader_executor, lambda: self._reader.find_message(ident))

    async def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """See :meth:`.base.Store.list_messages`."""
        if since is not None:
            to_us(since)  # raise ValueError here, not in the thread
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return await self._run(
            self._reader_executor,
            lambda: self._reader.list_messages(since=since, limit=limit),
        )

    async def is_known_token(self, tracking_id: str) -> bool:
        """See :meth:`.base.Store.is_known_token`; positive answers are cached."""
        if tracking_id in self._known:
            self._known.move_to_end(tracking_id)
            return True
        known = await self._run(
            self._reader_executor, lambda: self._reader.is_known_token(tracking_id)
        )
        if known and self._known_cache_size > 0:
            self._known[tracking_id] = None
            while len(self._known) > self._known_cache_size:
                self._known.popitem(last=False)
        return known

    async def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` of the database (``"ok"`` when sound)."""
        return await self._run(self._reader_executor, self._reader.integrity_check)
