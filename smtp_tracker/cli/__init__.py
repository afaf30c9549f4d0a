"""The ``smtp-tracker`` command: ``serve``, ``check-config``, ``inject`` and the rest.

Every key of the TOML configuration has a flag of the same name with dashes
(``upstream_tls`` ↔ ``--upstream-tls``); a flag given overrides the file.
Problems a user can fix are printed as one line each, ``smtp-tracker: error: ...``,
with exit status 2 (configuration or usage) or 1 (start-up or input); never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtp_tracker import __version__
from smtp_tracker.config import PASSWORD_ENV, Config, config_from_sources
from smtp_tracker.errors import ConfigError, InputError, SmtpTrackerError, StartupError
from smtp_tracker.logs import configure_logging

if TYPE_CHECKING:
    from smtp_tracker.pruner import Outcome

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: One line of help per configuration key; the flag is the key with dashes.
KEY_HELP: dict[str, str] = {
    "listen": "address to accept SMTP from Postfix on, HOST:PORT (default 127.0.0.1:10025)",
    "hostname": "our host name in the greeting and Received: header (default: this host's FQDN)",
    "allowed_clients": "CIDR networks allowed to connect, comma-separated "
    "(default 127.0.0.0/8,::1/128)",
    "client_timeout_s": "seconds a downstream client may stay idle (default 300)",
    "max_message_bytes": "largest message accepted, in bytes; advertised as SIZE "
    "(default 52428800)",
    "max_recipients": "recipients accepted per transaction; more get 452 4.5.3 (default 1000)",
    "max_connections": "SMTP connections served at once; more get 421 4.3.2 and are closed "
    "(default 100)",
    "add_received_header": "prepend a Received: trace header (default on)",
    "tls_cert": "PEM certificate offered to clients with STARTTLS and by the HTTPS endpoints",
    "tls_key": "PEM private key for --tls-cert",
    "upstream": "the smarthost to relay to, HOST:PORT (required for serve)",
    "upstream_tls": "starttls (required, never falls back to plaintext), implicit, or none "
    "(default starttls)",
    "upstream_ca_file": "PEM CA bundle to verify the upstream's certificate "
    "(default: the system's)",
    "insecure_skip_verify": "do not verify the upstream's certificate (testing only)",
    "upstream_user": f"SMTP AUTH user at the upstream; the password comes from {PASSWORD_ENV} "
    "or upstream_password_file, never a flag",
    "upstream_password_file": "file holding the upstream password (mode 0600)",
    "upstream_connect_timeout_s": "seconds to connect, handshake and get the upstream's "
    "greeting (default 30)",
    "upstream_command_timeout_s": "seconds to wait for each upstream reply (default 300)",
    "upstream_data_timeout_s": "seconds to wait for the upstream's reply to the message "
    "(default 600)",
    "data_dir": "directory for the tracking store and capture files, created if missing "
    "(default ./smtp-tracker-data)",
    "capture": "debug capture files: off, errors (transactions not ending 2xx), or all "
    "(default off)",
    "log_level": "debug, info, warning or error (default info)",
    "log_format": "text (Postfix-like) or json (default text)",
    "shutdown_grace_s": "seconds SIGTERM waits for transactions in flight before telling "
    "their clients 421 4.3.2 and exiting (default 30)",
    "tracking": "inject the open-tracking pixel into HTML mail (default on)",
    "pixel_base_url": "public URL of the pixel endpoint, e.g. https://track.example.com:8443",
    "dkim_policy": "skip (never touch DKIM-signed mail) or track (default skip)",
    "tracking_requires_opt_in": "track only messages whose control header says yes (default off)",
    "control_header": "header that opts a message in (yes) or out (no); removed before relay "
    "(default X-Track)",
    "rewrite_timeout_s": "seconds the pixel rewrite may take before the original is relayed "
    "(default 10)",
    "store_subject": "keep the Subject in the tracking store (default off)",
    "rewrite_queue_wait_s": "seconds a message waits for a free rewrite thread before the "
    "original is relayed untracked (default 5)",
    "ip_policy": "how opens' client addresses are kept: full, truncate, hash or none "
    "(default truncate)",
    "track_clicks": "wrap the http/https links of tracked HTML mail in click URLs on the "
    "pixel endpoint, which redirect to the stored destination (default off)",
    "track_text_links": "with track_clicks, also wrap URLs in the text/plain alternative "
    "(default off)",
    "click_exclude_patterns": "regular expressions (case-insensitive) of URLs never wrapped, "
    "comma-separated (default: unsubscribe, opt-out and preference links)",
    "click_notrack_attribute": "links whose tag has this attribute are never wrapped "
    "(default data-notrack)",
    "include_sender_domains": "track only mail from these sender domains and their "
    "subdomains, comma-separated (default: all)",
    "exclude_sender_domains": "never track mail from these sender domains and their "
    "subdomains, comma-separated; wins over include",
    "include_recipient_domains": "track only transactions whose every recipient is in these "
    "domains or their subdomains, comma-separated (default: all)",
    "exclude_recipient_domains": "never track a transaction with a recipient in these domains "
    "or their subdomains, comma-separated; wins over include",
    "disclosure_footer_file": "HTML fragment (UTF-8) added before the pixel of tracked "
    "messages, read at start",
    "disclosure_header": "value of a header field added to tracked messages, one line "
    "(default: none)",
    "disclosure_header_name": "name of that header field (default X-Tracking-Notice)",
    "retention_days": "days message records and their events are kept; 0 keeps them forever "
    "(default 365)",
    "prefetch_window_s": "opens and clicks sooner than this after the relay count as "
    "scanner (default 30)",
    "max_events_per_token_per_min": "opens (or clicks) recorded per token per minute; "
    "0 for no limit (default 30)",
    "max_events_per_token_client_per_min": "opens (or clicks) recorded per token and "
    "client address per minute; 0 for no limit (default 5)",
    "pixel": "run the HTTPS pixel endpoint in this process (default on)",
    "pixel_listen": "address of the pixel endpoint, HOST:PORT (default 0.0.0.0:8443)",
    "pixel_plain_http": "serve the pixel endpoint over plain HTTP, behind a TLS proxy",
    "trusted_proxies": "CIDR networks whose X-Forwarded-For is believed, comma-separated",
    "reports": "run the reports listener (JSON API and dashboard) in serve (default on)",
    "reports_listen": "address of the reports listener, HOST:PORT (default 127.0.0.1:8444)",
    "reports_plain_http": "serve the reports over plain HTTP; only on a loopback reports_listen",
    "reports_token_file": "file holding the API bearer token, created 0600 with a random "
    "token when missing (default DATA_DIR/reports-token)",
    "reports_users_file": "the dashboard's users and password hashes, managed by 'smtp-tracker "
    "user' (default DATA_DIR/reports-users.json)",
    "reports_session_s": "seconds a dashboard login lasts (default 43200, 12 hours)",
    "reports_login_failures_per_min": "failed dashboard logins allowed per client address and "
    "per user name in any minute; more get 429 (default 5)",
}

_KEYS = [f for f in dataclasses.fields(Config) if f.name != "upstream_password"]


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML configuration file (flags override it)"
    )
    group = parser.add_argument_group("configuration keys (each overrides the file)")
    for spec in _KEYS:
        flag = "--" + spec.name.replace("_", "-")
        text = KEY_HELP[spec.name]
        if spec.type == "bool":
            group.add_argument(
                flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            group.add_argument(
                flag, dest=spec.name, default=None, metavar=_metavar(spec.name), help=text
            )


def _metavar(name: str) -> str:
    if name.endswith("_s"):
        return "SECONDS"
    if name.endswith("_bytes"):
        return "BYTES"
    if name.endswith("_per_min"):
        return "N"
    if name in {"listen", "upstream", "pixel_listen", "reports_listen"}:
        return "HOST:PORT"
    if name in {"allowed_clients", "trusted_proxies"}:
        return "CIDR[,CIDR...]"
    if name in {"tls_cert", "tls_key", "upstream_ca_file"}:
        return "PEM"
    if name in {"data_dir"}:
        return "DIR"
    return name.upper().replace("_", "-").split("-")[-1]


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {spec.name: getattr(args, spec.name, None) for spec in _KEYS}


def _load(args: argparse.Namespace, *, require_upstream: bool = False) -> Config:
    warnings: list[str] = []
    config = config_from_sources(
        config_file=args.config,
        flags=_flags(args),
        require_upstream=require_upstream,
        warnings=warnings,
    )
    for warning in warnings:
        print(f"smtp-tracker: warning: {warning}", file=sys.stderr)
    return config


# -- commands -------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from smtp_tracker.app import run

    config = _load(args, require_upstream=True)
    configure_logging(config.log_level, config.log_format)
    return asyncio.run(run(config))


def cmd_pixel(args: argparse.Namespace) -> int:
    from smtp_tracker.app import run

    config = dataclasses.replace(_load(args), pixel=True, reports=False)
    configure_logging(config.log_level, config.log_format)
    return asyncio.run(run(config, smtp=False))


def cmd_reports(args: argparse.Namespace) -> int:
    from smtp_tracker.app import run

    config = dataclasses.replace(_load(args), pixel=False, reports=True)
    configure_logging(config.log_level, config.log_format)
    return asyncio.run(run(config, smtp=False))


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


def cmd_stats(args: argparse.Namespace) -> int:
    from smtp_tracker.store.queries import stats_total
    from smtp_tracker.web.reports.api import stats_row_to_dict

    since = _parse_day(args.since, flag="--since")
    until = _parse_day(args.until, flag="--until")
    if since is not None and until is not None and since > until:
        raise ConfigError("--since: must not be after --until")
    with _open_database(args) as database:
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


def _open_database(args: argparse.Namespace) -> Any:
    from smtp_tracker.store import DB_FILENAME, SqliteDatabase

    config = _load(args)
    if not (config.data_dir / DB_FILENAME).exists():
        raise InputError(
            f"no tracking store in {config.data_dir}: give --data-dir (or --config) of a "
            "running smtp-tracker"
        )
    return SqliteDatabase.open(config.data_dir, create=False, migrate_schema=False)


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
    with _open_database(args) as database:
        stored = database.list_messages(since=since, limit=args.limit)
    _print_messages(stored, as_json=args.json)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with _open_database(args) as database:
        found = database.find_message(args.id)
    if found is None:
        raise InputError(f"no message with tracking id, queue id or Message-ID {args.id!r}")
    if args.json:
        from smtp_tracker.store import message_to_dict

        json.dump(
            message_to_dict(found.record, found.opens, found.clicks),
            sys.stdout,
            indent=2,
            ensure_ascii=False,
        )
        print()
    else:
        _print_messages([found], as_json=False)
        for event in found.opens:
            print(
                f"  opened {event.at.isoformat()} from {event.ip or '-'}  {event.verdict}"
                f" ({event.verdict_reason or '-'})  {event.user_agent}"
            )
    return EXIT_OK


def cmd_networks_list(args: argparse.Namespace) -> int:
    from smtp_tracker.classification import load_networks

    config = _load(args)
    for network in load_networks(config.data_dir).values():
        partial = " (partial)" if network.header.get("partial", "").startswith("yes") else ""
        origin = "packaged" if network.origin == "packaged" else f"imported: {network.origin}"
        print(
            f"{network.name:<14} {network.count:>8} networks  date {network.date or '-'}  "
            f"{origin}{partial}  source: {network.source or '-'}"
        )
    return EXIT_OK


def cmd_networks_import(args: argparse.Namespace) -> int:
    from smtp_tracker.classification import import_network_list

    config = _load(args)
    imported = import_network_list(config.data_dir, args.name, args.file)
    print(
        f"smtp-tracker: {imported.name}: {imported.count} networks written to "
        f"{imported.origin}; restart smtp-tracker to use them"
    )
    return EXIT_OK


def _delete_records(
    config: Config, delete: Callable[..., Outcome], what: object, *, dry_run: bool
) -> Outcome:
    """``delete(database, DATA_DIR/capture, what, dry_run=dry_run)`` on ``config``'s store.

    :raises InputError: when there is no store, or a capture file cannot be removed.
    """
    from smtp_tracker.store import DB_FILENAME, SqliteDatabase

    if not (config.data_dir / DB_FILENAME).exists():
        raise InputError(
            f"no tracking store in {config.data_dir}: give --data-dir (or --config) of a "
            "running smtp-tracker"
        )
    with SqliteDatabase.open(config.data_dir, create=False) as database:
        try:
            return delete(database, config.data_dir / "capture", what, dry_run=dry_run)
        except OSError as exc:
            raise InputError(f"cannot remove capture files: {exc.strerror or exc}") from exc


def cmd_prune(args: argparse.Namespace) -> int:
    from smtp_tracker.pruner import cutoff, prune_data_dir

    config = _load(args)
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
    config = _load(args)
    outcome = _delete_records(config, forget_recipient, address, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"smtp-tracker: {verb} {outcome.removed.messages} message records sent to <{address}>, "
        f"whole, other recipients included: {outcome.summary()}"
    )
    return EXIT_OK


def cmd_gencert(args: argparse.Namespace) -> int:
    from smtp_tracker.tls import write_self_signed

    config = _load(args)
    directory = config.data_dir / "tls"
    cert = args.cert or directory / "cert.pem"
    key = args.key or directory / "key.pem"
    if (cert.exists() or key.exists()) and not args.force:
        raise InputError(f"{cert} or {key} exists; add --force to replace them")
    for path in (cert, key):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    hostnames = args.name or list(dict.fromkeys([config.hostname, "localhost", "127.0.0.1"]))
    write_self_signed(cert, key, hostnames=hostnames, days=args.days)
    print(
        f"wrote {cert} and {key} (self-signed, for {', '.join(hostnames)}, "
        f"{args.days} days); use: --tls-cert {cert} --tls-key {key}"
    )
    return EXIT_OK


def _read_new_password(args: argparse.Namespace) -> str:
    """The password for ``user add``: one line of standard input, or asked twice on the TTY."""
    import getpass

    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        return password[:-1] if password.endswith("\r") else password
    if not sys.stdin.isatty():
        raise InputError("no terminal to ask the password on: pipe it in with --password-stdin")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Password (again): ") != password:
        raise InputError("the two passwords differ; nothing changed")
    return password


def cmd_user_add(args: argparse.Namespace) -> int:
    from smtp_tracker.web.reports.users import add_user, check_password_rules, check_user_name

    path = _load(args).reports_users_path
    check_user_name(args.name)
    password = check_password_rules(_read_new_password(args))
    existed = add_user(path, args.name, password, replace=args.replace)
    print(f"{'changed the password of' if existed else 'added'} user {args.name} in {path}")
    return EXIT_OK


def cmd_user_remove(args: argparse.Namespace) -> int:
    from smtp_tracker.web.reports.users import remove_user

    path = _load(args).reports_users_path
    remove_user(path, args.name)
    print(f"removed user {args.name} from {path}; their sessions end at their next request")
    return EXIT_OK


def cmd_user_list(args: argparse.Namespace) -> int:
    from smtp_tracker.web.reports.users import read_users

    users = read_users(_load(args).reports_users_path)
    for entry in sorted(users.values(), key=lambda e: e.name):
        print(f"{entry.name}\tadded {entry.created_at.isoformat(timespec='seconds')}")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from smtp_tracker.app import disclosure, server_tls_context, upstream_tls_context

    config = _load(args, require_upstream=True)
    upstream_tls_context(config)
    server_tls_context(config)
    disclosure(config)
    print(
        f"smtp-tracker: config OK: relaying {config.listen} -> {config.upstream} "
        f"({config.upstream_tls})"
    )
    return EXIT_OK


def cmd_inject(args: argparse.Namespace) -> int:
    from smtp_tracker.mime import RewritePolicy, rewrite

    if not args.pixel_url.startswith(("https://", "http://")):
        raise ConfigError(f"--pixel-url: expected an https:// URL, got {args.pixel_url!r}")
    policy = RewritePolicy(
        dkim_policy=args.dkim_policy,
        tracking_requires_opt_in=args.tracking_requires_opt_in,
        control_header=args.control_header,
    )
    try:
        message = args.input.read_bytes() if args.input else sys.stdin.buffer.read()
    except OSError as exc:
        raise InputError(f"cannot read {args.input}: {exc.strerror}") from exc
    if not message.strip():
        raise InputError("no message on standard input: pipe an .eml file in")
    reverse_path = None if args.reverse_path is None else args.reverse_path.strip("<>")
    result = rewrite(message, args.pixel_url, policy, reverse_path=reverse_path)
    sys.stdout.buffer.write(result.message)
    sys.stdout.buffer.flush()
    decision = "tracked" if result.tracked else f"not tracked ({result.reason})"
    defects = f"; defects: {', '.join(result.defects)}" if result.defects else ""
    print(f"smtp-tracker: {decision}{defects}", file=sys.stderr)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp-tracker",
        description="An in-step SMTP relay for Postfix that tracks opens of HTML mail.",
    )
    parser.add_argument("--version", action="version", version=f"smtp-tracker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="relay mail from Postfix to the upstream",
        description="Accept SMTP from Postfix and relay each transaction to the upstream "
        "in step, giving Postfix the upstream's own replies.",
    )
    _add_config_flags(serve)
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser(
        "check-config",
        help="validate a configuration and exit",
        description="Validate the configuration (file and flags); print one line per problem.",
    )
    _add_config_flags(check)
    check.set_defaults(func=cmd_check_config)

    inject = commands.add_parser(
        "inject",
        help="add the tracking pixel to one message (stdin to stdout)",
        description="Rewrite one message as serve would: read it from standard input (or "
        "--input), write the result to standard output, print the decision on standard "
        "error. Exit 0 whether it was tracked or not.",
    )
    inject.add_argument(
        "--pixel-url", required=True, metavar="URL", help="the pixel URL to put in the <img src>"
    )
    inject.add_argument(
        "--input",
        type=Path,
        metavar="FILE",
        help="read the message from FILE instead of standard input",
    )
    inject.add_argument(
        "--reverse-path",
        metavar="ADDRESS",
        help="the envelope sender; '<>' (a bounce) is never tracked",
    )
    inject.add_argument(
        "--dkim-policy", choices=["skip", "track"], default="skip", help=KEY_HELP["dkim_policy"]
    )
    inject.add_argument(
        "--tracking-requires-opt-in", action="store_true", help=KEY_HELP["tracking_requires_opt_in"]
    )
    inject.add_argument(
        "--control-header", default="X-Track", metavar="HEADER", help=KEY_HELP["control_header"]
    )
    inject.set_defaults(func=cmd_inject)

    pixel = commands.add_parser(
        "pixel",
        help="run only the HTTPS pixel endpoint",
        description="Serve the pixel endpoint alone, sharing the data directory with a "
        "'serve --no-pixel' on the same host.",
    )
    _add_config_flags(pixel)
    pixel.set_defaults(func=cmd_pixel)

    reports = commands.add_parser(
        "reports",
        help="run only the reports listener (JSON API and dashboard)",
        description="Serve the reports (HTTPS, behind the API token and the dashboard "
        "logins) alone, reading the data directory of a 'serve --no-reports' on the same host.",
    )
    _add_config_flags(reports)
    reports.set_defaults(func=cmd_reports)

    stats = commands.add_parser(
        "stats",
        help="print relayed, tracked, opened and opens per day or sender domain",
        description="Print the figures of the reports per UTC relay day or per sender domain: "
        "relayed, tracked, opened (messages with an open counted as real: human or "
        "mail_proxy), the open rate (opened / tracked), opened_any (an open of any verdict), "
        "opens (events) split by verdict, and clicks.",
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
    _add_config_flags(stats)
    stats.set_defaults(func=cmd_stats)

    messages = commands.add_parser(
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
    _add_config_flags(messages)
    messages.set_defaults(func=cmd_messages)

    show = commands.add_parser(
        "show",
        help="show one message and its opens",
        description="Show one message, found by tracking id, queue id or Message-ID.",
    )
    show.add_argument("id", metavar="ID", help="tracking id, queue id or Message-ID")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    _add_config_flags(show)
    show.set_defaults(func=cmd_show)

    prune = commands.add_parser(
        "prune",
        help="delete records older than retention_days",
        description="Delete the message records relayed more than retention_days ago, with "
        "their opens, clicks, links and recipients, and capture files of those days; the "
        "daily counts stay. serve does this once a day by itself.",
    )
    prune.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    _add_config_flags(prune)
    prune.set_defaults(func=cmd_prune)

    forget = commands.add_parser(
        "forget",
        help="delete every record of mail sent to one recipient",
        description="Delete every message record whose recipients include ADDRESS "
        "(case-insensitive), whole: one pixel served all recipients of a message, so the "
        "records of the other recipients of those messages go too. Capture files of those "
        "transactions, and of any captured conversation naming the address, are deleted.",
    )
    forget.add_argument(
        "--recipient", required=True, metavar="ADDRESS", help="the recipient's address"
    )
    forget.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    _add_config_flags(forget)
    forget.set_defaults(func=cmd_forget)

    gencert = commands.add_parser(
        "gencert",
        help="write a self-signed certificate for trying it out",
        description="Write a self-signed certificate and key (default DATA_DIR/tls/cert.pem "
        "and key.pem), for --tls-cert/--tls-key while trying smtp-tracker out.",
    )
    gencert.add_argument("--cert", type=Path, metavar="PEM", help="certificate path to write")
    gencert.add_argument("--key", type=Path, metavar="PEM", help="key path to write (mode 0600)")
    gencert.add_argument(
        "--name",
        action="append",
        metavar="HOST",
        help="a DNS name or IP address for the certificate (repeatable)",
    )
    gencert.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    gencert.add_argument("--force", action="store_true", help="replace existing files")
    _add_config_flags(gencert)
    gencert.set_defaults(func=cmd_gencert)

    networks = commands.add_parser(
        "networks",
        help="show or refresh the network lists that classify opens",
        description="The network lists (Apple's Private Relay, Google's, security gateways') "
        "that the open and click classification matches client addresses against.",
    )
    network_commands = networks.add_subparsers(
        dest="networks_command", required=True, metavar="ACTION"
    )
    networks_list = network_commands.add_parser(
        "list",
        help="each list's source, date and size",
        description="One line per list: name, networks, date of its data, packaged or "
        "imported, and its source.",
    )
    _add_config_flags(networks_list)
    networks_list.set_defaults(func=cmd_networks_list)
    networks_import = network_commands.add_parser(
        "import",
        help="replace a list with a file you downloaded",
        description="Validate FILE (one CIDR per line, a CSV whose first column is a CIDR "
        "such as Apple's egress-ip-ranges.csv, or Google's goog.json) and write it to "
        "DATA_DIR/networks/NAME.txt, which replaces the packaged list at the next start.",
    )
    networks_import.add_argument("name", metavar="NAME", help="the list, e.g. apple-mpp")
    networks_import.add_argument("file", type=Path, metavar="FILE", help="the downloaded file")
    _add_config_flags(networks_import)
    networks_import.set_defaults(func=cmd_networks_import)

    user = commands.add_parser(
        "user",
        help="manage the users of the reports dashboard",
        description="Add, remove and list the users who may log in to the reports dashboard "
        "(reports_users_file, default DATA_DIR/reports-users.json; argon2id hashes, mode 0600). "
        "A running smtp-tracker sees the change within a second.",
    )
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    user_add = user_commands.add_parser(
        "add",
        help="add a user (asks for the password)",
        description="Add a user; the password (at least 10 characters) is asked twice on the "
        "terminal, or read as one line from standard input with --password-stdin.",
    )
    user_add.add_argument("name", metavar="NAME", help="the user name (letters, digits, . _ @ + -)")
    user_add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )
    user_add.add_argument(
        "--replace", action="store_true", help="set a new password for an existing user"
    )
    _add_config_flags(user_add)
    user_add.set_defaults(func=cmd_user_add)
    user_remove = user_commands.add_parser(
        "remove", help="remove a user", description="Remove a user; their sessions end."
    )
    user_remove.add_argument("name", metavar="NAME", help="the user name")
    _add_config_flags(user_remove)
    user_remove.set_defaults(func=cmd_user_remove)
    user_list = user_commands.add_parser(
        "list", help="list the users", description="List the users, one per line."
    )
    _add_config_flags(user_list)
    user_list.set_defaults(func=cmd_user_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Exit status: 0 success, 1 start-up or input failure, 2 configuration or usage error.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"smtp-tracker: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"smtp-tracker: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except SmtpTrackerError as exc:
        print(f"smtp-tracker: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        logging.shutdown()
        return 130
    except BrokenPipeError:  # e.g. `smtp-tracker stats --json | head`: the reader left
        # Python would complain again when it flushes stdout at exit: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
