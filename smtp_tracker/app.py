"""The composition root: builds the relay (and, with tracking, the pixel endpoint) from a Config.

:class:`Application` owns every long-lived resource: the SMTP listener, the
upstream TLS context, the capture writer, the tracking store and the pixel
site.  ``serve`` runs one in an event loop until SIGTERM or SIGINT, then stops
gracefully: no new connections, transactions in flight finish (up to
``shutdown_grace_s``), idle sessions are told ``421`` and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import ssl
import weakref
from pathlib import Path
from typing import Any

from smtp_tracker.config import Config
from smtp_tracker.errors import ConfigError, StartupError
from smtp_tracker.smtp.capture import CaptureWriter
from smtp_tracker.smtp.handler import DeliveryRecorder, MessagePreparer, RelayHandler
from smtp_tracker.smtp.relay import UpstreamSettings
from smtp_tracker.smtp.server import RelaySMTP

__all__ = ["Application", "run"]

log = logging.getLogger("smtp_tracker.main")


def upstream_tls_context(config: Config) -> ssl.SSLContext | None:
    """The client TLS context for the upstream (verification on unless skipped).

    :raises ConfigError: when ``upstream_ca_file`` cannot be loaded.
    """
    if config.upstream_tls == "none":
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.upstream_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(config.upstream_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"upstream_ca_file: cannot load {config.upstream_ca_file} as PEM certificates"
            ) from exc
    if config.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """Our own certificate, offered to downstream clients with STARTTLS (RFC 3207).

    :raises StartupError: when the certificate or key cannot be loaded or do not match.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except OSError as exc:
        raise StartupError(
            f"tls_cert/tls_key: cannot read {exc.filename or config.tls_cert} "
            f"({exc.strerror or 'unreadable'})"
        ) from exc
    except ssl.SSLError as exc:
        raise StartupError(
            f"tls_cert/tls_key: {config.tls_cert} and {config.tls_key} are not a matching "
            "PEM certificate and private key"
        ) from exc
    return context


def ensure_data_dir(path: Path) -> Path:
    """Create the data directory (mode 0700) if missing; check it is writable.

    :raises StartupError: when it cannot be created or written.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"data_dir: cannot create {path} ({exc.strerror})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"data_dir: {path} is not writable by this user")
    return path


class Application:
    """Everything ``serve`` runs, started and stopped as one.

    :param config: the validated configuration; ``config.upstream`` must be set.
    :param preparer: the rewrite stage (tests may pass their own).
    :param recorder: where relayed messages are recorded.
    """

    def __init__(
        self,
        config: Config,
        *,
        preparer: MessagePreparer | None = None,
        recorder: DeliveryRecorder | None = None,
    ) -> None:
        self.config = config
        upstream = config.upstream_address()
        self.capture = CaptureWriter(config.data_dir / "capture", mode=config.capture)
        self.handler = RelayHandler(
            upstream=UpstreamSettings(
                host=upstream.host,
                port=upstream.port,
                tls=config.upstream_tls,
                tls_context=upstream_tls_context(config),
                helo_name=config.hostname,
                user=config.upstream_user,
                password=config.upstream_password,
                connect_timeout_s=config.upstream_connect_timeout_s,
                command_timeout_s=config.upstream_command_timeout_s,
                data_timeout_s=config.upstream_data_timeout_s,
            ),
            hostname=config.hostname,
            max_recipients=config.max_recipients,
            add_received_header=config.add_received_header,
            preparer=preparer,
            recorder=recorder,
            capture=self.capture,
        )
        self._server_tls = server_tls_context(config)
        self._server: asyncio.Server | None = None
        self._protocols: weakref.WeakSet[RelaySMTP] = weakref.WeakSet()

    def _protocol(self) -> RelaySMTP:
        protocol = RelaySMTP(
            self.handler,
            allowed_clients=self.config.allowed_clients,
            max_message_bytes=self.config.max_message_bytes,
            client_timeout_s=self.config.client_timeout_s,
            hostname=self.config.hostname,
            tls_context=self._server_tls,
            keep_transcript=self.capture.enabled,
        )
        self._protocols.add(protocol)
        return protocol

    @property
    def smtp_address(self) -> tuple[str, int]:
        """The (host, port) the SMTP listener is bound to (port 0 is resolved)."""
        assert self._server is not None, "not started"
        sockname: Any = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def start(self) -> None:
        """Bind the listener and start serving.

        :raises StartupError: when the address cannot be bound (in use, not ours).
        """
        ensure_data_dir(self.config.data_dir)
        listen = self.config.listen
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._protocol, listen.host, listen.port)
        except OSError as exc:
            raise StartupError(
                f"listen: cannot listen on {listen} ({exc.strerror or exc}); "
                "is another process using it?"
            ) from exc
        host, port = self.smtp_address
        log.info("listening for SMTP on %s", _address_text(host, port))
        if not _is_loopback(listen.host):
            log.warning(
                "listening on %s, beyond loopback: only clients in allowed_clients (%s) are served",
                listen,
                ", ".join(str(n) for n in self.config.allowed_clients),
            )

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let transactions in flight finish (up to ``grace_s``), close."""
        if self._server is not None:
            self._server.close()
        if not await self.handler.wait_idle(grace_s):
            log.warning(
                "stopping with %d transactions unfinished; the client will retry",
                self.handler.active_transactions,
            )
        for protocol in list(self._protocols):
            if protocol.transport is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await protocol.push("421 4.3.2 smtp-tracker shutting down")
                protocol.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
        await self.handler.drain()
        await self.capture.drain()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _address_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run(config: Config, *, grace_s: float = 30.0) -> int:
    """Run ``serve`` until SIGTERM or SIGINT; return the exit status (0).

    :raises StartupError: when something needed at start-up is unavailable.
    """
    app = Application(config)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping: draining transactions in flight (up to %.0f s)", grace_s)
    await app.stop(grace_s)
    log.info("stopped")
    return 0
