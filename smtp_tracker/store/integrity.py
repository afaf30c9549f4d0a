"""Is the store sound, and putting a damaged one back together.

A damaged ``tracker.sqlite3`` must never stop mail (issue 12, item 8):
``serve`` opens the store with :meth:`~smtp_tracker.store.sqlite.SqliteStore.open_or_suspend`,
which runs with tracking records suspended when the file cannot be opened,
and checks it at start and periodically with :func:`probe` (``PRAGMA
quick_check`` and a read-back, on a connection of its own, of the last row
written: a store whose headers were overwritten under a running process
takes writes that a new connection never sees).

For the administrator (``smtp-tracker store check`` / ``store recover``):

* :func:`check_store` reads the file and its write-ahead log without writing
  (SQLite file format §1.3 header magic, WAL header magic §4.1,
  ``PRAGMA quick_check``, the schema version) and reports what it found;
* :func:`recover_store` moves the damaged file (and its ``-wal``/``-shm``)
  aside under a timestamped name and rebuilds the store from what can be
  read of it: SQLite's ``.recover`` (the ``sqlite3`` command-line shell,
  https://sqlite.org/recovery.html) when the shell is installed and
  succeeds, else table by table and row by row, stepping over damaged
  pages.  Stop ``serve`` first: the file must not be open elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from smtp_tracker.errors import StoreError
from smtp_tracker.store.migrations import CURRENT_VERSION, schema_version

__all__ = [
    "DB_FILENAME",
    "SQLITE_MAGIC",
    "StoreReport",
    "StoreSuspendedError",
    "check_store",
    "header_problem",
    "open_held",
    "probe",
    "quick_check",
    "recover_store",
    "wal_header_problem",
]

#: The database file's name inside the data directory.
DB_FILENAME: Final = "tracker.sqlite3"
#: The first 16 octets of every SQLite 3 database (file format §1.3).
SQLITE_MAGIC: Final = b"SQLite format 3\x00"
#: The two WAL header magic numbers, big-endian (file format §4.1).
_WAL_MAGICS: Final = (b"\x37\x7f\x06\x82", b"\x37\x7f\x06\x83")
#: Problems listed by ``PRAGMA quick_check(N)``.
_MAX_PROBLEMS: Final = 20
#: Seconds the shell's ``.recover`` may take.
_RECOVER_TIMEOUT_S: Final = 3600.0


class StoreSuspendedError(StoreError):
    """The store could not be opened at start: tracking records are suspended."""


@dataclass(frozen=True, kw_only=True)
class StoreReport:
    """What :func:`check_store` found.

    :param path: the database file.
    :param ok: True when nothing is wrong.
    :param problems: one line per problem, in the order found (empty when ``ok``).
    :param schema_version: ``PRAGMA user_version``, or None when unreadable.
    :param size_bytes: the database file's size (0 when missing).
    :param wal_bytes: the write-ahead log's size (0 when there is none).
    """

    path: Path
    ok: bool
    problems: tuple[str, ...]
    schema_version: int | None
    size_bytes: int
    wal_bytes: int

    def lines(self) -> list[str]:
        """The report as text lines, for the command line."""
        head = f"{self.path}: {'ok' if self.ok else 'DAMAGED'}"
        facts = [
            f"  size: {self.size_bytes} bytes, write-ahead log: {self.wal_bytes} bytes",
            "  schema: "
            + ("unreadable" if self.schema_version is None else f"v{self.schema_version}"),
        ]
        return [head, *facts, *(f"  problem: {p}" for p in self.problems)]


def quick_check(conn: sqlite3.Connection) -> str:
    """``PRAGMA quick_check``: ``"ok"``, or up to 20 problems, one per line.

    :raises sqlite3.Error: when the database cannot be read at all.
    """
    rows = conn.execute(f"PRAGMA quick_check({_MAX_PROBLEMS})").fetchall()
    return "\n".join(str(row[0]) for row in rows)


def _open_read_only(path: Path) -> sqlite3.Connection:
    """A connection that never writes *path* (``mode=ro``; WAL read as it is)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)


