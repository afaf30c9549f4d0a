"""The commands that read and delete records: ``stats``, ``messages``, ``show``,
``prune`` and ``forget``.

They take the configuration file and only the keys they use (``data_dir``, and
``retention_days`` and ``link_retention_days`` for ``prune``): no SMTP or TLS flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from smtp_tracker.cli import reclassify
from smtp_tracker.cli.flags import EXIT_OK, add_command, add_config_flags, load_config, open_store
from smtp_tracker.config import Config
from smtp_tracker.errors import ConfigError, InputError

if TYPE_CHECKING:
    from smtp_tracker.pruner import Outcome

__all__ = ["add_commands", "cmd_forget", "cmd_messages", "cmd_prune", "cmd_show", "cmd_stats"]


#: The keys the read-only commands use.
STORE_KEYS = ("data_dir", "store", "store_password_file")


def _parse_day(text: str | None, *, flag: str) -> Any:
    from datetime import date

    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected a date like 2026-11-21, got {text!r}") from None


#: The columns of ``smtp-tracker stats``: (heading, key of the JSON row).
_STATS_COLUMNS = (
    ("relayed", "relayed"),
    ("tracked", "tracked"),
    ("opened", "opened"),
    ("rate", "open_rate"),
    ("opened_any", "opened_any"),
    ("opens", "opens"),
    ("human", "human"),
    ("mail_proxy", "mail_proxy"),
    ("privacy_proxy", "privacy_proxy"),
    ("scanner", "scanner"),
    ("unknown", "unknown"),
    ("clicks", "clicks"),
    ("via_click", "opened_via_click"),
)


def _stats_cells(item: dict[str, Any]) -> list[str]:
    cells = [item["key"] or "(none)"]
    for _, name in _STATS_COLUMNS:
        if name == "open_rate":
            rate = item["open_rate"]
            cells.append("-" if rate is None else f"{rate * 100:.1f}%")
        else:
            cells.append(str(item["opens_by_verdict"].get(name, item.get(name))))
    return cells


def _mode_line(total: dict[str, Any]) -> str:
    """Which ``tracking_mode`` made the figures (issue 20), as the JSON's ``tracking_mode``:
    ``tracking mode: per-person``, ``aggregate``, or ``mixed (N of M messages aggregate)``."""
    mode = str(total["tracking_mode"])
    if mode == "mixed":
        mode += f" ({total['relayed_aggregate']} of {total['relayed']} messages aggregate)"
    return f"tracking mode: {mode}"


def _print_stats_table(group: str, items: list[dict[str, Any]], total: dict[str, Any]) -> None:
    header = [group, *(heading for heading, _ in _STATS_COLUMNS)]
    body = [_stats_cells(item) for item in items]
    footer = _stats_cells(total)
    widths = [max(len(row[i]) for row in [header, *body, footer]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print(line(header))
    for row in body:
        print(line(row))
    print("  ".join("-" * width for width in widths))
    print(line(footer))
    print(_mode_line(total))
    signed = {outcome: n for outcome, n in total["dkim"].items() if n}
    if signed:  # issue 13: how much signed mail is tracked
        print(
            f"DKIM-signed: {sum(signed.values())}: "
            + ", ".join(f"{outcome} {n}" for outcome, n in signed.items())
        )


def cmd_stats(args: argparse.Namespace) -> int:
    from smtp_tracker.store.queries import stats_total
    from smtp_tracker.web.reports.api import stats_row_to_dict

    since = _parse_day(args.since, flag="--since")
    until = _parse_day(args.until, flag="--until")
    if since is not None and until is not None and since > until:
        raise ConfigError("--since: must not be after --until")
    with open_store(load_config(args)) as database:
        rows = database.query_stats(since=since, until=until, group=args.group)
    items = [stats_row_to_dict(row) for row in rows]
    total = stats_row_to_dict(stats_total(rows))
    if args.json:
        document = {
            "group": args.group,
            "since": None if since is None else since.isoformat(),
            "until": None if until is None else until.isoformat(),
            "rows": items,
            "total": total,
        }
        json.dump(document, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        _print_stats_table(args.group, items, total)
    return EXIT_OK


def _parse_since(text: str | None) -> Any:
    from datetime import UTC, datetime

    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--since: expected an ISO 8601 time like 2026-11-21T10:00:00Z, got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _print_messages(stored: list[Any], *, as_json: bool) -> None:
    from smtp_tracker.store import message_to_dict

    items = [message_to_dict(m.record, m.opens, m.clicks) for m in stored]
    if as_json:
        json.dump(items, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return
    for item in items:
        tracked = "tracked" if item["tracked"] else f"not tracked ({item['not_tracked_reason']})"
        print(
            f"{item['relayed_at']}  {item['queue_id']}  {item['tracking_id']}  "
            f"from=<{item['sender']}> to={','.join(item['recipients'])}  {tracked}  "
            f"opens={len(item['opens'])}"
        )


def cmd_messages(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit <= 0:
        raise ConfigError("--limit: must be a whole number greater than 0")
    since = _parse_since(args.since)
    with open_store(load_config(args)) as database:
        stored = database.list_messages(since=since, limit=args.limit)
    _print_messages(stored, as_json=args.json)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with open_store(load_config(args)) as database:
        if args.json:  # the API's message object, field for field
            detail = database.query_message(args.id)
            found = None
        else:
            found = database.find_message(args.id)
            detail = None
    if found is None and detail is None:
        raise InputError(f"no message with tracking id, queue id or Message-ID {args.id!r}")
    if detail is not None:
        from smtp_tracker.store.export import detail_to_dict

        json.dump(detail_to_dict(detail), sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        assert found is not None
        _print_messages([found], as_json=False)
        for event in found.opens:
            print(
                f"  opened {event.at.isoformat()} from {event.ip or '-'}  {event.verdict}"
                f" ({event.verdict_reason or '-'})  {event.user_agent}"
            )
    return EXIT_OK


def _delete_records(
    config: Config, delete: Callable[..., Outcome], what: object, *, dry_run: bool
) -> Outcome:
    """``delete(database, DATA_DIR/capture, what, dry_run=dry_run)`` on ``config``'s store.

    :raises InputError: when there is no store, or a capture file cannot be removed.
    """
    from smtp_tracker.errors import StoreError
    from smtp_tracker.store.backends import open_database
    from smtp_tracker.store.sqlite import SqliteDatabase

    try:
        database = open_database(
            store=config.store,
            data_dir=config.data_dir,
            password_file=config.store_password_file,
            migrate_schema=True,
        )
    except StoreError as exc:
        raise InputError(f"{exc}: give --store or --data-dir of a running smtp-tracker") from None
    with database:
        # links outlive their message record for link_retention_days (the store's default
        # is 1825 days; serve sets it from the configuration at start, and so do we)
        if isinstance(database, SqliteDatabase):
            database.link_retention_days = config.link_retention_days
        try:
            return delete(database, config.data_dir / "capture", what, dry_run=dry_run)
        except OSError as exc:
            raise InputError(f"cannot remove capture files: {exc.strerror or exc}") from exc


def cmd_prune(args: argparse.Namespace) -> int:
    from smtp_tracker.pruner import cutoff, prune_data_dir

    config = load_config(args)
    before = cutoff(config.retention_days)
    if before is None:
        print("smtp-tracker: retention_days is 0: records are kept forever; nothing pruned")
        return EXIT_OK
    outcome = _delete_records(config, prune_data_dir, before, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"smtp-tracker: {verb} what was relayed before {before:%Y-%m-%dT%H:%M:%SZ} "
        f"(retention_days={config.retention_days}): {outcome.summary()}"
    )
    return EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    from smtp_tracker.pruner import forget_recipient

    address = args.recipient.strip().strip("<>")
    if not address or any(c in address for c in " \t\r\n"):
        raise ConfigError(f"--recipient: expected an address like bob@example.net, got {address!r}")
    config = load_config(args)
    outcome = _delete_records(config, forget_recipient, address, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"smtp-tracker: {verb} {outcome.removed.messages} message records sent to <{address}>, "
        f"whole, other recipients included: {outcome.summary()}"
    )
    return EXIT_OK


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stats``, ``messages``, ``show``, ``prune``, ``forget`` and ``reclassify``
    (:mod:`.reclassify`) to the command line."""
    stats = add_command(
        commands,
        "stats",
        help="print relayed, tracked, opened and opens per day or sender domain",
        description="Print the figures of the reports per UTC relay day or per sender domain: "
        "relayed, tracked, opened (messages with an open counted as real: human or "
        "mail_proxy, or failing that a counted click), the open rate (opened / tracked), "
        "opened_any (an open of any verdict), opens (events) split by verdict, clicks, and "
        "via_click (of opened, the messages opened by a counted click alone).",
    )
    stats.add_argument("--since", metavar="DATE", help="first UTC relay day, YYYY-MM-DD")
    stats.add_argument("--until", metavar="DATE", help="last UTC relay day, YYYY-MM-DD (included)")
    stats.add_argument(
        "--group",
        choices=["day", "sender_domain"],
        default="day",
        help="one row per day (default) or per sender domain",
    )
    stats.add_argument("--json", action="store_true", help="print a JSON object")
    add_config_flags(stats, STORE_KEYS)
    stats.set_defaults(func=cmd_stats)

    messages = add_command(
        commands,
        "messages",
        help="list relayed messages and their opens",
        description="List the messages recorded in the data directory, newest first.",
    )
    messages.add_argument("--json", action="store_true", help="print a JSON array")
    messages.add_argument(
        "--since",
        metavar="ISO8601",
        help="only messages relayed at or after this time (UTC if no zone)",
    )
    messages.add_argument("--limit", type=int, metavar="N", help="at most N messages")
    add_config_flags(messages, STORE_KEYS)
    messages.set_defaults(func=cmd_messages)

    show = add_command(
        commands,
        "show",
        help="show one message and its opens",
        description="Show one message, found by tracking id, queue id or Message-ID.",
    )
    show.add_argument("id", metavar="ID", help="tracking id, queue id or Message-ID")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    add_config_flags(show, STORE_KEYS)
    show.set_defaults(func=cmd_show)

    prune = add_command(
        commands,
        "prune",
        help="delete records older than retention_days",
        description="Delete the message records relayed more than retention_days ago, with "
        "their opens, clicks, links and recipients, capture files of those days, and the "
        "webhook events of before then still in the outbox (pending or dead letters); the "
        "daily counts stay. Links keep redirecting for link_retention_days. serve does this "
        "once a day by itself.",
    )
    prune.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    add_config_flags(prune, (*STORE_KEYS, "retention_days", "link_retention_days"))
    prune.set_defaults(func=cmd_prune)

    forget = add_command(
        commands,
        "forget",
        help="delete every record of mail sent to one recipient",
        description="Delete every message record whose recipients include ADDRESS "
        "(case-insensitive), whole: one pixel served all recipients of a message, so the "
        "records of the other recipients of those messages go too. Capture files of those "
        "transactions, and of any captured conversation naming the address, are deleted, and "
        "so are the webhook events still in the outbox (pending or dead letters) naming it.",
    )
    forget.add_argument(
        "--recipient", required=True, metavar="ADDRESS", help="the recipient's address"
    )
    forget.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    add_config_flags(forget, STORE_KEYS)
    forget.set_defaults(func=cmd_forget)

    reclassify.add_commands(commands)
