"""The long-running commands: ``serve`` and the listeners run alone, ``pixel`` and ``reports``.

They take every configuration key: each part they start reads its own keys.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from smtp_tracker.cli.flags import add_command, add_config_flags, load_config
from smtp_tracker.config import Config
from smtp_tracker.logs import configure_logging
from smtp_tracker.workers import is_worker, supervise, worker_count

__all__ = ["add_commands", "cmd_pixel", "cmd_reports", "cmd_serve"]


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the ``fast`` extra), else None: asyncio's.

    uvloop runs the same protocols with its loop and transports in C (issue 15).
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine to its end in a loop from :func:`loop_factory`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    """``smtp-tracker serve``: relay (and track, and serve the pixel and reports) until SIGTERM."""
    from smtp_tracker.app import run

    def load() -> Config:
        # workers = 0: one per usable core, resolved here so that a reload
        # compares like with like (a worker is given its count as --workers N)
        config = load_config(args, require_upstream=True)
        return dataclasses.replace(config, workers=worker_count(config.workers))

    config = load()
    configure_logging(config.log_level, config.log_format)
    if config.workers > 1 and not is_worker():  # the supervisor (smtp_tracker.workers)
        return run_loop(supervise(config, sys.argv[1:]))
    return run_loop(run(config, reload_config=load))


def cmd_pixel(args: argparse.Namespace) -> int:
    """``smtp-tracker pixel``: the pixel endpoint alone."""
    return _run_alone(args, pixel=True)


def cmd_reports(args: argparse.Namespace) -> int:
    """``smtp-tracker reports``: the reports listener alone."""
    return _run_alone(args, pixel=False)


def _run_alone(args: argparse.Namespace, *, pixel: bool) -> int:
    """The pixel endpoint (``pixel``) or the reports listener (not ``pixel``) alone."""
    from smtp_tracker.app import run

    def load() -> Config:
        # one process: its listeners bind without SO_REUSEPORT (workers = 1)
        return dataclasses.replace(load_config(args), pixel=pixel, reports=not pixel, workers=1)

    config = load()
    configure_logging(config.log_level, config.log_format)
    return run_loop(run(config, smtp=False, reload_config=load))


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve``, ``pixel`` and ``reports`` to the command line."""
    serve = add_command(
        commands,
        "serve",
        help="relay mail from Postfix to the upstream",
        description="Accept SMTP from Postfix and relay each transaction to the upstream "
        "in step, giving Postfix the upstream's own replies.",
    )
    add_config_flags(serve)
    serve.set_defaults(func=cmd_serve)

    pixel = add_command(
        commands,
        "pixel",
        help="run only the HTTPS pixel endpoint",
        description="Serve the pixel endpoint alone, sharing the data directory with a "
        "'serve --no-pixel' on the same host.",
    )
    add_config_flags(pixel)
    pixel.set_defaults(func=cmd_pixel)

    reports = add_command(
        commands,
        "reports",
        help="run only the reports listener (JSON API and dashboard)",
        description="Serve the reports (HTTPS, behind the API token and the dashboard "
        "logins) alone, reading the data directory of a 'serve --no-reports' on the same host.",
    )
    add_config_flags(reports)
    reports.set_defaults(func=cmd_reports)