def probe(db_path: Path, last_rowid: int | None, *, db_fd: int | None = None) -> str | None:
    """Whether the store on disk is sound and keeps what was written.

    The magic strings of the database file and of its write-ahead log, read
    from disk (file format §1.3, §4.1: a running connection reads on through
    overwritten headers, but the next start discards the log); then, on a new
    read-only connection (so not the writer's page cache), ``PRAGMA
    quick_check`` and, when *last_rowid* is given, the message row the writer
    last committed.

    :param last_rowid: ``messages.id`` of the last message row the writer
        committed and still holds (None: none written yet).
    :param db_fd: a descriptor of *db_path* held open by the caller for as long
        as its connections are open (:func:`open_held`); required in a process
        with open SQLite connections to *db_path*: see :func:`header_problem`.
    :returns: None when sound; else one line saying what is wrong.
    """
    # A connection trusts the shared WAL index and reads on through overwritten
    # headers; the next start would not: the headers are read from disk here.
    problem = header_problem(db_path, db_fd=db_fd)
    if problem is not None:
        return problem
    try:
        conn = _open_read_only(db_path)
    except sqlite3.Error as exc:
        return f"cannot open {db_path}: {exc}"
    try:
        result = quick_check(conn)
        if result != "ok":
            return f"quick_check: {result.splitlines()[0]}"
        if last_rowid is not None:
            row = conn.execute("SELECT 1 FROM messages WHERE id = ?", (last_rowid,)).fetchone()
            if row is None:
                return f"a message row written (id {last_rowid}) does not read back from disk"
    except sqlite3.Error as exc:
        return f"cannot read {db_path}: {exc}"
    finally:
        conn.close()
    return None


def wal_header_problem(db_path: Path) -> str | None:
    """What is wrong with the header of *db_path*'s write-ahead log, or None.

    A ``-wal`` file whose header is not SQLite's (file format §4.1) is
    ignored, and overwritten, by the next connection: the writes it holds are
    lost.  Nothing is wrong when there is no log, or an empty one.
    """
    wal = db_path.with_name(db_path.name + "-wal")
    try:
        with wal.open("rb") as handle:
            head = handle.read(4)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read the write-ahead log: {exc.strerror}"
    if head and head not in _WAL_MAGICS:
        return "the write-ahead log header is not SQLite's: the writes it holds are lost"
    return None


def open_held(db_path: Path) -> int:
    """A read-only descriptor of *db_path*, to hold until the process's connections close.

    POSIX record locks belong to the process and a file: closing *any*
    descriptor of the database file drops every lock the process holds on it
    (fcntl(2); https://sqlite.org/howtocorrupt.html §2.2), the shared lock of
    its WAL-mode connections included.  Another process closing its
    connection then believes it is the last one: it checkpoints and deletes
    the ``-wal`` and ``-shm`` files, and this process writes on into the
    unlinked log, unseen by every other process until it stops.  So a process
    with open connections reads the header through this descriptor
    (:func:`header_problem`'s *db_fd*) and closes it only after them.

    :raises OSError: when the file cannot be opened.
    """
    return os.open(db_path, os.O_RDONLY | os.O_CLOEXEC)


def header_problem(db_path: Path, *, db_fd: int | None = None) -> str | None:
    """What is wrong with the headers of *db_path* and its write-ahead log, read from disk.

    Looked at before any connection is made: SQLite, failing to read an
    overwritten database header, may still remove the log beside it, and
    would ignore (and overwrite) a log whose header is damaged; either way the
    writes the log holds would be lost to ``store recover``.  An empty or
    missing file is a new store: nothing wrong.

    :param db_fd: read the database header through this descriptor (from
        :func:`open_held`) instead of opening and closing the file: a process
        with open connections to *db_path* must pass it, or the close drops
        their locks (the ``-wal`` file holds no locks; it is opened here).
    """
    try:
        if db_fd is not None:
            head = os.pread(db_fd, len(SQLITE_MAGIC), 0)
        else:
            with db_path.open("rb") as handle:
                head = handle.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        head = b""
    except OSError as exc:
        return f"cannot read {db_path}: {exc.strerror}"
    if head and head != SQLITE_MAGIC:
        return "the database file header is not SQLite's (overwritten?)"
    return wal_header_problem(db_path)


