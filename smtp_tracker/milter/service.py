"""``smtp-tracker milter``: the milter listener with the pixel endpoint and the reports listener.

It is ``serve`` with the SMTP relay swapped for a milter: the same
configuration, data directory, store, tracking stage, capture files,
retention, pixel endpoint and reports listener, built by
:class:`~smtp_tracker.app.Application`; only the mail enters and leaves
through the MTA's milter protocol instead of SMTP.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from smtp_tracker import app as parts
from smtp_tracker.config import Config
from smtp_tracker.milter.filter import MilterContext
from smtp_tracker.milter.listener import MilterListener, parse_milter_listen
from smtp_tracker.pruner import Pruner
from smtp_tracker.tracking.stage import Tracker

__all__ = ["MilterService", "run"]

log = logging.getLogger("smtp_tracker.main")


class MilterService:
    """The parts ``milter`` runs, started in order and stopped in reverse.

    :param config: the validated configuration (no upstream needed).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.address = parse_milter_listen(config.milter_listen)
        self.app = parts.Application(config, smtp=False)
        self.listener: MilterListener | None = None
        self.context: MilterContext | None = None
        self.tracker: Tracker | None = None
        self.pruner: Pruner | None = None

    async def start(self) -> None:
        """Open the store, start the pixel and reports listeners, then the milter.

        :raises StartupError: when the data directory, a certificate or an address
            cannot be had.
        :raises ConfigError: when ``milter_listen`` cannot be had or the disclosure
            footer cannot be read.
        """
        config = self.config
        app = self.app
        self.context = MilterContext(
            loop=asyncio.get_running_loop(),
            stage=None,
            max_message_bytes=config.max_message_bytes,
            timeout_s=config.milter_timeout_s,
            capture=app.capture,
        )
        listener = MilterListener(self.address, self.context)
        await listener.open()  # first: an address in use stops us before anything else starts
        await app.start()
        try:
            if config.tracking:
                self.tracker = await app.build_tracker()  # the one serve builds
                self.context.stage = self.tracker
                app.tracker = self.tracker  # Application.reload reconfigures it (SIGHUP)
            if app.store is not None and config.retention_days > 0:
                self.pruner = Pruner(app.store, config.data_dir / "capture", config.retention_days)
                self.pruner.start()
            listener.serve()
            self.listener = listener
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def stop(self, grace_s: float) -> None:
        """Drain the milter (up to ``grace_s`` seconds), then stop the rest in reverse."""
        if self.listener is not None and self.context is not None:
            await self.listener.stop(grace_s)
            log.info("milter counters: %s", parts.counters_text(self.context.counters.as_dict()))
        await self.app.capture.drain()
        if self.tracker is not None:
            log.info(
                "tracking counters: %s", parts.counters_text(parts.vars_of(self.tracker.counters))
            )
            await asyncio.to_thread(self.tracker.close)
            self.tracker = self.app.tracker = None
        if self.pruner is not None:
            await self.pruner.stop()
            self.pruner = None
        await self.app.stop(grace_s=0)


async def run(config: Config, *, reload_config: Callable[[], Config] | None = None) -> int:
    """Run ``milter`` until SIGTERM or SIGINT (or libmilter ends on its own).

    On SIGHUP: read the configuration again with ``reload_config`` (in a thread)
    and apply what can change without a restart, as ``serve`` does
    (:meth:`~smtp_tracker.app.Application.reload`: certificate, domain lists,
    disclosure, network lists), one reload at a time.

    :returns: the exit status, 0.
    :raises StartupError: when something needed at start-up is unavailable.
    """
    service = MilterService(config)
    await service.start()
    assert service.listener is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stop_reloading = parts.reload_on_hangup(service.app, reload_config)
    ended = asyncio.ensure_future(service.listener.ended.wait())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
    ended.cancel()
    stopping.cancel()
    stop_reloading()
    grace_s = config.shutdown_grace_s
    log.info("stopping: draining milter transactions in flight (up to %g s)", grace_s)
    await service.stop(grace_s)
    log.info("stopped")
    return 0
