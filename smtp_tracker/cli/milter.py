"""``smtp-tracker milter``: track mail inside Postfix's pipeline, as a milter (issue 17).

It takes every configuration key, as ``serve`` does; ``upstream`` is not needed
(Postfix delivers the mail itself).
"""

from __future__ import annotations

import argparse
import asyncio

from smtp_tracker.cli.flags import add_command, add_config_flags, load_config
from smtp_tracker.errors import StartupError
from smtp_tracker.logs import configure_logging

__all__ = ["add_commands", "cmd_milter"]


def cmd_milter(args: argparse.Namespace) -> int:
    """``smtp-tracker milter``: the milter, the pixel endpoint and the reports, until SIGTERM."""
    try:
        from smtp_tracker.milter.service import run
    except ImportError as exc:
        if exc.name != "Milter":
            raise
        raise StartupError(
            "the milter needs pymilter: install smtp-tracker[milter] "
            "(building it needs Debian's libmilter-dev and a C compiler)"
        ) from exc

    config = load_config(args)
    configure_logging(config.log_level, config.log_format)
    return asyncio.run(run(config, reload_config=lambda: load_config(args)))


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``milter`` to the command line."""
    milter = add_command(
        commands,
        "milter",
        help="track mail as a Postfix milter (smtpd_milters) instead of a relay",
        description="Listen on milter_listen for Postfix's milter connections and add the "
        "pixel (and the disclosure) to each tracked message before Postfix queues it; list "
        "it before the DKIM signer. Runs the pixel endpoint and the reports listener as "
        "serve does.",
    )
    add_config_flags(milter)
    milter.set_defaults(func=cmd_milter)
