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
import dataclasses
import errno
import logging
import os
import signal
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

from aiohttp import web

from smtp_tracker.classification import Classifier, load_networks
from smtp_tracker.config import Config, HostPort, is_loopback_host
from smtp_tracker.dkim import Keyring, Resigner, describe_key, load_keyring
from smtp_tracker.errors import ConfigError, StartupError, StoreError
from smtp_tracker.metrics import Metrics
from smtp_tracker.mime import RewritePolicy
from smtp_tracker.pruner import FIRST_PRUNE_DELAY_S, PRUNE_INTERVAL_S, Pruner
from smtp_tracker.reload import ReloadError, SwappableClassifier
from smtp_tracker.reload import apply as apply_reload
from smtp_tracker.reload import disclosure as disclosure  # re-exported: cli.admin builds it too
from smtp_tracker.reload import prepare as prepare_reload
from smtp_tracker.smtp.capture import CaptureWriter
from smtp_tracker.smtp.failover import Upstreams
from smtp_tracker.smtp.handler import RelayHandler
from smtp_tracker.smtp.listener import ConnectionSlots, Listener
from smtp_tracker.smtp.lmtp import LmtpHandler, LmtpSMTP
from smtp_tracker.smtp.server import RelaySMTP
from smtp_tracker.smtp.upstream import UpstreamObserver, UpstreamSettings
from smtp_tracker.store import EventClassifier, SqliteStore
from smtp_tracker.store.address import load_or_create_hash_key
from smtp_tracker.store.backends import open_registry, open_store, store_name
from smtp_tracker.store.consent import ConsentRegistry
from smtp_tracker.store.postgresql import PostgresStore
from smtp_tracker.store.writer import EventWriter
from smtp_tracker.tls import load_server_context, write_self_signed
from smtp_tracker.tracking.consent import ConsentCheck
from smtp_tracker.tracking.domains import DomainPolicy
from smtp_tracker.tracking.stage import Tracker, TrackerCounters
from smtp_tracker.web.public.limits import EventLimiter
from smtp_tracker.web.public.optout import FORM_KEY_FILENAME, OptoutPage, load_template
from smtp_tracker.web.public.pixel import WRITER_KEY, make_pixel_app
from smtp_tracker.web.reports.api import create_token_file
from smtp_tracker.web.reports.app import build_reports_app
from smtp_tracker.web.reports.auth import load_reports_token
from smtp_tracker.web.reports.users import UserDirectory
from smtp_tracker.web.site import start_site
from smtp_tracker.webhooks.sender import WebhookSender

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


