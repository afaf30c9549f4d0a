"""The ``smtp-tracker`` command: ``serve``, ``check-config``, ``inject`` and the rest.

Every key of the TOML configuration has a flag of the same name with dashes
(``upstream_tls`` ↔ ``--upstream-tls``); a flag given overrides the file.  Each
command takes the flags of the keys it uses (:mod:`smtp_tracker.cli.flags`); the
commands live in :mod:`~smtp_tracker.cli.serve` (the listeners),
:mod:`~smtp_tracker.cli.records` (reading and deleting records) and
:mod:`~smtp_tracker.cli.admin` (the rest).  Flags are never abbreviated.

Problems a user can fix are printed as one line each, ``smtp-tracker: error: ...``,
with exit status 2 (configuration or usage) or 1 (start-up or input); never a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from smtp_tracker import __version__
from smtp_tracker.cli import admin, consent, migrate, milter, records, serve, store, webhooks
from smtp_tracker.cli.flags import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from smtp_tracker.errors import ConfigError, SmtpTrackerError, StartupError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp-tracker",
        description="An in-step SMTP relay for Postfix that tracks opens of HTML mail.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"smtp-tracker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_commands(commands)
    milter.add_commands(commands)
    records.add_commands(commands)
    admin.add_commands(commands)
    store.add_commands(commands)
    migrate.add_commands(commands)
    webhooks.add_commands(commands)
    consent.add_commands(commands)
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
