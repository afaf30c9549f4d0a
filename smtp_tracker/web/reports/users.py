"""The users of the reports dashboard: names and argon2id password hashes, in one file
or, with a PostgreSQL store, in the store.

The file (default ``DATA_DIR/reports-users.json``, mode 0600) is managed by
``smtp-tracker user add|remove|list`` and read by the reports listener, which
notices changes without a restart (a removed user's sessions end at their
next request)::

    {"version": 1, "users": {"alice": {"hash": "$argon2id$v=19$...", "created_at": "..."}}}

Writes are atomic (a temporary file in the same directory, ``fsync``, then
``os.replace``), so a reader never sees half a file.  Hashes come from
argon2-cffi's :class:`~argon2.PasswordHasher` (argon2id, RFC 9106 §4 parameters of
the library's default profile); a password is never stored, logged or echoed.

With ``store = "postgresql://..."`` the users are the store's
(``dashboard_users``, :mod:`smtp_tracker.store.dashboard_users`), shared by
every reports host on it: the same commands manage them (:func:`add_user_to`,
:func:`remove_user_from`, with the same names, password rules and hashes), and
:meth:`UserDirectory.open_store` follows them as the file is followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from smtp_tracker.errors import InputError, StartupError, StoreError
from smtp_tracker.store import dashboard_users
from smtp_tracker.store.dashboard_users import UserEntry

if TYPE_CHECKING:
    from smtp_tracker.store.postgresql.connection import PgConnection

__all__ = [
    "PASSWORD_MAX_CHARS",
    "PASSWORD_MIN_CHARS",
    "USERS_FILENAME",
    "UserDirectory",
    "UserEntry",
    "UserSource",
    "add_user",
    "add_user_to",
    "check_password_rules",
    "check_user_name",
    "read_users",
    "remove_user",
    "remove_user_from",
    "write_users",
]

log = logging.getLogger(__name__)

#: The users file's name in the data directory when ``reports_users_file`` is unset.
USERS_FILENAME: Final = "reports-users.json"
#: Shortest password ``user add`` accepts, in characters.
PASSWORD_MIN_CHARS: Final = 10
#: Longest password accepted, in characters (bounds the hashing work per login).
PASSWORD_MAX_CHARS: Final = 1024

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_FORMAT_VERSION = 1
_HASHER: Final = PasswordHasher()


class UserSource(Protocol):
    """Where a :class:`UserDirectory` reads the users of a store from (the PostgreSQL
    store: :meth:`~smtp_tracker.store.postgresql.PostgresStore.read_dashboard_users`)."""

    async def read_dashboard_users(self) -> dict[str, UserEntry]:
        """Every user: name -> entry.

        :raises StoreError: when they cannot be read.
        """
        ...


def check_user_name(name: str) -> str:
    """Return *name* if it is a valid user name: 1-64 of ``A-Z a-z 0-9 . _ @ + -``, not
    starting with punctuation.

    :raises InputError: when it is not.
    """
    if not _NAME.fullmatch(name):
        raise InputError(
            f"user name {name!r}: use 1-64 letters, digits and . _ @ + -, starting with a "
            "letter or digit"
        )
    return name


def check_password_rules(password: str) -> str:
    """Return *password* if ``user add`` accepts it (length only: NIST SP 800-63B §5.1.1.2).

    :raises InputError: when it is shorter than :data:`PASSWORD_MIN_CHARS` or longer
        than :data:`PASSWORD_MAX_CHARS` characters.
    """
    if len(password) < PASSWORD_MIN_CHARS:
        raise InputError(f"the password must have at least {PASSWORD_MIN_CHARS} characters")
    if len(password) > PASSWORD_MAX_CHARS:
        raise InputError(f"the password must have at most {PASSWORD_MAX_CHARS} characters")
    return password


def read_users(path: Path) -> dict[str, UserEntry]:
    """The users in the file at *path*; an empty mapping when the file does not exist.

    :raises StartupError: when the file cannot be read or is not a users file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StartupError(f"users file: cannot read {path} ({exc.strerror})") from exc
    try:
        data = json.loads(text)
        if data.get("version") != _FORMAT_VERSION or not isinstance(data.get("users"), dict):
            raise ValueError("not a users file")
        users: dict[str, UserEntry] = {}
        for name, item in data["users"].items():
            encoded = item["hash"]
            if not isinstance(encoded, str) or not encoded.startswith("$argon2"):
                raise ValueError("not an argon2 hash")
            created = datetime.fromisoformat(item["created_at"])
            users[check_user_name(name)] = UserEntry(name, encoded, created)
    except (ValueError, TypeError, KeyError, AttributeError, InputError) as exc:
        raise StartupError(
            f"users file: {path} is not a smtp-tracker users file; fix or remove it"
        ) from exc
    return users