def check_store(data_dir: Path) -> StoreReport:
    """Check ``DATA_DIR/tracker.sqlite3`` and its write-ahead log without writing either.

    :param data_dir: the data directory.
    :returns: the report; never raises for a damaged or missing file (that is
        what the report says).
    """
    path = Path(data_dir) / DB_FILENAME
    wal = path.with_name(path.name + "-wal")
    problems: list[str] = []
    size = path.stat().st_size if path.is_file() else 0
    wal_size = wal.stat().st_size if wal.is_file() else 0
    version: int | None = None
    if not path.is_file():
        return StoreReport(
            path=path,
            ok=False,
            problems=("no database file",),
            schema_version=None,
            size_bytes=0,
            wal_bytes=wal_size,
        )
    with path.open("rb") as handle:
        if size and handle.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            problems.append("the file header is not SQLite's (overwritten?)")
    wal_problem = wal_header_problem(path)
    if wal_problem:
        problems.append(wal_problem)
    try:
        conn = _open_read_only(path)
    except sqlite3.Error as exc:
        problems.append(f"cannot open: {exc}")
    else:
        try:
            version = schema_version(conn)
            if version > CURRENT_VERSION:
                problems.append(f"schema v{version} is newer than this smtp-tracker")
            result = quick_check(conn)
            if result != "ok":
                problems.extend(f"quick_check: {line}" for line in result.splitlines())
        except sqlite3.Error as exc:
            problems.append(f"cannot read: {exc}")
        finally:
            conn.close()
    return StoreReport(
        path=path,
        ok=not problems,
        problems=tuple(dict.fromkeys(problems)),
        schema_version=version,
        size_bytes=size,
        wal_bytes=wal_size,
    )


