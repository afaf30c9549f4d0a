"""``smtp-tracker consent``: the per-recipient objection registry (issue 20).

``consent deny ADDRESS...``
    The addresses object to open tracking: mail to them is relayed untracked
    (reason ``consent-denied``) from the next transaction on.
``consent allow ADDRESS...``
    The addresses agreed to it (``granted``; what ``tracking_requires_consent``
    asks for); an objection is replaced.
``consent show ADDRESS``
    The address's state, when and from where (exit 1 when it has none).
``consent list [--state denied|granted] [--json]``
    Every address of the registry, by address.
``consent import FILE [--state denied|granted]``
    A CSV file (``-`` for standard input): one address per row (give
    ``--state``), or rows under a header with ``address`` and ``state`` columns
    (as ``export`` writes them).  All or nothing per 10,000 rows; a bad line is
    reported with its number before anything is written.
``consent export [FILE]``
    The registry as CSV (``address,state,at,source``), to standard output by default.

The registry lives in the tracking store (``DATA_DIR/tracker.sqlite3``, or
the PostgreSQL database of ``store``), so a running ``serve`` sees each change
at its next transaction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from smtp_tracker.cli.flags import EXIT_OK, add_command, add_config_flags, load_config
from smtp_tracker.errors import ConfigError, InputError, StoreError

__all__ = ["add_commands", "cmd_consent"]

EXIT_NOT_FOUND = 1
_KEYS = ("data_dir", "store", "store_password_file")


def _database(args: argparse.Namespace) -> Any:
    from smtp_tracker.store.backends import open_database

    config = load_config(args)
    return open_database(  # SQLite: created and migrated when needed; or PostgreSQL
        store=config.store,
        data_dir=config.data_dir,
        password_file=config.store_password_file,
        create=True,
        migrate_schema=True,
    )


def _addresses(values: list[str]) -> list[str]:
    from smtp_tracker.store.consent import canonical_address

    try:
        return [canonical_address(value) for value in values]
    except ValueError as exc:
        raise ConfigError(f"address: {exc}") from None


def _read_csv(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise InputError(f"cannot read {path} ({reason})") from None


def cmd_consent(args: argparse.Namespace) -> int:
    """Run one ``consent`` action; see the module's documentation."""
    import sqlite3

    from smtp_tracker.store import consent

    action: str = args.action
    try:
        with _database(args) as database:
            conn = database.connection
            if action in ("deny", "allow"):
                state: consent.ConsentState = "denied" if action == "deny" else "granted"
                addresses = _addresses(args.address)
                consent.set_states(conn, [(a, state) for a in addresses], source="cli")
                for address in addresses:
                    print(f"smtp-tracker: {address}: {state}")
                return EXIT_OK
            if action == "show":
                entry = consent.get_entry(conn, _addresses([args.address])[0])
                if entry is None:
                    print(
                        f"smtp-tracker: {args.address}: no state (tracked unless "
                        "tracking_requires_consent)"
                    )
                    return EXIT_NOT_FOUND
                if args.json:
                    print(json.dumps(entry.to_dict()))
                else:
                    row = entry.to_dict()
                    print(f"{row['address']}\t{row['state']}\t{row['at']}\t{row['source']}")
                return EXIT_OK
            if action == "list":
                entries = consent.iter_entries(conn, state=args.state)
                if args.json:
                    json.dump([e.to_dict() for e in entries], sys.stdout, indent=2)
                    print()
                else:
                    for entry in entries:
                        row = entry.to_dict()
                        print(f"{row['address']}\t{row['state']}\t{row['at']}\t{row['source']}")
                return EXIT_OK
            if action == "import":
                text = _read_csv(args.file)
                try:
                    pairs = list(consent.parse_csv(text, default_state=args.state))
                except ValueError as exc:
                    raise InputError(f"{args.file}: {exc}") from None
                source = "import:" + ("stdin" if args.file == "-" else Path(args.file).name)
                written = consent.set_states(conn, pairs, source=source)
                counts = consent.count_entries(conn)
                print(
                    f"smtp-tracker: imported {written} addresses; the registry holds "
                    f"{counts['denied']} denied and {counts['granted']} granted"
                )
                return EXIT_OK
            # export
            entries = consent.iter_entries(conn)
            if args.file in (None, "-"):
                consent.export_csv(entries, sys.stdout)
                return EXIT_OK
            try:
                with open(args.file, "w", encoding="utf-8", newline="") as out:
                    count = consent.export_csv(entries, out)
            except OSError as exc:
                raise InputError(f"cannot write {args.file} ({exc.strerror})") from None
            print(f"smtp-tracker: exported {count} addresses to {args.file}", file=sys.stderr)
            return EXIT_OK
    except StoreError:
        raise
    except Exception as exc:  # sqlite3.Error, psycopg.Error: one line, no traceback
        if isinstance(exc, sqlite3.Error) or type(exc).__module__.startswith("psycopg"):
            raise StoreError(f"consent registry: {exc}") from None
        raise


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``consent`` and its actions to the command line."""
    parser = add_command(
        commands,
        "consent",
        help="record who objects to (or agrees to) open tracking",
        description="The per-recipient objection registry: mail to an address that objects "
        "(deny) is relayed untracked; with tracking_requires_consent only mail whose "
        "recipients all agreed (allow) is tracked.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("deny", "the addresses object: never track mail to them"),
        ("allow", "the addresses agree to tracking (replaces an objection)"),
    ):
        sub = actions.add_parser(name, help=text, description=text, allow_abbrev=False)
        sub.add_argument("address", nargs="+", metavar="ADDRESS")
        add_config_flags(sub, _KEYS)
        sub.set_defaults(func=cmd_consent)
    show = actions.add_parser(
        "show", help="an address's state", description="An address's state.", allow_abbrev=False
    )
    show.add_argument("address", metavar="ADDRESS")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    add_config_flags(show, _KEYS)
    show.set_defaults(func=cmd_consent)
    listing = actions.add_parser(
        "list", help="every address", description="Every address, by address.", allow_abbrev=False
    )
    listing.add_argument("--state", choices=["denied", "granted"], help="only this state")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    add_config_flags(listing, _KEYS)
    listing.set_defaults(func=cmd_consent)
    importing = actions.add_parser(
        "import",
        help="addresses from a CSV file",
        description="Addresses from a CSV file (- for standard input): one per row with "
        "--state, or under a header naming address and state columns.",
        allow_abbrev=False,
    )
    importing.add_argument("file", metavar="FILE")
    importing.add_argument(
        "--state", choices=["denied", "granted"], help="the state of rows without one"
    )
    add_config_flags(importing, _KEYS)
    importing.set_defaults(func=cmd_consent)
    export = actions.add_parser(
        "export",
        help="the registry as CSV",
        description="The registry as CSV (address,state,at,source).",
        allow_abbrev=False,
    )
    export.add_argument("file", metavar="FILE", nargs="?", help="output file (default stdout)")
    add_config_flags(export, _KEYS)
    export.set_defaults(func=cmd_consent)
