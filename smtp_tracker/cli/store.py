"""``smtp-tracker store check`` and ``store recover``: the tracking store's own health.

A damaged ``tracker.sqlite3`` does not stop ``serve`` (it runs with records
suspended and ``/healthz`` says ``degraded: store``); these commands say what
is wrong and rebuild the store (:mod:`smtp_tracker.store.integrity`).  With
``store = "postgresql://..."``, ``check`` connects, reads the schema version
and writes a row back in a rolled-back transaction
(:func:`smtp_tracker.store.postgresql.check_server`); ``recover`` leaves
PostgreSQL to its own tools (``pg_dump``/``pg_restore``) and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from smtp_tracker.cli.flags import EXIT_OK, EXIT_USAGE, add_command, add_config_flags, load_config
from smtp_tracker.errors import InputError

__all__ = ["add_commands", "cmd_store_check", "cmd_store_recover"]

EXIT_DAMAGED = 1

#: The keys both commands use.
KEYS = ("data_dir", "store", "store_password_file")


def cmd_store_check(args: argparse.Namespace) -> int:
    """Print what :func:`~smtp_tracker.store.integrity.check_store` found; 1 when damaged."""
    from smtp_tracker.store.backends import is_postgresql, store_name
    from smtp_tracker.store.integrity import check_store

    config = load_config(args)
    if is_postgresql(config.store):
        assert config.store is not None
        from smtp_tracker.store.backends import check_server

        found = check_server(config.store, password_file=config.store_password_file)
        for line in found.lines():
            print(line)
        if not found.ok:
            print(f"smtp-tracker: {store_name(config.store, config.data_dir)} is not usable")
        return EXIT_OK if found.ok else EXIT_DAMAGED
    data_dir = config.data_dir
    report = check_store(data_dir)
    if not report.path.is_file():
        raise InputError(f"no tracking store in {data_dir}: give --data-dir (or --config)")
    for line in report.lines():
        print(line)
    if not report.ok:
        print("smtp-tracker: stop smtp-tracker, then run 'smtp-tracker store recover'")
    return EXIT_OK if report.ok else EXIT_DAMAGED


def cmd_store_recover(args: argparse.Namespace) -> int:
    """Rebuild the store; the damaged file is kept aside (its path is printed).

    With a PostgreSQL store: one line on stderr, exit 2 (PostgreSQL has its own tools).
    """
    from smtp_tracker.store.backends import is_postgresql
    from smtp_tracker.store.integrity import check_store, recover_store

    config = load_config(args)
    if is_postgresql(config.store):
        print(
            "smtp-tracker: store recover is for the SQLite store; PostgreSQL has its own "
            "tools (pg_dump/pg_restore)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    data_dir = config.data_dir
    aside = recover_store(data_dir)  # StoreError: one line, exit 1 (cli.main)
    print(f"smtp-tracker: the damaged store is kept as {aside}")
    for line in check_store(data_dir).lines():
        print(line)
    return EXIT_OK


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``store check`` and ``store recover`` to the command line."""
    store = add_command(
        commands,
        "store",
        help="check or recover the tracking store (tracker.sqlite3)",
        description="Check the tracking store in the data directory, or rebuild a damaged "
        "one. serve keeps relaying mail with a damaged store (tracking records suspended, "
        "/healthz says 'degraded: store'); stop it before 'store recover'.",
    )
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    check = add_command(
        actions,
        "check",
        help="check the store without writing it (exit 1 when damaged)",
        description="Read the database file and its write-ahead log without writing either: "
        "their headers, PRAGMA quick_check, the schema version. With --store "
        "postgresql://...: connect, read the schema version, write a row back in a "
        "rolled-back transaction. Exit 0 when sound, 1 when not.",
    )
    add_config_flags(check, KEYS)
    check.set_defaults(func=cmd_store_check)
    recover = add_command(
        actions,
        "recover",
        help="rebuild a damaged store, keeping the damaged file aside",
        description="Move tracker.sqlite3 (and its -wal, -shm) aside as "
        "tracker.sqlite3.damaged-<UTC time> and rebuild the store from what can be read of "
        "it: SQLite's .recover (the sqlite3 shell) when installed, else table by table. "
        "Stop smtp-tracker first. Not for PostgreSQL (use pg_dump/pg_restore): exit 2.",
    )
    add_config_flags(recover, KEYS)
    recover.set_defaults(func=cmd_store_recover)