def recover_store(data_dir: Path, *, now: datetime | None = None) -> Path:
    """Rebuild ``DATA_DIR/tracker.sqlite3`` from what can be read of it; keep the damaged file.

    The damaged file and its ``-wal``/``-shm`` are renamed
    ``tracker.sqlite3.damaged-YYYYMMDDTHHMMSSZ`` (``-wal``, ``-shm``); a new
    database is built beside them from SQLite's ``.recover`` (the ``sqlite3``
    shell), or, without the shell or when it fails (3.40's stops on
    ``WITHOUT ROWID`` tables), from the schema and each table's readable rows
    (those on damaged pages are lost); its
    schema version is the damaged file's (or the current one when
    unreadable), and it is moved into place only once it passes
    ``PRAGMA quick_check``.  Missing tables are created when ``serve`` next
    opens it.  Stop ``serve`` first.

    :param data_dir: the data directory.
    :param now: the time in the name kept aside (default: now, UTC).
    :returns: the path of the damaged file kept aside.
    :raises StoreError: when there is no database, or nothing could be rebuilt
        (the damaged file is then left where it was).
    """
    path = Path(data_dir) / DB_FILENAME
    if not path.is_file():
        raise StoreError(f"no tracking store at {path}")
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    building = path.with_name(f"{path.name}.recovering-{stamp}")
    if aside.exists() or building.exists():
        raise StoreError(f"{aside} already exists: try again in a second")
    # Work on a copy so that a failure leaves everything where it was.
    copy = path.with_name(f"{path.name}.copy-{stamp}")
    try:
        _copy_with_wal(path, copy)
        version = _schema_version(copy)
        recovered = False
        if shutil.which("sqlite3"):
            try:
                _recover_with_shell(copy, building)
                recovered = True
            except (StoreError, subprocess.SubprocessError):
                with contextlib.suppress(OSError):
                    building.unlink()
        if not recovered:
            _recover_by_rows(copy, building)
        conn = sqlite3.connect(building, isolation_level=None)
        try:
            conn.execute(f"PRAGMA user_version = {int(version)}")
            if quick_check(conn) != "ok":
                raise StoreError(f"the store rebuilt from {path} does not pass quick_check")
        finally:
            conn.close()
        os.chmod(building, 0o600)
        for suffix in ("", "-wal", "-shm"):
            source = path.with_name(path.name + suffix)
            if source.exists():
                os.replace(source, aside.with_name(aside.name + suffix))
        os.replace(building, path)
    except (OSError, sqlite3.Error, subprocess.SubprocessError) as exc:
        with contextlib.suppress(OSError):
            building.unlink()
        raise StoreError(f"cannot recover {path}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            building.unlink()
        raise
    finally:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                copy.with_name(copy.name + suffix).unlink()
    return aside


def _copy_with_wal(path: Path, copy: Path) -> None:
    """Copy the database and its WAL; in the copy, an overwritten magic string is put back
    (the rest of the header, page size included, is what ``.recover`` reads)."""
    for suffix in ("", "-wal"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            shutil.copyfile(source, copy.with_name(copy.name + suffix))
    with copy.open("r+b") as handle:
        if handle.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            handle.seek(0)
            handle.write(SQLITE_MAGIC)


def _schema_version(path: Path) -> int:
    """The damaged file's ``user_version`` (file format §1.3: octets 60-63), else current."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        pass
    with path.open("rb") as handle:
        header = handle.read(100)
    if header[: len(SQLITE_MAGIC)] == SQLITE_MAGIC and len(header) == 100:
        version = int.from_bytes(header[60:64], "big")
        if 0 < version <= CURRENT_VERSION:
            return version
    return CURRENT_VERSION


def _recover_with_shell(source: Path, target: Path) -> None:
    """``sqlite3 SOURCE .recover | sqlite3 TARGET`` (https://sqlite.org/recovery.html).

    :raises StoreError: when either step reports an error (the 3.40 shell's
        ``.recover`` stops with "SQL logic error" on ``WITHOUT ROWID`` tables).
    """
    dump = subprocess.run(
        ["sqlite3", str(source), ".recover"],
        capture_output=True,
        timeout=_RECOVER_TIMEOUT_S,
        check=False,
    )
    if dump.returncode != 0 or not dump.stdout.strip():
        said = dump.stderr.decode("utf-8", "replace").strip().splitlines()
        raise StoreError(f"sqlite3 .recover failed ({said[-1] if said else 'no message'})")
    loaded = subprocess.run(
        ["sqlite3", "-bail", str(target)],
        input=dump.stdout,
        capture_output=True,
        timeout=_RECOVER_TIMEOUT_S,
        check=False,
    )
    if loaded.returncode != 0 or not target.is_file():
        said = loaded.stderr.decode("utf-8", "replace").strip().splitlines()
        raise StoreError(f"sqlite3 could not load what .recover read ({said[-1:]})")


def _recover_by_rows(source: Path, target: Path) -> None:
    """The schema, then each table's rows as far as they read, then the indexes.

    A row that cannot be read (a damaged page) ends a scan; the scan of a
    rowid table goes on after it, from ever further rowids, so that the rows
    on other pages are kept.
    """
    src = sqlite3.connect(source, isolation_level=None)
    dst = sqlite3.connect(target, isolation_level=None)
    rows = 0
    try:
        schema = src.execute(
            "SELECT type, name, sql FROM sqlite_schema WHERE sql IS NOT NULL"
            " AND name NOT LIKE 'sqlite_%' ORDER BY type = 'index'"
        ).fetchall()
        dst.execute("BEGIN")
        for kind, name, sql in schema:
            if kind == "table":
                dst.execute(sql)
                rows += _copy_rows(
                    src, dst, str(name), without_rowid="WITHOUT ROWID" in sql.upper()
                )
        for kind, _name, sql in schema:
            if kind == "index":
                with contextlib.suppress(sqlite3.Error):  # a duplicate from a damaged page
                    dst.execute(sql)
        dst.execute("COMMIT")
    finally:
        src.close()
        dst.close()
    if rows == 0 and not schema:
        raise StoreError("nothing could be read from the damaged store")


def _copy_rows(
    src: sqlite3.Connection, dst: sqlite3.Connection, table: str, *, without_rowid: bool
) -> int:
    quoted = '"' + table.replace('"', '""') + '"'
    copied = 0
    if without_rowid:
        with contextlib.suppress(sqlite3.Error):
            for row in src.execute(f"SELECT * FROM {quoted}"):  # noqa: S608 - a schema name
                with contextlib.suppress(sqlite3.Error):
                    dst.execute(f"INSERT INTO {quoted} VALUES ({','.join('?' * len(row))})", row)  # noqa: S608
                    copied += 1
        return copied
    try:
        top = int(src.execute(f"SELECT max(rowid) FROM {quoted}").fetchone()[0] or 0)  # noqa: S608
    except sqlite3.Error:
        top = 1 << 62
    after, step = 0, 1
    while after < top:
        try:
            for row in src.execute(
                f"SELECT rowid, * FROM {quoted} WHERE rowid > ? ORDER BY rowid",  # noqa: S608
                (after,),
            ):
                after, step = int(row[0]), 1
                values = ",".join("?" * (len(row) - 1))
                with contextlib.suppress(sqlite3.Error):
                    dst.execute(f"INSERT INTO {quoted} VALUES ({values})", row[1:])  # noqa: S608
                    copied += 1
            break
        except sqlite3.Error:
            after, step = after + step, step * 2  # skip past the damaged page
    return copied