def upstream_list(config: Config, observer: UpstreamObserver | None = None) -> Upstreams:
    """The ordered upstreams and the ``[[copies]]``, all with the upstream's TLS and AUTH.

    :raises ConfigError: when ``upstream_ca_file`` cannot be loaded.
    """
    context = upstream_tls_context(config)

    def settings(address: HostPort) -> UpstreamSettings:
        return UpstreamSettings(
            host=address.host,
            port=address.port,
            tls=config.upstream_tls,
            tls_context=context,
            helo_name=config.hostname,
            user=config.upstream_user,
            password=config.upstream_password,
            connect_timeout_s=config.upstream_connect_timeout_s,
            command_timeout_s=config.upstream_command_timeout_s,
            data_timeout_s=config.upstream_data_timeout_s,
            observer=observer,
        )

    return Upstreams(
        [settings(address) for address in config.upstream],
        [(settings(c.upstream), c.required, c.untracked) for c in config.copies],
        retry_s=config.upstream_retry_s,
        pool_size=config.upstream_pool_size,
        idle_timeout_s=config.upstream_idle_timeout_s,
    )


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """Our own certificate, offered to downstream clients with STARTTLS (RFC 3207).

    :raises StartupError: when the certificate or key cannot be loaded or do not match.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    return load_server_context(config.tls_cert, config.tls_key)


def pixel_base_url(config: Config, bound_port: int | None = None) -> str:
    """The public URL of the pixel endpoint: configured, or guessed from our host name.

    :param bound_port: the port the pixel endpoint is bound to, when it runs here
        (it differs from ``pixel_listen`` when that says port 0).
    """
    if config.pixel_base_url is not None:
        return config.pixel_base_url
    scheme = "http" if config.pixel_plain_http else "https"
    return f"{scheme}://{config.hostname}:{bound_port or config.pixel_listen.port}"


def rewrite_policy(config: Config) -> RewritePolicy:
    """What the pixel rewrite may touch, from the configuration."""
    return RewritePolicy(
        dkim_policy=config.dkim_policy,
        tracking_requires_opt_in=config.tracking_requires_opt_in,
        control_header=config.control_header,
        track_clicks=config.track_clicks,
        track_text_links=config.track_text_links,
        click_exclude_patterns=config.click_exclude_patterns,
        click_notrack_attribute=config.click_notrack_attribute,
        time_limit_s=config.rewrite_timeout_s,  # the rewrite thread itself stops then
        pixel_position=config.pixel_position,
    )


def domain_policy(config: Config) -> DomainPolicy:
    """The sender and recipient domain lists (validated by :func:`~.config.build_config`)."""
    return DomainPolicy(
        include_sender_domains=config.include_sender_domains,
        exclude_sender_domains=config.exclude_sender_domains,
        include_recipient_domains=config.include_recipient_domains,
        exclude_recipient_domains=config.exclude_recipient_domains,
    )


def dkim_keyring(config: Config, *, warnings: list[str] | None = None) -> Keyring | None:
    """The keys of ``dkim_key_table`` (and ``dkim_signing_table``), None when unset.

    Blocking (reads files): call it once at start, off the event loop.

    :raises ConfigError: one line per problem, each naming the file and line.
    """
    if config.dkim_key_table is None:
        return None
    return load_keyring(config.dkim_key_table, config.dkim_signing_table, warnings=warnings)


def dkim_resigner(config: Config) -> Resigner | None:
    """The DKIM re-signer of ``dkim_policy = "resign"``, with the KeyTable's keys
    (blocking: reads the tables and key files once, at start); None otherwise.

    :raises ConfigError: one line per bad table line or key file, naming it.
    """
    if config.dkim_policy != "resign":
        return None
    warnings: list[str] = []
    keyring = dkim_keyring(config, warnings=warnings)
    for warning in warnings:
        log.warning("%s", warning)
    if keyring is None:  # build_config requires dkim_key_table with "resign"
        raise ConfigError("dkim_policy = resign needs dkim_key_table")
    for key in keyring.keys.values():
        log.info("DKIM: re-signing for %s", describe_key(key))
    return Resigner(keyring)


def webhook_sender(config: Config) -> WebhookSender:
    """The outbox's writer and sender for ``webhooks`` and ``events_log`` (blocking:
    reads the secrets).

    :raises StartupError: when a secret or CA file cannot be used.
    """
    return WebhookSender.build(
        config.data_dir,
        config.webhooks,
        store=config.store,
        password_file=config.store_password_file,
        events_log=config.events_log,
        max_events=config.webhook_outbox_max_events,
        retry_hours=config.webhook_retry_hours,
        timeout_s=config.webhook_timeout_s,
        backoff_base_s=config.webhook_backoff_base_s,
        backoff_max_s=config.webhook_backoff_max_s,
    )


def ensure_data_dir(path: Path) -> Path:
    """Create the data directory (mode 0700) if missing; check it is writable.

    :raises StartupError: when it cannot be created or written.
    """
    if path.exists() and not path.is_dir():
        raise StartupError(f"data_dir: {path} is not a directory")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"data_dir: cannot create {path} ({exc.strerror})") from exc
    # Make and remove a file rather than ask os.access(): the error says why
    # (read-only file system, permission denied, no space left).
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    except OSError as exc:
        raise StartupError(f"data_dir: cannot write in {path} ({exc.strerror})") from exc
    os.close(fd)
    os.unlink(probe)
    return path


class Application:
    """Everything ``serve`` (or ``pixel``) runs, started and stopped as one.

    :param config: the validated configuration; ``config.upstream`` must be set
        when ``smtp`` is true.
    :param smtp: run the SMTP relay (false for the stand-alone ``pixel`` command).
    :param prune_first_delay_s: seconds from start to the first automatic prune
        (``retention_days``; ``serve`` only).
    :param prune_interval_s: seconds between automatic prunes (a day).
    """

    def __init__(
        self,
        config: Config,
        *,
        smtp: bool = True,
        prune_first_delay_s: float = FIRST_PRUNE_DELAY_S,
        prune_interval_s: float = PRUNE_INTERVAL_S,
    ) -> None:
        self.config = config
        #: ``retention_days`` applied by ``serve`` (after :meth:`start`; None when 0 or no store).
        self.pruner: Pruner | None = None
        self._prune_schedule = (prune_first_delay_s, prune_interval_s)
        self.capture = CaptureWriter(config.data_dir / "capture", mode=config.capture)
        self.store: SqliteStore | PostgresStore | None = None
        #: the consent registry and objection links (issue 20; with the store)
        self.consent: ConsentRegistry | None = None
        #: the webhook outbox's sender (after :meth:`start`, with ``webhooks`` or ``events_log``)
        self.webhooks: WebhookSender | None = None
        self.tracker: Tracker | None = None
        self.pixel_port: int | None = None
        #: The port the reports listener is bound to (after :meth:`start`, with ``reports``).
        self.reports_port: int | None = None
        self._reports_runner: web.AppRunner | None = None
        #: Limits recorded opens and clicks (one limiter for both endpoints).
        self.limiter = EventLimiter(
            per_token_per_min=config.max_events_per_token_per_min,
            per_token_client_per_min=config.max_events_per_token_client_per_min,
        )
        self._run_smtp = smtp
        #: Prometheus metrics, served on ``metrics_listen`` (None unless ``metrics``).
        self.metrics = Metrics(self) if config.metrics else None
        #: the upstream list, the copies and their health (None without SMTP)
        self.upstreams: Upstreams | None = None
        if smtp:
            config.upstream_address()  # raises ConfigError when there is none
            self.upstreams = upstream_list(
                config, self.metrics.upstream if self.metrics is not None else None
            )
        self._server_tls = server_tls_context(config)
        #: the store's classifier, which a reload replaces (after :meth:`start`)
        self._classifier: SwappableClassifier | None = None
        self._handler: RelayHandler | None = None
        #: the SMTP listener (after :meth:`start`, when it runs the relay)
        self.listener: Listener | None = None
        #: the LMTP listener (after :meth:`start`, with ``lmtp_listen``)
        self.lmtp_listener: Listener | None = None
        self._pixel_runner: web.AppRunner | None = None
        self._pixel_app: web.Application | None = None
        #: the SMTP listener's ``max_connections``, shared by its connections
        self.connection_slots = ConnectionSlots(config.max_connections)
        #: what :meth:`stop` undoes, in the reverse order of :meth:`start`
        self._running = contextlib.AsyncExitStack()
        self._grace_s = config.shutdown_grace_s

    @property
    def handler(self) -> RelayHandler:
        """The relay handler (after :meth:`start`)."""
        assert self._handler is not None, "not started"
        return self._handler

    @property
    def smtp_address(self) -> tuple[str, int]:
        """The (host, port) the SMTP listener is bound to (port 0 is resolved)."""
        assert self.listener is not None, "not started"
        return self.listener.address

    @property
    def lmtp_handler(self) -> RelayHandler | None:
        """The LMTP listener's handler, or None (``lmtp`` off, or not started)."""
        return self.lmtp_listener.handler if self.lmtp_listener is not None else None

    @property
    def relay_handler(self) -> RelayHandler | None:
        """The relay handler, or None (not started, or no SMTP in this process)."""
        return self._handler

    @property
    def event_writer(self) -> EventWriter | None:
        """The pixel and click endpoint's event writer, or None (no pixel endpoint)."""
        return self._pixel_app[WRITER_KEY] if self._pixel_app is not None else None

    @property
    def pixel_counters(self) -> dict[str, int]:
        """The pixel endpoint's event counters (offered, recorded, dropped, ...)."""
        if self._pixel_app is None:
            return {}
        writer = self._pixel_app[WRITER_KEY]
        names = ("offered", "recorded", "dropped", "unknown", "failed")
        counters = {name: int(getattr(writer, name)) for name in names}
        counters["limited"] = self.limiter.limited_token + self.limiter.limited_client
        return counters

    async def start(self) -> None:
        """Open the store, bind the listeners and start serving.

        Each part started registers its own stop on an
        :class:`contextlib.AsyncExitStack`; :meth:`stop` (or a failed start)
        unwinds it: the parts stop in the reverse order of their start.

        :raises StartupError: when the data directory, a certificate or an address
            cannot be had.
        """
        config = self.config
        running = self._running
        running.push_async_callback(self._stop_store)
        await asyncio.to_thread(ensure_data_dir, config.data_dir)
        if config.tracking or config.pixel or config.reports:
            networks = await asyncio.to_thread(load_networks, config.data_dir)
            self._classifier = SwappableClassifier(Classifier(networks, config.prefetch_window_s))
            classifier: EventClassifier = self._classifier
            if self.metrics is not None:
                classifier = self.metrics.counting_verdicts(classifier)
            try:  # a damaged SQLite store, a PostgreSQL server down: mail flows
                self.store = cast(
                    SqliteStore | PostgresStore,
                    await open_store(
                        store=config.store,
                        data_dir=config.data_dir,
                        store_subject=config.store_subject,
                        ip_policy=config.ip_policy,
                        classifier=classifier,
                        password_file=config.store_password_file,
                        pool_size=config.store_pool_size,
                        timeout_s=config.store_timeout_s,
                    ),
                )
            except StoreError as exc:
                raise StartupError(str(exc)) from None
            self.store.set_tracking_mode(
                config.tracking_mode,
                per_message=config.aggregate_per_message,
                link_retention_days=config.link_retention_days,
            )
            self.consent = open_registry(  # SQLite: its file; PostgreSQL: its server
                store=config.store,
                data_dir=config.data_dir,
                password_file=config.store_password_file,
                timeout_s=config.store_timeout_s,
                suspended=self.store.suspended,
            )
            running.push_async_callback(self._stop_consent)
        try:
            if self.store is not None and (config.webhooks or config.events_log is not None):
                running.push_async_callback(self._stop_webhooks)
                await self._start_webhooks()
            if self.metrics is not None:
                running.push_async_callback(self.metrics.stop)
                await self._start_metrics()
            if config.pixel:
                running.push_async_callback(self._stop_pixel)
                await self._start_pixel()
            if self._run_smtp:
                await self._start_smtp()
                if self._handler is not None:
                    self._handler.refusals = self.webhooks
                self._start_pruner()
                running.push_async_callback(self._stop_pruner)
            if config.reports:
                running.push_async_callback(self._stop_reports)
                await self._start_reports()
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def reload(self, config: Config) -> bool:
        """SIGHUP: apply what can change without a restart (:mod:`smtp_tracker.reload`).

        Connections and transactions in flight go on untouched.

        :param config: the configuration read again.
        :returns: False when it failed: nothing changed, one line logged.
        """
        if self.webhooks is not None and self.webhooks.event_log is not None:
            self.webhooks.event_log.reopen()  # for logrotate, whatever the new file says
        try:
            plan = await asyncio.to_thread(
                prepare_reload,
                self.config,
                config,
                tls_reloadable=self._server_tls is not None,
                classify=self._classifier is not None,
            )
            apply_reload(
                plan,
                tls_context=self._server_tls,
                tracker=self.tracker,
                classifier=self._classifier,
            )
        except ReloadError as exc:
            log.error("reload failed, nothing changed: %s", exc)
            return False
        self.config = plan.config
        if plan.restart_keys:
            log.warning("reload: %s changed; restart to apply", ", ".join(plan.restart_keys))
        log.info("reloaded: certificate, domain lists, disclosure and network lists")
        return True

    async def _start_metrics(self) -> None:
        """``GET /metrics`` on ``metrics_listen``, plain HTTP (Prometheus)."""
        assert self.metrics is not None
        listen = self.config.metrics_listen
        try:
            port = await self.metrics.start(
                listen.host, listen.port, reuse_port=self.config.workers > 1
            )
        except StartupError as exc:
            raise bind_error(
                "metrics_listen", listen, exc.__cause__, " Set metrics_listen, or --no-metrics"
            ) from exc
        log.info("serving metrics on http://%s/metrics", HostPort(listen.host, port))

    async def build_tracker(self) -> Tracker:
        """The tracking stage, as ``serve`` and ``milter`` both use it (after the store
        and the pixel endpoint have started).

        Pixels point at ``pixel_base_url``, else at this host and the pixel port
        (with a warning).  Reads the disclosure footer and the DKIM tables in a thread.

        :raises ConfigError: when the disclosure footer or the DKIM tables cannot be used.
        """
        config = self.config
        base_url = pixel_base_url(config, self.pixel_port)
        if config.pixel_base_url is None:
            log.warning(
                "pixel_base_url is not set; pixels will point at %s: set it to the "
                "public URL of the pixel endpoint",
                base_url,
            )
        return Tracker(
            policy=rewrite_policy(config),
            pixel_base_url=base_url,
            store=self.store,
            rewrite_timeout_s=config.rewrite_timeout_s,
            rewrite_queue_wait_s=config.rewrite_queue_wait_s,
            domains=domain_policy(config),
            disclosure=await asyncio.to_thread(disclosure, config),
            resigner=await asyncio.to_thread(dkim_resigner, config),
            consent=ConsentCheck(self.consent, requires_consent=config.tracking_requires_consent),
            optout_links=self.consent,
        )

    async def _start_smtp(self) -> None:
        config = self.config
        assert self.upstreams is not None
        self._running.push_async_callback(self.upstreams.close)
        if config.tracking:
            self.tracker = await self.build_tracker()
        self._running.push_async_callback(self._stop_tracker)
        self._handler = RelayHandler(
            upstream=self.upstreams,
            hostname=config.hostname,
            max_recipients=config.max_recipients,
            add_received_header=config.add_received_header,
            preparer=self.tracker,
            recorder=self.tracker,
            capture=self.capture,
        )
        listen = config.listen
        self.listener = await self._listen(self._handler, "listen", listen, "SMTP")
        self._running.push_async_callback(self._stop_smtp)
        if config.lmtp:
            await self._start_lmtp()
        for upstream in [*config.upstream, *(copy.upstream for copy in config.copies)]:
            await warn_if_unresolvable(
                upstream.host, upstream.port, timeout_s=min(config.upstream_connect_timeout_s, 10.0)
            )
        if not is_loopback_host(listen.host):
            log.warning(
                "listening on %s, beyond loopback: only clients in allowed_clients (%s) are served",
                listen,
                ", ".join(str(n) for n in config.allowed_clients),
            )

    async def _listen(
        self,
        handler: RelayHandler,
        key: str,
        listen: HostPort,
        name: str,
        *,
        protocol: type[RelaySMTP] = RelaySMTP,
    ) -> Listener:
        """A started listener on *listen* (the value of configuration *key*) serving
        *handler* with *protocol*, logged as listening for *name* (SMTP or LMTP).

        :raises StartupError: when the address cannot be bound (:func:`bind_error`).
        """
        config = self.config
        listener = Listener(
            handler,
            host=listen.host,
            port=listen.port,
            allowed_clients=config.allowed_clients,
            slots=self.connection_slots,
            max_message_bytes=config.max_message_bytes,
            client_timeout_s=config.client_timeout_s,
            hostname=config.hostname,
            tls_context=self._server_tls,
            keep_transcript=self.capture.enabled,
            protocol=protocol,
            reuse_port=config.workers > 1,
        )
        try:
            await listener.start()
        except OSError as exc:
            raise bind_error(key, listen, exc) from exc
        host, port = listener.address
        log.info("listening for %s on %s", name, HostPort(host, port))
        return listener

    async def _start_lmtp(self) -> None:
        """The LMTP listener: one copy, pixel and record per recipient (:mod:`.smtp.lmtp`)."""
        config = self.config
        listen = config.lmtp_listen
        assert self.upstreams is not None
        handler = LmtpHandler(
            upstream=self.upstreams,
            hostname=config.hostname,
            parallel=config.lmtp_parallel_copies,
            max_recipients=config.max_recipients,
            add_received_header=config.add_received_header,
            preparer=self.tracker,
            recorder=self.tracker,
            capture=self.capture,
        )
        self.lmtp_listener = await self._listen(
            handler, "lmtp_listen", listen, "LMTP", protocol=LmtpSMTP
        )
        self._running.push_async_callback(self._stop_lmtp)

    async def _stop_lmtp(self) -> None:
        listener = self.lmtp_listener
        assert listener is not None
        await listener.stop(self._grace_s)
        log.info("LMTP counters: %s", counters_text(dict(listener.handler.counters)))

    async def _start_pixel(self) -> None:
        config = self.config
        assert self.store is not None
        ssl_context: ssl.SSLContext | None = None
        if not config.pixel_plain_http:
            ssl_context = self._server_tls or await asyncio.to_thread(_embedded_certificate, config)
        self._pixel_app = make_pixel_app(
            store=self.store,
            trusted_proxies=config.trusted_proxies,
            limiter=self.limiter,
            optout=await self._optout_page(),
        )
        listen = config.pixel_listen
        try:
            self._pixel_runner, self.pixel_port = await start_site(
                self._pixel_app,
                host=listen.host,
                port=listen.port,
                ssl_context=ssl_context,
                reuse_port=self.config.workers > 1,
            )
        except StartupError as exc:
            raise bind_error(
                "pixel_listen", listen, exc.__cause__, " Set pixel_listen, or --no-pixel"
            ) from exc
        scheme = "HTTP" if ssl_context is None else "HTTPS"
        log.info("listening for %s (pixel) on %s", scheme, HostPort(listen.host, self.pixel_port))

    async def _optout_page(self) -> OptoutPage | None:
        """The objection page (``/optout/TOKEN``) over the consent registry (issue 20)."""
        config = self.config
        if self.consent is None or self.consent.suspended is not None:
            return None
        try:
            template = await asyncio.to_thread(load_template, config.optout_page_template)
        except ValueError as exc:
            raise ConfigError(f"optout_page_template: {exc}") from None
        key = await asyncio.to_thread(load_or_create_hash_key, config.data_dir / FORM_KEY_FILENAME)
        return OptoutPage(
            registry=self.consent, form_key=key, text=config.optout_page_text, template=template
        )

    async def _stop_consent(self) -> None:
        if self.consent is not None:
            await self.consent.aclose()
            self.consent = None

    async def _start_reports(self) -> None:
        """The reports listener: JSON API and dashboard, behind the token and the logins."""
        config = self.config
        assert self.store is not None
        token_path = config.reports_token_path
        if await asyncio.to_thread(create_token_file, token_path):
            log.info("made the reports API bearer token in %s (mode 0600)", token_path)
        token = await asyncio.to_thread(load_reports_token, token_path)
        ssl_context: ssl.SSLContext | None = None
        if not config.reports_plain_http:  # allowed only on loopback (config check)
            ssl_context = self._server_tls or await asyncio.to_thread(_embedded_certificate, config)
        app = build_reports_app(
            store=self.store,
            token=token,
            users=await self._users(),
            session_s=config.reports_session_s,
            login_failures_per_min=config.reports_login_failures_per_min,
            trusted_proxies=config.trusted_proxies,
        )
        listen = config.reports_listen
        try:
            self._reports_runner, self.reports_port = await start_site(
                app,
                host=listen.host,
                port=listen.port,
                ssl_context=ssl_context,
                reuse_port=self.config.workers > 1,
            )
        except StartupError as exc:
            raise bind_error(
                "reports_listen", listen, exc.__cause__, " Set reports_listen, or --no-reports"
            ) from exc
        scheme = "HTTP" if ssl_context is None else "HTTPS"
        log.info(
            "listening for %s (reports) on %s",
            scheme,
            HostPort(listen.host, self.reports_port),
        )

    async def _users(self) -> UserDirectory:
        """The dashboard's users: the store's with PostgreSQL (shared by every reports
        host on it), else the users file."""
        if isinstance(self.store, PostgresStore):
            where = store_name(self.config.store, self.config.data_dir)
            return await UserDirectory.open_store(self.store, where)
        return await UserDirectory.open(self.config.reports_users_path)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop every part started, in the reverse order of :meth:`start`.

        The SMTP listener stops accepting, lets transactions in flight finish,
        then tells idle sessions and transactions that outlast the grace period
        ``421 4.3.2`` and closes them (:meth:`.Listener.stop`); their clients keep
        the message and retry.  Then the tracker, the HTTP listeners and the store.

        :param grace_s: seconds to wait for transactions in flight; ``None`` means
            the configured ``shutdown_grace_s``.
        """
        self._grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        running, self._running = self._running, contextlib.AsyncExitStack()
        await running.aclose()

    async def _stop_smtp(self) -> None:
        listener, handler = self.listener, self._handler
        assert listener is not None and handler is not None
        await listener.stop(self._grace_s)
        await self.capture.drain()
        counters = dict(handler.counters)
        counters["refused_connections"] = self.connection_slots.refused
        log.info("relay counters: %s", counters_text(counters))

    async def _stop_tracker(self) -> None:
        if self.tracker is not None:
            log.info("tracking counters: %s", counters_text(vars_of(self.tracker.counters)))
            await asyncio.to_thread(self.tracker.close)
            self.tracker = None

    async def _stop_pruner(self) -> None:
        if self.pruner is not None:
            await self.pruner.stop()
            self.pruner = None

    async def _stop_pixel(self) -> None:
        if self._pixel_runner is not None:
            await self._pixel_runner.cleanup()
            self._pixel_runner = None

    async def _stop_reports(self) -> None:
        if self._reports_runner is not None:
            await self._reports_runner.cleanup()
            self._reports_runner = None

    async def _start_webhooks(self) -> None:
        """The outbox's sender: the store writes events with its records, the sender
        delivers them to each webhook and ``events_log`` (:mod:`smtp_tracker.webhooks`)."""
        config = self.config
        assert self.store is not None
        sender = await asyncio.to_thread(webhook_sender, config)
        await sender.start(deliver=config.webhook_sender)
        self.webhooks = sender
        self.store.set_outbox(sender.outbox)
        log.info(
            "events out: %s%s",
            ", ".join(sender.targets),
            "" if config.webhook_sender else " (sent by 'smtp-tracker webhooks send')",
        )

    async def _stop_webhooks(self) -> None:
        if self.webhooks is not None:
            if self.store is not None:
                self.store.set_outbox(None)
            await self.webhooks.stop()
            self.webhooks = None

    async def _stop_store(self) -> None:
        if self.store is not None:
            await self.store.aclose()
            self.store = None

    def _start_pruner(self) -> None:
        """``serve`` (not the stand-alone pixel) applies ``retention_days`` to the data dir."""
        if self.store is None or self.config.retention_days <= 0:
            return
        first_delay_s, interval_s = self._prune_schedule
        self.pruner = Pruner(
            self.store,
            self.config.data_dir / "capture",
            self.config.retention_days,
            first_delay_s=first_delay_s,
            interval_s=interval_s,
        )
        self.pruner.start()


def _embedded_certificate(config: Config) -> ssl.SSLContext:
    """A self-signed certificate in ``DATA_DIR/tls/``, made on first use, for trying it out.

    Mail clients will not fetch a pixel from a host whose certificate they do not
    trust: for real use set ``tls_cert``/``tls_key`` (or ``pixel_plain_http``
    behind a TLS proxy).
    """
    directory = config.data_dir / "tls"
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not (cert.exists() and key.exists()):
        directory.mkdir(mode=0o700, exist_ok=True)
        names = list(dict.fromkeys([config.hostname, "localhost", "127.0.0.1"]))
        write_self_signed(cert, key, hostnames=names)
        log.warning(
            "no tls_cert set: made a self-signed certificate in %s for the HTTPS endpoints; "
            "mail clients will not trust it: set tls_cert and tls_key for real use",
            directory,
        )
    return load_server_context(cert, key)


def vars_of(counters: TrackerCounters) -> dict[str, int]:
    """The tracker's counters as a dict (``slots`` dataclasses have no ``__dict__``)."""
    return {f.name: int(getattr(counters, f.name)) for f in dataclasses.fields(counters)}


