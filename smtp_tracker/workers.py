"""``workers = N``: one supervisor and N ``serve`` processes on the same ports (issue 15).

One Python process uses one core; with ``workers`` above 1, ``serve`` becomes a
supervisor that starts that many worker processes, each a whole ``serve`` (SMTP,
LMTP, the pixel endpoint) listening on the same addresses with
``SO_REUSEPORT``, so that the kernel spreads new connections over them.

- **Count.** ``workers = 0`` (the default) is one per usable core
  (:func:`usable_cores`: the CPUs this process may run on, which a container's
  cpuset or ``taskset`` narrows, not the host's).  When that is 1, ``serve`` is
  one process and no supervisor, as with ``workers = 1``.
- **Reports.** The reports listener (JSON API and dashboard) runs in worker 0
  alone: the others are started with ``--no-reports``.  Its dashboard sign-ins
  and login-failure limits live in that process's memory
  (``web/reports/auth.py``'s ``SessionStore``), so every request must reach the
  same process; were it in every worker, a user whose next connection the
  kernel gave to another worker would be signed out.  When worker 0 is started
  again (below), it listens for reports again on the same port; its sign-ins
  are lost, as on any restart, and users sign in again.

- **Ports.** A configured port 0 is chosen once, by the supervisor: it binds a
  socket with ``SO_REUSEPORT`` to port 0 and keeps it bound, not listening, for
  its whole life (a socket that does not listen is given no connection), and
  hands the port to every worker (``--listen HOST:PORT`` and the like).
- **Data directory.** Every worker opens the same one: the store, the consent
  registry and the webhook outbox are SQLite databases in WAL mode, whose
  locking serialises writers across processes (each waits ``busy_timeout``).
- **Start.** Workers are ``python -m smtp_tracker`` with the supervisor's own
  arguments and :data:`WORKER_ENV` set to their index; a worker that exits with
  an error status within :data:`STARTUP_S` of its first start (a port taken, a
  bad key) stops the others, and the supervisor exits with the worker's status.
- **Restart.** A worker that ends later, whatever the reason (``SIGKILL``, a
  crash), is started again after :data:`RESTART_DELAY_S`, doubling while it
  keeps ending within :data:`STARTUP_S`, up to :data:`RESTART_DELAY_MAX_S`.  Its
  clients' transactions were never acknowledged before the upstream's (mail is
  relayed in step), so they are retried by Postfix, not lost.
- **Stop.** ``SIGTERM`` or ``SIGINT`` to the supervisor is passed to every
  worker as ``SIGTERM``: each drains (transactions in flight finish, within
  its ``shutdown_grace_s``); the supervisor exits 0 when all have ended.
  ``SIGHUP`` is passed on (each worker reloads).  If the supervisor itself is
  killed, the kernel sends its workers ``SIGTERM`` (``PR_SET_PDEATHSIG``).

- **Metrics.** With ``metrics`` on, each worker serves its own ``/metrics``
  on a private loopback port (chosen and held by the supervisor, like a port
  0) and the supervisor serves ``metrics_listen``: a scrape fetches every
  worker's and serves the sums per series, with ``smtp_tracker_workers`` and
  ``smtp_tracker_worker_up`` (:class:`~smtp_tracker.metrics.WorkerMetrics`).

What stays per worker: the event rate limits (each worker allows its own
share).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from smtp_tracker.config import Config, HostPort
from smtp_tracker.errors import StartupError
from smtp_tracker.metrics import WorkerMetrics

__all__ = [
    "REPORTS_WORKER",
    "RESTART_DELAY_MAX_S",
    "RESTART_DELAY_S",
    "STARTUP_S",
    "WORKER_ENV",
    "is_worker",
    "reserve_ports",
    "supervise",
    "usable_cores",
    "worker_count",
]

log = logging.getLogger("smtp_tracker.workers")

#: Set in a worker's environment to its index (0 to N-1).
WORKER_ENV = "SMTP_TRACKER_WORKER"
#: The index of the one worker that serves the reports listener.
REPORTS_WORKER = 0
#: A worker ending within this many seconds of its start counts as failing to start.
STARTUP_S = 10.0
#: The first wait before a worker that ended is started again, in seconds.
RESTART_DELAY_S = 1.0
#: The longest wait before a restart, in seconds.
RESTART_DELAY_MAX_S = 30.0

_PR_SET_PDEATHSIG = 1


def is_worker() -> bool:
    """Whether this process is a worker started by a supervisor."""
    return WORKER_ENV in os.environ


def usable_cores() -> int:
    """The CPUs this process may run on: at least 1.

    ``len(os.sched_getaffinity(0))`` where the platform has it (Linux: the
    affinity mask, which ``taskset``, a cgroup cpuset or a container's
    ``--cpuset-cpus`` narrows), else ``os.cpu_count()`` (the host's), else 1.
    A CPU quota (``--cpus``) without a cpuset is not counted.
    """
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        with contextlib.suppress(OSError):
            return max(1, len(getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def worker_count(configured: int) -> int:
    """The number of processes ``workers = configured`` runs: itself, or 0 → :func:`usable_cores`.

    :param configured: the ``workers`` key, 0 or more (the configuration check
        refuses a negative one).
    """
    return configured if configured > 0 else usable_cores()


def _listen_keys(config: Config) -> list[tuple[str, HostPort]]:
    """(flag, address) of every listener this configuration starts."""
    keys = [("--listen", config.listen)]
    for enabled, flag, address in (
        (config.lmtp, "--lmtp-listen", config.lmtp_listen),
        (config.pixel, "--pixel-listen", config.pixel_listen),
        (config.reports, "--reports-listen", config.reports_listen),
    ):
        if enabled:
            keys.append((flag, address))
    return keys


def reserve_ports(config: Config) -> tuple[list[str], list[socket.socket]]:
    """Choose each port 0 once: flags naming the ports, and the sockets that hold them.

    :returns: flags to append to the workers' arguments, and the bound (not
        listening) sockets to keep open while the workers run.
    :raises StartupError: when an address cannot be bound.
    """
    flags: list[str] = []
    held: list[socket.socket] = []
    for flag, address in _listen_keys(config):
        if address.port != 0:
            continue
        try:
            sock = _hold_port(address.host, held)
        except OSError as exc:
            raise StartupError(f"cannot bind {address} ({flag[2:]}): {exc.strerror}") from exc
        flags += [flag, str(HostPort(address.host, int(sock.getsockname()[1])))]
    return flags, held


def _loopback_ports(count: int) -> list[socket.socket]:
    """``count`` loopback ports for the workers' metrics, bound (not listening) and held.

    :raises StartupError: when loopback cannot be bound.
    """
    held: list[socket.socket] = []
    for _ in range(count):
        try:
            _hold_port("127.0.0.1", held)
        except OSError as exc:
            raise StartupError(f"cannot bind a port on 127.0.0.1: {exc.strerror}") from exc
    return held


def _hold_port(host: str, held: list[socket.socket]) -> socket.socket:
    """A port chosen on ``host``, bound (SO_REUSEPORT, not listening) and added to ``held``.

    :raises OSError: when ``host`` cannot be bound; every socket in ``held`` is closed then.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
    except OSError:
        sock.close()
        for other in held:
            other.close()
        raise
    held.append(sock)
    return sock


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    delay_s: float = RESTART_DELAY_S
    ever_ran: bool = False