def write_users(path: Path, users: Mapping[str, UserEntry]) -> None:
    """Write *users* to *path* atomically, mode 0600 (the directory is created 0700).

    :raises StartupError: when the file cannot be written.
    """
    document: dict[str, Any] = {
        "version": _FORMAT_VERSION,
        "users": {
            name: {"hash": entry.password_hash, "created_at": entry.created_at.isoformat()}
            for name, entry in sorted(users.items())
        },
    }
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise StartupError(f"users file: cannot write in {directory} ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:  # mkstemp: mode 0600
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise StartupError(f"users file: cannot write {path} ({exc.strerror})") from exc
    with contextlib.suppress(OSError):  # make the rename durable; not fatal if unsupported
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def add_user(path: Path, name: str, password: str, *, replace: bool = False) -> bool:
    """Add user *name* with *password* (hashed), or set their password with *replace*.

    :returns: whether the user existed before.
    :raises InputError: when the name or password is invalid, or the user exists
        and *replace* is false.
    :raises StartupError: when the file cannot be read or written.
    """
    check_user_name(name)
    check_password_rules(password)
    entry = UserEntry(name, _HASHER.hash(password), datetime.now(UTC))
    with _changing(path):
        users = read_users(path)
        existed = name in users
        if existed and not replace:
            raise InputError(f"user {name!r} exists; add --replace to set a new password")
        users[name] = entry
        write_users(path, users)
    return existed


def add_user_to(conn: PgConnection, name: str, password: str, *, replace: bool = False) -> bool:
    """:func:`add_user` in a PostgreSQL store's ``dashboard_users`` (same rules, same hash).

    :returns: whether the user existed before.
    :raises InputError: as :func:`add_user`.
    :raises StoreError: when the store cannot be written.
    """
    check_user_name(name)
    check_password_rules(password)
    entry = UserEntry(name, _HASHER.hash(password), datetime.now(UTC))
    if replace:
        return dashboard_users.replace(conn, entry)
    if not dashboard_users.add(conn, entry):
        raise InputError(f"user {name!r} exists; add --replace to set a new password")
    return False


def remove_user_from(conn: PgConnection, name: str, where: str) -> None:
    """:func:`remove_user` from a PostgreSQL store's ``dashboard_users``; *where* names
    the store in the message (its DSN without a password).

    :raises InputError: when there is no such user.
    :raises StoreError: when the store cannot be written.
    """
    if not dashboard_users.remove(conn, name):
        raise InputError(f"no user {name!r} in {where}")


def remove_user(path: Path, name: str) -> None:
    """Remove user *name*.

    :raises InputError: when there is no such user.
    :raises StartupError: when the file cannot be read or written.
    """
    with _changing(path):
        users = read_users(path)
        if users.pop(name, None) is None:
            raise InputError(f"no user {name!r} in {path}")
        write_users(path, users)


@contextlib.contextmanager
def _changing(path: Path) -> Iterator[None]:
    """Hold the users file's lock (``flock`` on ``.NAME.lock`` beside it, mode 0600)
    while it is read, changed and written: two ``user`` commands at once would
    otherwise each write what they read, and one change would be lost.

    :raises StartupError: when the lock file cannot be made or opened.
    """
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"users file: cannot lock {lock} ({exc.strerror})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class UserDirectory:
    """The users as the reports listener sees them: the users file, re-read when it
    changes, or (:meth:`open_store`) a PostgreSQL store's, re-read every ``recheck_s``.

    Password checks are argon2 work (tens of milliseconds, tens of MiB): they run
    in worker threads, at most ``max_concurrent_checks`` at a time.

    The store down (:attr:`unavailable`)
        When the store's users cannot be read, nothing is decided on the last
        copy read: logins are refused (:meth:`check` answers None, the login
        page says why) and so are the pages (the auth middleware answers
        ``503``), but sessions are not ended, so a blip of the server signs
        nobody out.  Every request tries the store again (the store's own
        outage handling makes that cheap), so the first request served once it
        answers is judged by the users it holds then: a user removed, or a
        password replaced, on another host meanwhile is never let in on a stale
        copy.  Keeping the last copy would let in such a user for as long as
        the outage lasts; refusing costs nothing more, since every page reads
        the same store.  Logged once per outage (the server's message; never a
        hash), and when it answers again.

    :param path: the users file; it may not exist yet (nobody can log in then).
    :param recheck_s: how often, at most, the file's modification (or the store) is
        looked at, in seconds.
    :param max_concurrent_checks: password checks running at once; more wait.
    :param source: read the users from this store instead of *path* (:meth:`open_store`;
        *path* is then unused).
    """

    def __init__(
        self,
        path: Path,
        *,
        recheck_s: float = 1.0,
        max_concurrent_checks: int = 2,
        source: UserSource | None = None,
    ) -> None:
        self.path = path
        self._where = str(path)  # what the log lines name: the file, or the store (DSN)
        self._source = source
        #: why the store's users cannot be read now (one line), or None (always, for a file)
        self.unavailable: str | None = None
        self._reading = asyncio.Lock()
        self._recheck_s = recheck_s
        self._users: dict[str, UserEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = -float("inf")
        self._lock = threading.Lock()
        self._checks = asyncio.Semaphore(max_concurrent_checks)

    @classmethod
    async def open(cls, path: Path, **options: Any) -> UserDirectory:
        """A directory over *path*, read once; a warning is logged when group or others
        may read or write the file (it holds password hashes).

        :raises StartupError: when the file exists but cannot be read or parsed.
        """
        directory = cls(path, **options)
        await asyncio.to_thread(directory._reload, True)
        await asyncio.to_thread(_dummy_hash)  # made now, not during the first unknown login
        await asyncio.to_thread(_warn_if_shared, path)
        return directory

    @classmethod
    async def open_store(cls, source: UserSource, where: str, **options: Any) -> UserDirectory:
        """A directory over the users of a PostgreSQL store (*where* names it in messages,
        without a password), read once.  A store down at start is no error (the
        reports listener starts; see the class's docstring).
        """
        directory = cls(Path(), source=source, **options)
        directory._where = where
        await directory._read_source()
        await asyncio.to_thread(_dummy_hash)
        return directory

    async def _read_source(self) -> None:
        """Read the store's users; on failure keep nothing usable (:attr:`unavailable`)."""
        assert self._source is not None
        self._checked_at = time.monotonic()
        try:
            users = await self._source.read_dashboard_users()
        except StoreError as exc:
            if self.unavailable is None:
                log.error(
                    "reports: cannot read the dashboard's users from %s (%s); logins and "
                    "pages are refused until it answers (logged once per outage)",
                    self._where,
                    exc,
                )
            self.unavailable = str(exc)
            return
        if self.unavailable is not None:
            log.warning("reports: the dashboard's users are read from %s again", self._where)
        self._users, self.unavailable = users, None

    def _reload(self, strict: bool = False) -> None:
        """Re-read the file when its inode, size or mtime changed (blocking)."""
        with self._lock:
            self._checked_at = time.monotonic()
            try:
                info = self.path.stat()
                stamp: tuple[int, int, int] | None = (info.st_ino, info.st_size, info.st_mtime_ns)
            except FileNotFoundError:
                stamp = None
            except OSError as exc:
                if strict:
                    raise StartupError(f"users file: cannot read {self.path}") from exc
                return  # keep what we had
            if stamp == self._stamp:
                return
            try:
                self._users = read_users(self.path) if stamp is not None else {}
            except StartupError:
                if strict:
                    raise
                return  # a broken edit: keep the last good list
            self._stamp = stamp

    async def refresh(self) -> None:
        """Re-read the file if it changed and was not looked at in the last ``recheck_s``;
        the store's users if they were not read in the last ``recheck_s``, or could not be."""
        if self._source is None:
            if time.monotonic() - self._checked_at >= self._recheck_s:
                await asyncio.to_thread(self._reload)
            return
        async with self._reading:  # one read at a time; those waiting use its result
            if self.unavailable is not None or (
                time.monotonic() - self._checked_at >= self._recheck_s
            ):
                await self._read_source()

    def exists(self, name: str) -> bool:
        """Whether *name* is a user (as of the last :meth:`refresh`)."""
        return name in self._users

    @property
    def names(self) -> list[str]:
        """The user names, sorted."""
        return sorted(self._users)

    def stamp(self, name: str) -> str | None:
        """What names *name*'s current password (a digest of its hash), or ``None`` for no
        such user: a session made under another stamp is stale (the password was changed)."""
        entry = self._users.get(name)
        return None if entry is None else _stamp(entry)

    async def verify(self, name: str, password: str) -> bool:
        """Whether *password* is *name*'s password (see :meth:`check`)."""
        return await self.check(name, password) is not None

    async def check(self, name: str, password: str) -> str | None:
        """The :meth:`stamp` of *name*'s password if *password* is it, else ``None``.

        An unknown name costs as much as a wrong password (a dummy hash is
        checked), so response times do not tell which names exist.  None, without a
        check, while the store's users cannot be read (:attr:`unavailable`).
        """
        await self.refresh()
        if self.unavailable is not None:
            return None
        entry = self._users.get(name)
        if len(password) > PASSWORD_MAX_CHARS:
            return None
        encoded = entry.password_hash if entry is not None else _dummy_hash()
        async with self._checks:
            matched = await asyncio.to_thread(_verify, encoded, password)
        return _stamp(entry) if matched and entry is not None else None


def _stamp(entry: UserEntry) -> str:
    return hashlib.sha256(entry.password_hash.encode()).hexdigest()[:32]


def _warn_if_shared(path: Path) -> None:
    with contextlib.suppress(OSError):  # a missing file is fine: nobody can log in yet
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "users file: %s is readable by group or others; run: chmod 600 %s", path, path
            )


@functools.cache
def _dummy_hash() -> str:
    """Checked when the name is unknown, so a wrong name costs as long as a wrong password."""
    return _HASHER.hash("smtp-tracker: no such user")


def _verify(encoded: str, password: str) -> bool:
    try:
        return _HASHER.verify(encoded, password)
    except (VerificationError, InvalidHashError):
        return False