def counters_text(counters: dict[str, int]) -> str:
    """``name=value, ...``: the counters logged at shutdown (``serve`` and ``milter``)."""
    return ", ".join(f"{name}={value}" for name, value in counters.items())


def os_reason(exc: BaseException | None) -> str:
    """The operating system's words for an ``OSError`` (``"Address already in use"``).

    asyncio's bind errors carry a long ``strerror`` that repeats the address;
    the errno's own text is what a user needs next to the address we name.
    """
    if isinstance(exc, OSError):
        if exc.errno is not None and exc.errno > 0:
            return os.strerror(exc.errno)
        if exc.strerror:
            return exc.strerror
    return "unknown error"


def bind_error(
    key: str, listen: HostPort, exc: BaseException | None, advice: str = ""
) -> StartupError:
    """The one-line error for a listener that could not be bound.

    :param key: the configuration key that names the address, e.g. ``"listen"``.
    :param advice: a sentence to append (starting with a space), or nothing.
    """
    text = f"{key}: cannot listen on {listen} ({os_reason(exc)})"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        text += "; is another process using it?"
    return StartupError(text + advice)


async def warn_if_unresolvable(host: str, port: int, *, timeout_s: float) -> bool:
    """Log a warning when the upstream's name does not resolve now; never raise.

    Serving starts anyway: DNS may come back, and until it does each
    transaction is deferred with ``451 4.4.1`` (Postfix keeps the mail).

    :param timeout_s: how long to wait for the resolver, in seconds.
    :returns: whether the name resolved.
    """
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=timeout_s
        )
    except (OSError, TimeoutError) as exc:
        timed_out = isinstance(exc, TimeoutError)
        reason = f"no answer within {timeout_s:g} s" if timed_out else os_reason(exc)
        log.warning(
            "upstream: cannot resolve %s (%s); serving anyway: mail is deferred "
            "(451 4.4.1) until it resolves",
            host,
            reason,
        )
        return False
    return True