class _Supervisor:
    def __init__(self, count: int, argv: Sequence[str], *, metrics_ports: list[int]) -> None:
        self.workers = [_Worker(index) for index in range(count)]
        self.argv = list(argv)
        #: each worker's private metrics port (empty: metrics off)
        self.metrics_ports = metrics_ports
        self.stopping = asyncio.Event()
        self.failure: int | None = None

    async def start(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "smtp_tracker",
            *self.argv,
            # the count as resolved here (a worker binds with SO_REUSEPORT), and
            # the reports listener in one worker only (its sign-ins are in memory)
            "--workers",
            str(len(self.workers)),
            *(["--no-reports"] if worker.index != REPORTS_WORKER else []),
            # each worker's /metrics on its loopback port; the supervisor sums them
            *(
                ["--metrics-listen", f"127.0.0.1:{self.metrics_ports[worker.index]}"]
                if self.metrics_ports
                else []
            ),
            env={**os.environ, WORKER_ENV: str(worker.index)},
            preexec_fn=_die_with_parent,
        )
        worker.started_at = loop.time()
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    async def keep(self, worker: _Worker) -> None:
        """Run one worker until the supervisor stops; start it again when it ends."""
        loop = asyncio.get_running_loop()
        while True:
            assert worker.process is not None
            status = await worker.process.wait()
            if self.stopping.is_set():
                return
            lived = loop.time() - worker.started_at
            if lived < STARTUP_S and not worker.ever_ran and status > 0:  # not a signal
                log.error("worker %d exited with status %d at start", worker.index, status)
                self.failure = status
                self.stop()
                return
            worker.ever_ran = worker.ever_ran or lived >= STARTUP_S
            worker.delay_s = (
                min(worker.delay_s * 2, RESTART_DELAY_MAX_S)
                if lived < STARTUP_S
                else RESTART_DELAY_S
            )
            log.warning(
                "worker %d (pid %d) ended with status %d; starting it again in %g s",
                worker.index,
                worker.process.pid,
                status,
                worker.delay_s,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(worker.delay_s):
                    await self.stopping.wait()
            if self.stopping.is_set():
                return
            await self.start(worker)
            worker.ever_ran = True

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            self.signal_all(signal.SIGTERM)

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)


