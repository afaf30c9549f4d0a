"""``smtp-tracker migrate-store --from DATA_DIR --to DSN``: SQLite store into PostgreSQL.

Copies ``DATA_DIR/tracker.sqlite3`` (opened read-only, left untouched) into
the PostgreSQL database of ``--to`` with a progress bar on stderr; run it again
after an interruption and it goes on where it stopped; at the end each table's
rows and checksum are compared (:mod:`smtp_tracker.store.pg_copy`).  Then,
when every table matches, the reports dashboard's users file (``--reports-users-file``,
default ``DATA_DIR/reports-users.json``) is copied into ``dashboard_users``:
hashes and times as they are, users already in the store left as they are.
Exit 0 when every table matches, 1 when one does not (each named), 2 on bad
usage (a bad ``--to``; a users file named by ``--reports-users-file`` that does not
exist; a users file that cannot be read or parsed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtp_tracker.cli.flags import EXIT_OK, add_command
from smtp_tracker.errors import ConfigError, StartupError, StoreError

if TYPE_CHECKING:
    from smtp_tracker.store.dashboard_users import UserEntry

__all__ = ["add_commands", "cmd_migrate_store"]

EXIT_MISMATCH = 1


def cmd_migrate_store(args: argparse.Namespace) -> int:
    """Copy, then verify; prints one line per table, then one for the dashboard's users
    when there is a users file and every table matches.

    :raises ConfigError: for a bad ``--to``, or a users file that is missing (when named
        by ``--reports-users-file``), unreadable or not a users file; checked before the copy.
    :raises StoreError: when the source or the target fails.
    """
    from tqdm import tqdm

    from smtp_tracker.store import dashboard_users
    from smtp_tracker.store.backends import is_postgresql
    from smtp_tracker.store.pg_copy import copy_store, count_rows, open_source, verify

    if not is_postgresql(args.to):
        raise ConfigError(f"--to: expected postgresql://USER@HOST:PORT/DBNAME, got {args.to!r}")
    users = _read_users_file(args)
    kept: list[str] = []
    try:
        from smtp_tracker.store.postgresql import PgDatabase
    except ImportError:  # pragma: no cover - psycopg is in the postgresql extra
        raise StoreError(
            "psycopg is not installed: pip install 'smtp-tracker[postgresql]'"
        ) from None
    source = open_source(args.source)
    try:
        with PgDatabase.open(args.to, password_file=args.store_password_file) as database:
            target = database.connection.raw
            totals = count_rows(source)
            with tqdm(
                total=sum(totals.values()),
                unit="row",
                unit_scale=True,
                desc="migrate-store",
                file=sys.stderr,
                disable=args.quiet,
            ) as bar:
                try:
                    copy_store(
                        source,
                        target,
                        batch_rows=args.batch_rows,
                        progress=lambda table, rows: _advance(bar, rows),
                    )
                except Exception as exc:
                    import psycopg

                    if isinstance(exc, psycopg.Error):
                        raise StoreError(
                            f"the copy stopped ({str(exc).strip().splitlines()[0]}); "
                            "run the same command again to go on"
                        ) from exc
                    raise
            checks = verify(source, target)
            matched = all(check.ok for check in checks)
            if users is not None and matched:
                kept = dashboard_users.add_new(database.connection, users.values())
    finally:
        source.close()
    for check in checks:
        state = "ok" if check.ok else "MISMATCH"
        print(
            f"{check.table}: {check.target_rows}/{check.source_rows} rows, "
            f"checksum {check.target_sum}/{check.source_sum} {state}"
        )
    if matched:
        if users is not None:
            print(
                f"dashboard users: {len(users) - len(kept)} copied, {len(kept)} already in "
                "the store (left as they were)"
            )
        print(f"smtp-tracker: the store in {args.source} is copied; set store = {args.to!r}")
        return EXIT_OK
    return EXIT_MISMATCH


def _read_users_file(args: argparse.Namespace) -> dict[str, UserEntry] | None:
    """The users of ``--reports-users-file`` (default ``DATA_DIR/reports-users.json``): name ->
    entry, or None when the default file does not exist (nothing to copy).

    :raises ConfigError: when the file named by ``--reports-users-file`` does not exist, or a
        users file cannot be read or is not one (one line).
    """
    from smtp_tracker.web.reports.users import USERS_FILENAME, read_users

    path: Path = args.reports_users_file or args.source / USERS_FILENAME
    if not path.exists():
        if args.reports_users_file is None:
            return None
        raise ConfigError(f"--reports-users-file: {path} does not exist")
    try:
        return read_users(path)
    except StartupError as exc:
        raise ConfigError(str(exc)) from None


def _advance(bar: Any, rows: int) -> None:
    bar.update(rows)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``migrate-store`` to the command line."""
    parser = add_command(
        commands,
        "migrate-store",
        help="copy the SQLite tracking store of a data directory into PostgreSQL",
        description="Copy DATA_DIR/tracker.sqlite3 (read-only: it is left as it is) into the "
        "PostgreSQL database of --to, with a progress bar; run it again after an "
        "interruption to go on; each table's rows and checksum are compared at the end. "
        "Stop smtp-tracker first, or records made meanwhile are not copied.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        metavar="DATA_DIR",
        help="the data directory holding tracker.sqlite3",
    )
    parser.add_argument(
        "--to",
        required=True,
        metavar="DSN",
        help="postgresql://USER@HOST:PORT/DBNAME (no password: PGPASSFILE, ~/.pgpass, "
        "PGPASSWORD or --store-password-file)",
    )
    parser.add_argument(
        "--store-password-file", type=Path, metavar="FILE", help="file holding the password"
    )
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=5000,
        metavar="N",
        help="rows per transaction (default: 5000)",
    )
    parser.add_argument(
        "--reports-users-file",
        type=Path,
        metavar="FILE",
        help="the reports dashboard's users file, copied into the store once every table "
        "matches (hashes kept; users already there left as they are) (default: "
        "DATA_DIR/reports-users.json, when it exists)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_migrate_store)
