"""The milter listener: libmilter (through pymilter) in a thread beside the event loop.

libmilter accepts the MTA's connections and runs each in a thread of its own
(``smfi_main``); :class:`MilterListener` runs ``smfi_main`` in one more
thread, so the event loop (the pixel endpoint, the reports listener, the
store) keeps serving.  The address is bound before that thread starts
(``smfi_opensocket``), so a port in use is a start-up error, not a log line.

Addresses (``milter_listen``): ``HOST:PORT`` (``[v6]:PORT``) or ``unix:/path``
(a Unix-domain socket, mode 0660: give Postfix's user the group).  They are
written for libmilter as ``inet:PORT@HOST``, ``inet6:PORT@HOST`` and
``unix:/path`` (``smfi_setconn``).

libmilter allows one listener per process: ``smfi_main`` can run once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import Milter  # type: ignore[import-untyped]
import milter as libmilter  # type: ignore[import-not-found]

from smtp_tracker.errors import ConfigError, StartupError
from smtp_tracker.milter.filter import MilterContext, MilterFilter

__all__ = ["MilterAddress", "MilterListener", "parse_milter_listen"]

log = logging.getLogger("smtp_tracker.milter")

#: The name libmilter registers (Sendmail's ``X`` line; Postfix does not use it).
MILTER_NAME = "smtp-tracker"
#: Unix-domain socket mode: the MTA's group may connect, nobody else.
SOCKET_MODE = 0o660
#: Actions we may ask for (``SMFIF_*``): add/insert and change/remove header fields,
#: replace the body.  Nothing that touches the envelope.
_ACTIONS = libmilter.ADDHDRS | libmilter.CHGHDRS | libmilter.CHGBODY
#: Seconds libmilter waits for the MTA on a connection (``smfi_settimeout``),
#: longer than Postfix's own milter_content_timeout (300 s).
_MTA_TIMEOUT_S = 600


@dataclass(frozen=True, slots=True)
class MilterAddress:
    """Where the milter listens: a TCP ``host``/``port`` or a Unix-domain ``path``."""

    host: str = ""
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def libmilter_spec(self) -> str:
        """The address as ``smfi_setconn`` takes it."""
        if self.path is not None:
            return f"unix:{self.path}"
        family = "inet6" if ":" in self.host else "inet"
        return f"{family}:{self.port}@{self.host}"


def parse_milter_listen(text: str) -> MilterAddress:
    """Parse ``milter_listen``: ``HOST:PORT``, ``[v6]:PORT`` or ``unix:/absolute/path``.

    :raises ConfigError: when it is none of these.
    """
    from smtp_tracker.config import parse_host_port

    if text.startswith(("unix:", "local:")):
        path = text.partition(":")[2]
        if not path.startswith("/"):
            raise ConfigError(f"milter_listen: expected unix:/absolute/path, got {text!r}")
        return MilterAddress(path=Path(path))
    hostport = parse_host_port(text.removeprefix("inet:"), what="milter_listen")
    if hostport.port == 0:
        raise ConfigError("milter_listen: port 0 is not allowed (the MTA needs a fixed port)")
    return MilterAddress(host=hostport.host, port=hostport.port)


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc.strerror or "unknown error")


def _check_free(address: MilterAddress) -> None:
    """Fail now, with the reason, if the address cannot be had (libmilter only logs why).

    A ``milter_listen`` that cannot be had is a configuration error (exit status 2,
    issue 17): the MTA's ``smtpd_milters`` names the same address, so the fix is
    in the configuration.

    :raises ConfigError: in use, not bindable, or a path that is not a socket.
    """
    if address.path is not None:
        path = address.path
        if not path.parent.is_dir():
            raise ConfigError(
                f"milter_listen: cannot listen on {address} (no directory {path.parent})"
            )
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"milter_listen: {path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                return  # a stale socket: libmilter removes it
        raise ConfigError(
            f"milter_listen: cannot listen on {address} (in use); is another process using it?"
        )
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libmilter does
        try:
            probe.bind((address.host, address.port))
        except OSError as exc:
            text = f"milter_listen: cannot listen on {address} ({_reason(exc)})"
            if exc.errno == errno.EADDRINUSE:
                text += "; is another process using it?"
            raise ConfigError(text) from exc


class MilterListener:
    """The milter protocol endpoint: start it in the event loop, stop it to drain.

    :param address: where to listen.
    :param context: what the connections share (stage, limits, counters).
    """

    def __init__(self, address: MilterAddress, context: MilterContext) -> None:
        self.address = address
        self.context = context
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: set when libmilter's main loop has returned (stopped, or failed on its own)
        self.ended = asyncio.Event()

    async def open(self) -> None:
        """Bind the address (connections wait in the backlog until :meth:`serve`).

        :raises ConfigError: when the address is in use or cannot be bound.
        :raises StartupError: when libmilter cannot open it after all.
        """
        await asyncio.to_thread(self._open)

    def serve(self) -> None:
        """Start accepting the MTA's connections (after :meth:`open`)."""
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._main, args=(loop,), name="milter-main", daemon=True
        )
        self._thread.start()
        log.info("listening for milter connections on %s", self.address)

    def _open(self) -> None:
        _check_free(self.address)
        context = self.context

        def negotiate(ctx: object, opts: list[int]) -> int:
            instance = MilterFilter(context)
            instance._setctx(ctx)
            result: int = instance.negotiate(opts)
            return result

        libmilter.set_exception_policy(libmilter.ACCEPT)  # fail open, never tempfail
        libmilter.set_flags(_ACTIONS)
        libmilter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
        libmilter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
        libmilter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
        libmilter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
        libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
        libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
        libmilter.set_close_callback(Milter.close_callback)
        libmilter.setconn(self.address.libmilter_spec)
        libmilter.settimeout(_MTA_TIMEOUT_S)
        libmilter.register(MILTER_NAME, negotiate=negotiate)
        try:
            libmilter.opensocket(True)  # removes a stale Unix socket (checked unused above)
        except libmilter.error as exc:
            raise StartupError(f"milter_listen: cannot listen on {self.address}") from exc
        if self.address.path is not None:
            os.chmod(self.address.path, SOCKET_MODE)

    def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            libmilter.main()
        except libmilter.error:
            log.error("the milter listener on %s stopped with an error", self.address)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self.ended.set)

    async def stop(self, grace_s: float) -> None:
        """Let messages in progress end (up to ``grace_s`` seconds), then stop listening.

        libmilter notices the stop within its 5-second poll; connections still
        open then are cut, and the MTA applies its ``milter_default_action``.
        """
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        if not await asyncio.to_thread(self.context.wait_idle, grace_s):
            log.warning(
                "stopping with %d milter transactions unfinished; the MTA applies "
                "milter_default_action to them",
                self.context.busy,
            )
        libmilter.stop()
        await asyncio.to_thread(self._thread.join)
        if self.address.path is not None:
            with contextlib.suppress(OSError):
                self.address.path.unlink()
