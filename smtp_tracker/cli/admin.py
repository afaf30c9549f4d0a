"""The administration commands: ``check-config``, ``inject``, ``gencert``, ``networks``
and ``user``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtp_tracker.cli.flags import (
    EXIT_OK,
    add_command,
    add_config_flags,
    help_of,
    load_config,
    open_store,
)
from smtp_tracker.config import Config
from smtp_tracker.errors import ConfigError, InputError

if TYPE_CHECKING:
    from smtp_tracker.dkim import Resigner

__all__ = [
    "add_commands",
    "cmd_check_config",
    "cmd_gencert",
    "cmd_inject",
    "cmd_networks_import",
    "cmd_networks_list",
    "cmd_user_add",
    "cmd_user_list",
    "cmd_user_remove",
]


def cmd_networks_list(args: argparse.Namespace) -> int:
    from smtp_tracker.classification import load_networks

    config = load_config(args)
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

    config = load_config(args)
    imported = import_network_list(config.data_dir, args.name, args.file)
    print(
        f"smtp-tracker: {imported.name}: {imported.count} networks written to "
        f"{imported.origin}; restart smtp-tracker to use them"
    )
    return EXIT_OK


def cmd_gencert(args: argparse.Namespace) -> int:
    from smtp_tracker.tls import write_self_signed

    config = load_config(args)
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


def _user_store(args: argparse.Namespace, config: Config) -> Any:
    """The PostgreSQL store the users are in (an open
    :class:`~smtp_tracker.store.postgresql.PgDatabase`), or None for the users file
    (SQLite: no ``store``, or a path).

    ``user add`` creates the store in a database without one (as ``serve`` would:
    the users are usually the first thing set up on a new store, and the
    dashboard that reads them makes the same schema); ``list`` and ``remove``
    refuse such a database, as ``stats`` does (a mistyped database name must not
    get the store's tables).

    :raises InputError: when the store cannot be had.
    """
    from smtp_tracker.store.backends import is_postgresql

    if not is_postgresql(config.store):
        return None
    return open_store(config, create=args.user_command == "add")


def _store_name(config: Config) -> str:
    from smtp_tracker.store.backends import store_name

    return store_name(config.store, config.data_dir)


def cmd_user_add(args: argparse.Namespace) -> int:
    from smtp_tracker.web.reports.users import (
        add_user,
        add_user_to,
        check_password_rules,
        check_user_name,
    )

    config = load_config(args)
    check_user_name(args.name)
    password = check_password_rules(_read_new_password(args))
    database = _user_store(args, config)
    if database is None:
        where = str(config.reports_users_path)
        existed = add_user(config.reports_users_path, args.name, password, replace=args.replace)
    else:
        with database:
            where = _store_name(config)
            existed = add_user_to(database.connection, args.name, password, replace=args.replace)
    print(f"{'changed the password of' if existed else 'added'} user {args.name} in {where}")
    return EXIT_OK


def cmd_user_remove(args: argparse.Namespace) -> int:
    from smtp_tracker.web.reports.users import remove_user, remove_user_from

    config = load_config(args)
    database = _user_store(args, config)
    if database is None:
        where = str(config.reports_users_path)
        remove_user(config.reports_users_path, args.name)
    else:
        with database:
            where = _store_name(config)
            remove_user_from(database.connection, args.name, where)
    print(f"removed user {args.name} from {where}; their sessions end at their next request")
    return EXIT_OK


def cmd_user_list(args: argparse.Namespace) -> int:
    from smtp_tracker.store.dashboard_users import read_all
    from smtp_tracker.web.reports.users import read_users

    config = load_config(args)
    database = _user_store(args, config)
    if database is None:
        users = read_users(config.reports_users_path)
    else:
        with database:
            users = read_all(database.connection)
    for entry in sorted(users.values(), key=lambda e: e.name):
        print(f"{entry.name}\tadded {entry.created_at.isoformat(timespec='seconds')}")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from smtp_tracker.app import disclosure, dkim_keyring, server_tls_context, upstream_tls_context
    from smtp_tracker.dkim import describe_key

    config = load_config(args, require_upstream=True)
    upstream_tls_context(config)
    server_tls_context(config)
    disclosure(config)
    dkim_warnings: list[str] = []
    keyring = dkim_keyring(config, warnings=dkim_warnings)
    for warning in dkim_warnings:
        print(f"smtp-tracker: warning: {warning}", file=sys.stderr)
    for key in keyring.keys.values() if keyring is not None else ():
        print(f"smtp-tracker: DKIM key {describe_key(key)}")
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
    resigner = _inject_resigner(args)
    reverse_path = None if args.reverse_path is None else args.reverse_path.strip("<>")
    result = rewrite(message, args.pixel_url, policy, reverse_path=reverse_path)
    out, tracked, reason, dkim = result.message, result.tracked, result.reason, None
    if resigner is not None and out != message:
        out, tracked, reason, dkim = _inject_resign(resigner, message, result.message, reason)
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    decision = "tracked" if tracked else f"not tracked ({reason})"
    signed = f"; dkim={dkim}" if dkim else ""
    defects = f"; defects: {', '.join(result.defects)}" if result.defects else ""
    print(f"smtp-tracker: {decision}{signed}{defects}", file=sys.stderr)
    return EXIT_OK


def _inject_resigner(args: argparse.Namespace) -> Resigner | None:
    """The :class:`~smtp_tracker.dkim.Resigner` of ``inject --dkim-policy resign``, or None.

    :raises ConfigError: without ``--dkim-key-table``, or for a bad table or key
        (one line per problem, naming the file and line).
    """
    if args.dkim_policy != "resign":
        return None
    from smtp_tracker.dkim import Resigner, load_keyring

    if args.dkim_key_table is None:
        raise ConfigError("--dkim-policy resign needs --dkim-key-table")
    return Resigner(load_keyring(args.dkim_key_table, args.dkim_signing_table))


def _inject_resign(
    resigner: Resigner, original: bytes, rewritten: bytes, reason: str | None
) -> tuple[bytes, bool, str | None, str | None]:
    """Re-sign *rewritten* as ``serve`` does, or give *original* back with the reason.

    :returns: the message, whether it is tracked, why not, the DKIM outcome.
    """
    from smtp_tracker.dkim import ResignError

    check = resigner.check(original)
    if check.signatures == 0:
        return rewritten, True, reason, None
    if check.reason is None:
        try:
            return resigner.resign(rewritten, check), True, reason, "resigned"
        except ResignError as exc:
            print(f"smtp-tracker: DKIM re-sign failed: {exc}", file=sys.stderr)
            return original, False, "dkim-resign-failed", "dkim-resign-failed"
    return original, False, check.reason, check.reason


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check-config``, ``inject``, ``gencert``, ``networks`` and ``user``."""
    check = add_command(
        commands,
        "check-config",
        help="validate a configuration and exit",
        description="Validate the configuration (file and flags); print one line per problem.",
    )
    add_config_flags(check)
    check.set_defaults(func=cmd_check_config)

    inject = add_command(
        commands,
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
        "--dkim-policy",
        choices=["skip", "track", "resign"],
        default="skip",
        help=help_of("dkim_policy"),
    )
    inject.add_argument("--dkim-key-table", metavar="FILE", help=help_of("dkim_key_table"))
    inject.add_argument("--dkim-signing-table", metavar="FILE", help=help_of("dkim_signing_table"))
    inject.add_argument(
        "--tracking-requires-opt-in",
        action="store_true",
        help=help_of("tracking_requires_opt_in"),
    )
    inject.add_argument(
        "--control-header", default="X-Track", metavar="HEADER", help=help_of("control_header")
    )
    inject.set_defaults(func=cmd_inject)

    gencert = add_command(
        commands,
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
    add_config_flags(gencert, ("data_dir", "hostname"))
    gencert.set_defaults(func=cmd_gencert)

    networks = add_command(
        commands,
        "networks",
        help="show or refresh the network lists that classify opens",
        description="The network lists (Apple's Private Relay, Google's, security gateways') "
        "that the open and click classification matches client addresses against.",
    )
    network_commands = networks.add_subparsers(
        dest="networks_command", required=True, metavar="ACTION"
    )
    networks_list = add_command(
        network_commands,
        "list",
        help="each list's source, date and size",
        description="One line per list: name, networks, date of its data, packaged or "
        "imported, and its source.",
    )
    add_config_flags(networks_list, ("data_dir",))
    networks_list.set_defaults(func=cmd_networks_list)
    networks_import = add_command(
        network_commands,
        "import",
        help="replace a list with a file you downloaded",
        description="Validate FILE (one CIDR per line, a CSV whose first column is a CIDR "
        "such as Apple's egress-ip-ranges.csv, or Google's goog.json) and write it to "
        "DATA_DIR/networks/NAME.txt, which replaces the packaged list at the next start.",
    )
    networks_import.add_argument("name", metavar="NAME", help="the list, e.g. apple-mpp")
    networks_import.add_argument("file", type=Path, metavar="FILE", help="the downloaded file")
    add_config_flags(networks_import, ("data_dir",))
    networks_import.set_defaults(func=cmd_networks_import)

    user = add_command(
        commands,
        "user",
        help="manage the users of the reports dashboard",
        description="Add, remove and list the users who may log in to the reports dashboard "
        "(argon2id hashes): in reports_users_file (default DATA_DIR/reports-users.json, "
        "mode 0600), or, with a PostgreSQL store (--store postgresql://...), in the store, "
        "shared by every reports host on it. A running smtp-tracker sees the change within "
        "a second.",
    )
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    user_keys = ("data_dir", "reports_users_file", "store", "store_password_file")
    user_add = add_command(
        user_commands,
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
    add_config_flags(user_add, user_keys)
    user_add.set_defaults(func=cmd_user_add)
    user_remove = add_command(
        user_commands,
        "remove",
        help="remove a user",
        description="Remove a user; their sessions end.",
    )
    user_remove.add_argument("name", metavar="NAME", help="the user name")
    add_config_flags(user_remove, user_keys)
    user_remove.set_defaults(func=cmd_user_remove)
    user_list = add_command(
        user_commands, "list", help="list the users", description="List the users, one per line."
    )
    add_config_flags(user_list, user_keys)
    user_list.set_defaults(func=cmd_user_list)