def reload_on_hangup(
    app: Application, reload_config: Callable[[], Config] | None
) -> Callable[[], None]:
    """On SIGHUP, read the configuration again with *reload_config* (blocking: run in a
    thread) and apply it (:meth:`Application.reload`), one reload at a time; a
    configuration that does not load is logged and nothing changes.

    Call it in the running loop; it returns the function that removes the SIGHUP
    handler and cancels the reloads under way (``serve``, ``pixel`` and ``milter``).
    """
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()
    one_at_a_time = asyncio.Lock()

    async def reload() -> None:
        async with one_at_a_time:
            if reload_config is None:
                log.warning("SIGHUP: nothing to reload in this process")
                return
            log.info("reloading the configuration (SIGHUP)")
            try:
                new = await asyncio.to_thread(reload_config)
            except ConfigError as exc:
                log.error("reload failed, nothing changed: %s", "; ".join(exc.problems))
                return
            await app.reload(new)

    def on_hangup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def remove() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            task.cancel()

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    return remove


async def run(
    config: Config, *, smtp: bool = True, reload_config: Callable[[], Config] | None = None
) -> int:
    """Run ``serve`` (or ``pixel`` with ``smtp=False``) until SIGTERM or SIGINT.

    On the signal: stop accepting, drain for up to ``config.shutdown_grace_s``
    seconds (see :meth:`Application.stop`), exit.  On SIGHUP: read the
    configuration again with ``reload_config`` (blocking: run in a thread) and
    apply it (:meth:`Application.reload`), one reload at a time.

    :returns: the exit status, 0.
    :raises StartupError: when something needed at start-up is unavailable.
    """
    app = Application(config, smtp=smtp)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stop_reloading = reload_on_hangup(app, reload_config)
    await stop.wait()
    stop_reloading()
    grace_s = config.shutdown_grace_s
    log.info("stopping: draining transactions in flight (up to %g s)", grace_s)
    await app.stop(grace_s)
    log.info("stopped")
    return 0
