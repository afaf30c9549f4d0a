"""``smtp-tracker webhooks send|status|list-failed|retry|new-secret``: the outbox by hand.

``send`` delivers the outbox in a process of its own (beside ``serve`` with
``webhook_sender = false``); ``status`` and ``list-failed`` read the outbox
in the store (SQLite in ``--data-dir``, or PostgreSQL with ``--store``); ``retry`` makes
dead letters pending again (a running ``serve`` sends them within a second or
two); ``new-secret`` writes a Standard Webhooks secret for a ``[[webhooks]]``
table's ``secret_file``.  They are safe beside a running ``serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from smtp_tracker.cli.flags import EXIT_OK, add_command, add_config_flags, load_config
from smtp_tracker.config import Config
from smtp_tracker.errors import InputError, StoreError
from smtp_tracker.store.instant import now_us

if TYPE_CHECKING:
    from smtp_tracker.webhooks.outbox import Conn

__all__ = ["add_commands"]


@contextlib.contextmanager
def _open(args: argparse.Namespace) -> Iterator[Conn]:
    """A connection to the outbox of ``--store`` (PostgreSQL) or ``--data-dir`` (SQLite),
    closed at the end."""
    conn = _connect(args)
    try:
        yield conn
    finally:
        if isinstance(conn, sqlite3.Connection):
            conn.close()
        else:
            conn.raw.close()


def _connect(args: argparse.Namespace) -> Conn:
    from smtp_tracker.store import SqliteDatabase
    from smtp_tracker.store.backends import is_postgresql
    from smtp_tracker.store.integrity import DB_FILENAME
    from smtp_tracker.webhooks import outbox

    config = load_config(args)
    if is_postgresql(config.store):
        assert config.store is not None
        try:
            return outbox.connect_postgresql(
                config.store, password_file=config.store_password_file, create=False
            )
        except StoreError as exc:
            raise InputError(f"{exc}: give --store of a running smtp-tracker") from None
    data_dir = config.data_dir
    if not (data_dir / DB_FILENAME).is_file():
        raise InputError(f"no tracking store in {data_dir}: give --data-dir (or --config)")
    SqliteDatabase.open(data_dir, create=False).close()  # migrated to the outbox's schema
    try:
        return outbox.connect(data_dir)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the store in {data_dir}: {exc}") from exc


def _when(value_us: int | None) -> str:
    if value_us is None:
        return "-"
    return datetime.fromtimestamp(value_us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_status(args: argparse.Namespace) -> int:
    """The outbox's depth, its dropped events and each target's pending and dead deliveries."""
    from smtp_tracker.webhooks import outbox

    with _open(args) as conn:
        state = outbox.status(conn)
    if args.json:
        document = {
            "depth": state.depth,
            "dropped": state.dropped,
            "hooks": [
                {
                    "hook": h.hook,
                    "pending": h.pending,
                    "dead": h.dead,
                    "oldest_pending": _when(h.oldest_pending_us) if h.oldest_pending_us else None,
                    "disabled": h.disabled,
                }
                for h in state.hooks
            ],
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    print(f"outbox: {state.depth} events, {state.dropped} dropped (outbox full)")
    for h in state.hooks:
        line = f"{h.hook}: {h.pending} pending (oldest {_when(h.oldest_pending_us)}), {h.dead} dead"
        if h.disabled:
            line += f", DISABLED ({h.disabled})"
        print(line)
    return EXIT_OK


def cmd_list_failed(args: argparse.Namespace) -> int:
    """The dead letters, oldest first: event id, type, hook, attempts, last error."""
    from smtp_tracker.webhooks import outbox

    with _open(args) as conn:
        rows = outbox.list_failed(conn, limit=args.limit)
    if args.json:
        for row in rows:
            row["created"] = _when(row.pop("created_us"))
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        print(
            f"{row['id']}  {row['type']}  {_when(row['created_us'])}  {row['hook']}  "
            f"attempts={row['attempts']}  {row['last_error'] or ''}".rstrip()
        )
    if not rows:
        print("no dead letters")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Dead deliveries of one event (or all, enabling every hook a 410 disabled) pending again."""
    from smtp_tracker.webhooks import outbox

    if (args.id is None) == (not args.all):
        raise InputError("webhooks retry: give an event id or --all")
    with _open(args) as conn:
        count = outbox.retry(conn, None if args.all else args.id, now_us=now_us())
    if args.id is not None and count == 0:
        raise InputError(f"no dead letter with event id {args.id}")
    print(f"{count} deliveries pending again")
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    """Deliver the outbox until SIGTERM or SIGINT (beside ``serve``, ``webhook_sender = false``)."""
    from smtp_tracker.cli.serve import run_loop
    from smtp_tracker.logs import configure_logging

    config = load_config(args)
    if not config.webhooks and config.events_log is None:
        raise InputError("no [[webhooks]] and no events_log in the configuration: nothing to send")
    with _open(args):  # the store exists, at the outbox's schema
        pass
    configure_logging(config.log_level, config.log_format)
    return run_loop(_send(config))


