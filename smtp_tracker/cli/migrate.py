"""``smtp-tracker migrate-store --from DATA_DIR --to DSN``: SQLite store into PostgreSQL.

Copies ``DATA_DIR/tracker.sqlite3`` (opened read-only, left untouched) into
the PostgreSQL database of ``--to`` with a progress bar on stderr; run it again
after an interruption and it goes on where it stopped; at the end each table's
rows and checksum are compared (:mod:`smtp_tracker.store.pg_copy`).  Exit 0
when every table matches, 1 when one does not (each named), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from smtp_tracker.cli.flags import EXIT_OK, add_command
from smtp_tracker.errors import ConfigError, StoreError

__all__ = ["add_commands", "cmd_migrate_store"]

EXIT_MISMATCH = 1


def cmd_migrate_store(args: argparse.Namespace) -> int:
    """Copy, then verify; prints one line per table."""
    from tqdm import tqdm

    from smtp_tracker.store.backends import is_postgresql
    from smtp_tracker.store.pg_copy import copy_store, count_rows, open_source, verify

    if not is_postgresql(args.to):
        raise ConfigError(f"--to: expected postgresql://USER@HOST:PORT/DBNAME, got {args.to!r}")
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
    finally:
        source.close()
    for check in checks:
        state = "ok" if check.ok else "MISMATCH"
        print(
            f"{check.table}: {check.target_rows}/{check.source_rows} rows, "
            f"checksum {check.target_sum}/{check.source_sum} {state}"
        )
    if all(check.ok for check in checks):
        print(f"smtp-tracker: the store in {args.source} is copied; set store = {args.to!r}")
        return EXIT_OK
    return EXIT_MISMATCH


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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_migrate_store)
