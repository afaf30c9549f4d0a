"""``smtp-tracker reclassify [--since DATE]``: judge stored opens and clicks again.

After an upgrade that changed the classification rules, or a ``smtp-tracker
networks import``, the stored verdicts are the old rules'.  This command
judges every stored event again with the current rules, network lists and
``prefetch_window_s``, sets each message's counters from its events, and
rebuilds the daily counts so that they equal a count of the stored rows (see
:mod:`smtp_tracker.store.reclassify`, which also says what happens to days
whose messages were pruned).  It works in short transactions, so it is safe
to run while ``serve`` runs.  A progress bar (tqdm) goes to stderr when it is
a terminal.
"""

from __future__ import annotations

import argparse
import sys

from smtp_tracker.cli.flags import add_command, add_config_flags, load_config, open_store
from smtp_tracker.errors import ConfigError

__all__ = ["add_commands", "cmd_reclassify"]

#: The keys ``reclassify`` uses (``store``: SQLite in ``data_dir`` or PostgreSQL).
KEYS = ("data_dir", "store", "store_password_file", "prefetch_window_s")


def cmd_reclassify(args: argparse.Namespace) -> int:
    """Run ``reclassify``; prints one summary line.

    :raises ConfigError: for a bad ``--since`` or key (exit 2).
    :raises InputError: when there is no store (exit 1).
    :raises StoreError: when the store cannot be read or written (exit 1).
    """
    from datetime import date

    from tqdm import tqdm

    from smtp_tracker.classification import Classifier, load_networks

    since: date | None = None
    if args.since is not None:
        try:
            since = date.fromisoformat(args.since)
        except ValueError:
            raise ConfigError(
                f"--since: expected a date like 2026-11-21, got {args.since!r}"
            ) from None
    config = load_config(args)
    try:
        classifier = Classifier(load_networks(config.data_dir), config.prefetch_window_s)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    database = open_store(config, classifier=classifier)
    quiet = args.no_progress or not sys.stderr.isatty()
    with database:
        total, days = database.reclassify_scope(since)
        messages = events = changed = 0
        after = 0
        with tqdm(
            total=total, unit="msg", desc="reclassify", disable=quiet, file=sys.stderr
        ) as bar:
            while True:
                batch = database.reclassify_batch(
                    since=since, after_rowid=after, batch_messages=args.batch
                )
                if batch.messages == 0:
                    break
                messages += batch.messages
                events += batch.events
                changed += batch.changed
                after = batch.last_rowid
                bar.update(batch.messages)
        rebuilt = kept = 0
        for day in tqdm(days, unit="day", desc="daily counts", disable=quiet, file=sys.stderr):
            done = database.rebuild_rollup_day(day)
            rebuilt += done.rebuilt
            kept += done.kept
    scope = "all messages" if since is None else f"messages relayed since {since.isoformat()}"
    kept_note = f"; {kept} kept as adjusted (messages pruned or forgotten there)" if kept else ""
    print(
        f"smtp-tracker: reclassified {events} events of {messages} {scope}: {changed} changed "
        f"verdict; daily counts of {len(days)} days rebuilt from the rows "
        f"({rebuilt} day and sender-domain rows{kept_note})"
    )
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reclassify`` to the command line."""
    parser = add_command(
        commands,
        "reclassify",
        help="judge stored opens and clicks again with the current rules and network lists",
        description="Judge every stored open and click again with the current rules, network "
        "lists and prefetch_window_s (after an upgrade or 'smtp-tracker networks import'), set "
        "each message's counts from its events and rebuild the daily counts from the rows. "
        "Safe while serve runs: it works in short transactions.",
    )
    parser.add_argument(
        "--since",
        metavar="DATE",
        help="only messages relayed on or after this UTC day, YYYY-MM-DD (default: all)",
    )
    parser.add_argument(
        "--batch",
        type=_positive,
        default=200,
        metavar="N",
        help="messages per transaction (default 200)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none when not a terminal)"
    )
    add_config_flags(parser, KEYS)
    parser.set_defaults(func=cmd_reclassify)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