async def _send(config: Config) -> int:
    import asyncio
    import logging
    import signal

    from smtp_tracker.app import webhook_sender

    log = logging.getLogger("smtp_tracker.webhooks")
    sender = await asyncio.to_thread(webhook_sender, config)
    await sender.start()
    log.info("sending events to %s", ", ".join(sender.targets))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if sender.event_log is not None:
        loop.add_signal_handler(signal.SIGHUP, sender.event_log.reopen)
    try:
        await stop.wait()
    finally:
        await sender.stop()
    return EXIT_OK


def cmd_new_secret(args: argparse.Namespace) -> int:
    """Write a new ``whsec_`` secret to FILE (mode 0600, never overwritten); print it."""
    from smtp_tracker.webhooks.signing import write_secret

    path: Path = args.file
    try:
        secret = write_secret(path)
    except FileExistsError:
        raise InputError(
            f"{path} exists; give a new file name (a secret is never overwritten)"
        ) from None
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc.strerror})") from None
    print(f"wrote a new webhook secret to {path} (mode 0600); give the receiver the same:")
    print(secret)
    return EXIT_OK


#: The keys naming the store the outbox is in.
_STORE_KEYS = ("data_dir", "store", "store_password_file")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``webhooks status|list-failed|retry|new-secret`` to the command line."""
    webhooks = add_command(
        commands,
        "webhooks",
        help="the webhook outbox: status, dead letters, retry, new secrets",
        description="Events (message.relayed, message.opened, link.clicked, ...) wait in an "
        "outbox in the store until each webhook answers 2xx; after webhook_retry_hours of "
        "failures they are dead letters. See docs/webhooks.md.",
    )
    actions = webhooks.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    status = add_command(
        actions,
        "status",
        help="events in the outbox, dropped, and each hook's pending and dead",
        description="The outbox's depth and dropped events, and per hook its pending and "
        "dead deliveries and whether a 410 disabled it.",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    add_config_flags(status, _STORE_KEYS)
    status.set_defaults(func=cmd_status)
    failed = add_command(
        actions,
        "list-failed",
        help="the dead letters, oldest first",
        description="Deliveries given up after webhook_retry_hours, or buried by a 410: "
        "event id, type, time, hook, attempts, last error.",
    )
    failed.add_argument("--limit", type=int, default=100, help="at most N (default 100)")
    failed.add_argument("--json", action="store_true", help="print JSON")
    add_config_flags(failed, _STORE_KEYS)
    failed.set_defaults(func=cmd_list_failed)
    retry = add_command(
        actions,
        "retry",
        help="send dead letters again: one event id, or --all",
        description="Make dead deliveries pending again with a new retry window; a running "
        "serve sends them. --all also enables every hook a 410 disabled.",
    )
    retry.add_argument("id", nargs="?", help="the event id (webhook-id) to send again")
    retry.add_argument("--all", action="store_true", help="every dead letter")
    add_config_flags(retry, _STORE_KEYS)
    retry.set_defaults(func=cmd_retry)
    send = add_command(
        actions,
        "send",
        help="deliver the outbox in a process of its own",
        description="Deliver the outbox's events to the [[webhooks]] and events_log until "
        "SIGTERM (SIGHUP reopens events_log), for serve run with webhook_sender = false: "
        "its event loop then only writes events. Safe beside another sender: a delivery is "
        "claimed with a lease.",
    )
    add_config_flags(
        send,
        (
            *_STORE_KEYS,
            "webhooks",
            "webhook_retry_hours",
            "webhook_outbox_max_events",
            "webhook_timeout_s",
            "webhook_backoff_base_s",
            "webhook_backoff_max_s",
            "events_log",
            "log_level",
            "log_format",
        ),
    )
    send.set_defaults(func=cmd_send)
    secret = add_command(
        actions,
        "new-secret",
        help="write a new whsec_ secret to FILE (mode 0600)",
        description="Write a Standard Webhooks secret (whsec_ and base64 of 32 random bytes) "
        "to FILE, created mode 0600, never overwritten; name it in a [[webhooks]] table's "
        "secret_file and give the receiver the same text.",
    )
    secret.add_argument("file", type=Path, metavar="FILE")
    secret.set_defaults(func=cmd_new_secret)