async def supervise(config: Config, argv: Sequence[str]) -> int:
    """Run ``config.workers`` workers until SIGTERM or SIGINT; the exit status.

    :param config: its ``workers`` already resolved (:func:`worker_count`), above 1.
    :param argv: the command line after the program name (``serve ...``), given
        to every worker with the chosen ports, ``--workers N`` and (but to
        worker :data:`REPORTS_WORKER`) ``--no-reports`` appended.
    :returns: 0 after a drain, or the status of a worker that failed to start.
    :raises StartupError: when a port 0 address cannot be bound.
    """
    flags, held = reserve_ports(config)
    aggregate: WorkerMetrics | None = None
    if config.metrics:
        try:
            private = _loopback_ports(config.workers)
        except StartupError:
            for sock in held:
                sock.close()
            raise
        held += private
        ports = [int(sock.getsockname()[1]) for sock in private]
        aggregate = WorkerMetrics(ports)
        listen = config.metrics_listen
        try:
            port = await aggregate.start(listen.host, listen.port)
        except StartupError as exc:
            from smtp_tracker.app import bind_error  # the one wording of every listener's

            await aggregate.stop()
            for sock in held:
                sock.close()
            raise bind_error(
                "metrics_listen", listen, exc.__cause__, " Set metrics_listen, or --no-metrics"
            ) from exc
        log.info("supervisor: serving metrics on http://%s/metrics", HostPort(listen.host, port))
    supervisor = _Supervisor(
        config.workers, [*argv, *flags], metrics_ports=aggregate.ports if aggregate else []
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, supervisor.stop)
    loop.add_signal_handler(signal.SIGHUP, supervisor.signal_all, signal.SIGHUP)
    log.info("supervisor (pid %d): starting %d workers", os.getpid(), config.workers)
    if config.reports:
        log.info("supervisor: the reports listener runs in worker %d only", REPORTS_WORKER)
    try:
        for worker in supervisor.workers:
            await supervisor.start(worker)
        await asyncio.gather(*(supervisor.keep(worker) for worker in supervisor.workers))
        for worker in supervisor.workers:  # every worker has ended or been told to
            if worker.process is not None:
                await worker.process.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for sock in held:
            sock.close()
        if aggregate is not None:
            await aggregate.stop()
    if supervisor.failure is not None:
        return supervisor.failure
    log.info("supervisor: all %d workers stopped", config.workers)
    return 0
