"""Configuration: one frozen :class:`Config`, loaded once from TOML and flags.

The TOML file is flat: every key is a field of :class:`Config` (``conf/smtp-tracker.toml``
lists them all with their defaults).  Each key has a command-line flag of the same
name (``upstream_tls`` ↔ ``--upstream-tls``) that overrides it.  Values are
validated in one place, :func:`build_config`, which reports every problem at
once as a :class:`~smtp_tracker.errors.ConfigError`.

Secrets never come from flags: the upstream password is read from the
environment variable ``SMTP_TRACKER_UPSTREAM_PASSWORD`` or from the file named
by ``upstream_password_file``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from smtp_tracker.errors import ConfigError
from smtp_tracker.webhooks.settings import WebhookSettings

__all__ = [
    "MAX_SECONDS",
    "PASSWORD_ENV",
    "CaptureMode",
    "Config",
    "CopySpec",
    "HostPort",
    "HostPorts",
    "IpPolicy",
    "UpstreamTLS",
    "build_config",
    "is_loopback_host",
    "key",
    "load_toml",
    "parse_host_port",
]

PASSWORD_ENV = "SMTP_TRACKER_UPSTREAM_PASSWORD"  # noqa: S105 - a variable name

#: The largest duration a key takes, in seconds (ten years): far beyond any sensible
#: timeout, far below what threading and the event loop's timers can hold.
MAX_SECONDS = 315_360_000

UpstreamTLS = Literal["starttls", "implicit", "none"]
CaptureMode = Literal["off", "errors", "all"]
IpPolicy = Literal["full", "truncate", "hash", "none"]
DkimPolicy = Literal["skip", "track", "resign"]
PixelPosition = Literal["end", "start", "both", "auto"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
TrackingMode = Literal["per-person", "aggregate"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HostPort:
    """A ``HOST:PORT`` pair; IPv6 hosts are written ``[::1]:25``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class HostPorts(tuple[HostPort, ...]):
    """An ordered list of ``HOST:PORT`` (``upstream``); written comma-separated."""

    __slots__ = ()

    def __str__(self) -> str:
        return ",".join(str(item) for item in self)


@dataclass(frozen=True, kw_only=True, slots=True)
class CopySpec:
    """One ``[[copies]]`` table: a server that receives every message in step.

    It is reached with the upstream's TLS and AUTH settings (``upstream_tls``,
    ``upstream_ca_file``, ``upstream_user``, the password).

    :ivar upstream: the copy's ``HOST:PORT``.
    :ivar required: the client hears 2xx only when this copy said 2xx too.
    :ivar untracked: the copy receives the message as received (no pixel).
    """

    upstream: HostPort
    required: bool = False
    untracked: bool = False

    def __str__(self) -> str:
        flags = [name for name in ("required", "untracked") if getattr(self, name)]
        return "/".join([str(self.upstream), *flags])


def key(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    section: str | None = None,
    default_text: str | None = None,
    example: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    repr: bool = True,
) -> Any:
    """A :class:`Config` field and its documentation, written once.

    The flag's help, the example file and the docs' configuration page all come
    from here (:mod:`smtp_tracker.cli.flags`).  Units come from the key's name
    (``_s`` seconds, ``_bytes`` bytes, ``_days`` days, ``_per_min`` per minute).

    :param help: what the key does, one or two sentences, without its default.
    :param section: the heading of the group this key starts (in field order).
    :param default_text: the default in words, when the value alone would mislead
        (e.g. "this host's FQDN" for a default computed at start).
    :param example: a TOML value for the example file, for a key without a
        default worth showing (a path, a host name).
    :returns: a :func:`dataclasses.field`.
    """
    metadata = {
        "help": help,
        "section": section,
        "default_text": default_text,
        "example": example,
    }
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, repr=repr, metadata=metadata)
    return field(default=default, repr=repr, metadata=metadata)


_DEFAULT_ALLOWED_CLIENTS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """Everything smtp-tracker is told, validated.

    Durations are in seconds (``*_s``), sizes in bytes (``*_bytes``).  Each field
    is written with :func:`key`, which holds its help, once.
    """

    listen: HostPort = key(
        HostPort("127.0.0.1", 10025),
        section="SMTP listener (Postfix connects here)",
        help="address to accept SMTP from Postfix on, HOST:PORT",
    )
    hostname: str = key(
        default_factory=socket.getfqdn,
        default_text="this host's FQDN",
        example='"mx.example.com"',
        help="our host name in the greeting and the Received: header",
    )
    allowed_clients: tuple[IPNetwork, ...] = key(
        _DEFAULT_ALLOWED_CLIENTS,
        help="CIDR networks allowed to connect (comma-separated as a flag); others get "
        "554 5.7.1; an empty list is refused",
    )
    client_timeout_s: float = key(300.0, help="seconds a downstream client may stay idle")
    max_message_bytes: int = key(
        52_428_800, help="largest message accepted, in bytes; advertised as SIZE"
    )
    max_recipients: int = key(1000, help="recipients accepted per transaction; more get 452 4.5.3")
    max_connections: int = key(
        100, help="SMTP connections served at once; more get 421 4.3.2 and are closed"
    )
    workers: int = key(
        0,
        help="processes serving SMTP, LMTP and the pixel on the same ports (SO_REUSEPORT) under "
        "one supervisor that starts them again when they end and drains them all on SIGTERM; "
        "the reports listener runs in the first alone; 0: one per usable core (the CPUs this "
        "process may run on), one process and no supervisor when that is 1",
    )
    add_received_header: bool = key(True, help="prepend a Received: trace header")
    tls_cert: Path | None = key(
        None,
        example='"/etc/smtp-tracker/tls/cert.pem"',
        help="PEM certificate offered to clients with STARTTLS and by the HTTPS endpoints",
    )
    tls_key: Path | None = key(
        None, example='"/etc/smtp-tracker/tls/key.pem"', help="PEM private key for tls_cert"
    )

    upstream: HostPorts = key(
        HostPorts(),
        section="Upstream smarthost",
        default_text="none",
        example='["smtp1.example.net:587", "smtp2.example.net:587"]',
        help="the smarthost to relay to, HOST:PORT, or an ordered list of them (comma-separated "
        "as a flag): each transaction goes to the first that is up, and moves to the next in "
        "the same transaction if one fails before it accepted MAIL (required for serve)",
    )
    upstream_retry_s: float = key(
        60.0,
        help="seconds a failed upstream (or copy) is skipped before a probe (connect and EHLO) "
        "checks it again; doubled while it keeps failing, up to 900",
    )
    upstream_pool_size: int = key(
        20,
        help="connections kept open per upstream (and copy) after a transaction ended cleanly, "
        "for the next transaction of any downstream session (the default matches Postfix's "
        "default_destination_concurrency_limit): RSET between transactions, "
        "checked before reuse when idle over 2 s, one transaction at a time on each, never "
        "shared between AUTH identities; 0: none (each downstream session opens its own and "
        "QUITs it at its end)",
    )
    upstream_idle_timeout_s: float = key(
        30.0, help="seconds a kept upstream connection may stay unused before its QUIT"
    )
    upstream_tls: UpstreamTLS = key(
        "starttls",
        help="starttls (required, never falls back to plaintext), implicit, or none",
    )
    upstream_ca_file: Path | None = key(
        None,
        default_text="the system's CA certificates",
        example='"/etc/ssl/certs/ca-certificates.crt"',
        help="PEM CA bundle to verify the upstream's certificate",
    )
    insecure_skip_verify: bool = key(
        False, help="do not verify the upstream's certificate (testing only)"
    )
    upstream_user: str | None = key(
        None,
        example='"relay@example.com"',
        help=f"SMTP AUTH user at the upstream; the password comes from {PASSWORD_ENV} "
        "or upstream_password_file, never a flag",
    )
    upstream_password: str | None = key(
        None,
        repr=False,
        help=f"never a key nor a flag: read from {PASSWORD_ENV} or upstream_password_file",
    )
    upstream_password_file: Path | None = key(
        None,
        example='"/etc/smtp-tracker/upstream-password"',
        help="file holding the upstream password (mode 0600)",
    )
    upstream_connect_timeout_s: float = key(
        30.0, help="seconds to connect, handshake and get the upstream's greeting"
    )
    upstream_command_timeout_s: float = key(300.0, help="seconds to wait for each upstream reply")
    upstream_data_timeout_s: float = key(
        600.0, help="seconds to wait for the upstream's reply to the message"
    )

    copies: tuple[CopySpec, ...] = key(
        (),
        section="In-step copies",
        help="servers that receive every message in step with the upstream, with its TLS and "
        "AUTH settings: [[copies]] tables at the end of the file (or a list of inline "
        "tables) with the keys upstream (HOST:PORT), required and untracked; "
        "a required copy must say 2xx too or the client gets 4xx; untracked ones get the "
        "message as received (as a flag: HOST:PORT[/required][/untracked], comma-separated)",
    )

    lmtp: bool = key(
        False,
        section="LMTP listener (one pixel per recipient)",
        help="run the LMTP listener on lmtp_listen (Postfix transport lmtp:[HOST]:PORT): each "
        "recipient of a delivery gets its own copy, pixel, token and record, relayed upstream "
        "as its own transaction, and its own LMTP reply",
    )
    lmtp_listen: HostPort = key(
        HostPort("127.0.0.1", 10024), help="address of the LMTP listener, HOST:PORT"
    )
    lmtp_parallel_copies: int = key(
        4,
        help="upstream connections one LMTP delivery's recipients are relayed on at once "
        "(1: one connection, each recipient in turn)",
    )

    data_dir: Path = key(
        Path("smtp-tracker-data"),
        section="Data directory, capture files, logs",
        help="directory for the tracking store and capture files, created if missing "
        "(a relative path is taken from the working directory)",
    )
    store: str | None = key(
        None,
        example='"postgresql://smtp-tracker@db.example.com:5432/tracker"',
        default_text="SQLite in data_dir",
        help="the tracking store: absent for SQLite in data_dir, or a PostgreSQL server, "
        "postgresql://USER@HOST:PORT/DBNAME, shared by several relays and pixel endpoints; "
        "never a password in it: libpq's PGPASSFILE, ~/.pgpass or PGPASSWORD, or "
        "store_password_file",
    )
    store_password_file: Path | None = key(
        None,
        example='"/etc/smtp-tracker/store-password"',
        help="file holding the PostgreSQL store's password (mode 0600), when libpq's own "
        "means are not used",
    )
    store_pool_size: int = key(
        4, help="connections to the PostgreSQL store per process, at most (and threads)"
    )
    store_timeout_s: float = key(
        3.0,
        help="seconds a PostgreSQL store call waits for a connection before it fails "
        "(mail is relayed and opens dropped meanwhile: recording fails open)",
    )
    capture: CaptureMode = key(
        "off", help="debug capture files: off, errors (transactions not ending 2xx), or all"
    )
    log_level: LogLevel = key("info", help="debug, info, warning or error")
    log_format: LogFormat = key("text", help="text (Postfix-like) or json")

    shutdown_grace_s: float = key(
        30.0,
        section="Service life cycle",
        help="seconds SIGTERM waits for transactions in flight before telling their "
        "clients 421 4.3.2 and exiting; keep it below systemd's TimeoutStopSec",
    )

    tracking: bool = key(
        True, section="Tracking", help="inject the open-tracking pixel into HTML mail"
    )
    pixel_base_url: str | None = key(
        None,
        example='"https://track.example.com:8443"',
        help="public URL of the pixel endpoint, e.g. https://track.example.com:8443",
    )
    dkim_policy: DkimPolicy = key(
        "skip",
        help="DKIM-signed mail: skip (relay it untracked), track (breaks the signature: for a "
        "signer after smtp-tracker) or resign (re-sign with the signer's own key from "
        "dkim_key_table; mail it cannot re-sign goes untracked, byte for byte)",
    )
    dkim_key_table: Path | None = key(
        None,
        example='"/etc/opendkim/KeyTable"',
        help="OpenDKIM KeyTable (keyname domain:selector:keyfile) holding the keys "
        "dkim_policy = resign re-signs with; the file OpenDKIM already uses",
    )
    dkim_signing_table: Path | None = key(
        None,
        example='"refile:/etc/opendkim/SigningTable"',
        help="OpenDKIM SigningTable (pattern keyname; plain or refile:), checked against "
        "the KeyTable and reported by check-config",
    )
    tracking_requires_opt_in: bool = key(
        False, help="track only messages whose control header says yes"
    )
    control_header: str = key(
        "X-Track",
        help="header that opts a message in (yes) or out (no); removed before relay",
    )
    pixel_position: PixelPosition = key(
        "end",
        help="where the pixel goes in the HTML body: end (before </body>), start (right "
        "after <body>: still fetched when Gmail clips a message over about 102 KB), both (one "
        "at each place, the same URL: one open), or auto (both for HTML bodies over 90 KB)",
    )
    rewrite_timeout_s: float = key(
        10.0, help="seconds the pixel rewrite may take before the original is relayed"
    )
    store_subject: bool = key(False, help="keep the Subject in the tracking store")
    ip_policy: IpPolicy = key(
        "truncate", help="how opens' client addresses are kept: full, truncate, hash or none"
    )

    rewrite_queue_wait_s: float = key(
        5.0,
        help="seconds a message waits for a free rewrite thread before the original is "
        "relayed untracked",
    )

    track_clicks: bool = key(
        False,
        section="Click tracking",
        help="wrap the http/https links of tracked HTML mail in click URLs on the pixel "
        "endpoint (PIXEL_BASE_URL/c/TOKEN), which redirect to the stored destination",
    )
    track_text_links: bool = key(
        False, help="with track_clicks, also wrap URLs in the text/plain alternative"
    )
    #: the same as smtp_tracker.mime.links.DEFAULT_CLICK_EXCLUDE_PATTERNS (a test checks)
    click_exclude_patterns: tuple[str, ...] = key(
        (r"unsubscri", r"\bunsub\b", r"opt[-_.]?out", r"preference"),
        help="regular expressions (case-insensitive, searched in the URL; comma-separated "
        "as a flag) of links never wrapped; links named in List-Unsubscribe, mailto:, tel:, "
        "#... and relative URLs are never wrapped either",
    )
    click_notrack_attribute: str = key(
        "data-notrack", help="links whose tag has this attribute are never wrapped"
    )

    include_sender_domains: tuple[str, ...] = key(
        (),
        section="Privacy",
        default_text="all",
        help="track only mail from these sender domains and their subdomains "
        "(comma-separated as a flag; either IDNA form, case-insensitive)",
    )
    exclude_sender_domains: tuple[str, ...] = key(
        (),
        help="never track mail from these sender domains and their subdomains; wins over include",
    )
    include_recipient_domains: tuple[str, ...] = key(
        (),
        default_text="all",
        help="track only transactions whose every recipient is in these domains or "
        "their subdomains",
    )
    exclude_recipient_domains: tuple[str, ...] = key(
        (),
        help="never track a transaction with any recipient in these domains or their "
        "subdomains (one pixel serves them all); wins over include",
    )
    disclosure_footer_file: Path | None = key(
        None,
        example='"/etc/smtp-tracker/disclosure.html"',
        help="HTML fragment (UTF-8, up to 64 KiB) added just before the pixel of tracked "
        "messages; read once at start, an unreadable or invalid file is an error at start",
    )
    disclosure_header: str | None = key(
        None,
        example='"This message contains an image that tells the sender when it is opened"',
        help="value of a header field added to tracked messages only; one line, folded at "
        "78 characters, non-ASCII sent as RFC 2047 encoded-words",
    )
    disclosure_header_name: str = key(
        "X-Tracking-Notice", help="name of the disclosure_header field"
    )
    disclosure_optout_link: bool = key(
        False,
        help="add to the footer of each tracked message a link to its objection page "
        "(/optout/TOKEN on the pixel host): a recipient who confirms there is never tracked "
        "again (smtp-tracker consent)",
    )
    disclosure_optout_text: str = key(
        "Do not tell the sender when I open their messages",
        help="the text of the objection link in the footer",
    )
    optout_page_text: str = key(
        "The sender of this message can learn when it is opened. You can object: the "
        "messages they send you through this relay will then no longer tell them.",
        help="the explanation shown on the objection page, above its buttons",
    )
    optout_page_template: Path | None = key(
        None,
        example='"/etc/smtp-tracker/optout.html"',
        help="a Jinja2 template (UTF-8) for the objection page instead of the built-in one; "
        "it gets text, recipients (address, index, state), form_token, done, error",
    )
    tracking_requires_consent: bool = key(
        False,
        help="track only mail whose recipients have all granted consent "
        "(smtp-tracker consent allow); others are relayed untracked (consent-missing)",
    )
    tracking_mode: TrackingMode = key(
        "per-person",
        help="per-person: each open and click is stored with its message, recipients, "
        "client address and User-Agent; aggregate: only counts per day, sender domain and "
        "verdict, nothing that ties an open to a person",
    )
    aggregate_per_message: bool = key(
        False,
        help="in the aggregate tracking_mode, also keep each message's counts, queue id and "
        "Message-ID (never its sender or recipients)",
    )
    retention_days: int = key(
        365,
        help="days message records, their opens, clicks, links and recipients are kept, "
        "counted from the relay time; 0 keeps them forever; serve prunes once a day, the "
        "daily counts stay (see 'smtp-tracker prune')",
    )
    link_retention_days: int = key(
        1825,
        help="days a wrapped link keeps redirecting (and an objection link keeps working) "
        "after its message was relayed, even once the message record is pruned or "
        "forgotten; 0 keeps them forever",
    )

    prefetch_window_s: float = key(
        30.0,
        section="Open classification",
        help="opens and clicks sooner than this after the relay count as scanner "
        "(security gateways fetch at delivery); network lists: 'smtp-tracker networks list'",
    )

    max_events_per_token_per_min: int = key(
        30,
        section="Event rate limits (recorded events; the GIF is always served)",
        help="opens (or clicks) recorded per token per minute; 0 for no limit",
    )
    max_events_per_token_client_per_min: int = key(
        5,
        help="opens (or clicks) recorded per token and client address per minute; 0 for no "
        "limit; never per client address alone: one provider's proxy fetches for many "
        "recipients",
    )

    pixel: bool = key(
        True,
        section="Pixel endpoint (HTTPS)",
        help="run the HTTPS pixel endpoint in this process",
    )
    pixel_listen: HostPort = key(
        HostPort("0.0.0.0", 8443),  # noqa: S104 - public by design
        help="address of the pixel endpoint, HOST:PORT",
    )
    pixel_plain_http: bool = key(
        False, help="serve the pixel endpoint over plain HTTP, behind a TLS proxy"
    )
    trusted_proxies: tuple[IPNetwork, ...] = key(
        (),
        help="CIDR networks whose X-Forwarded-For is believed (comma-separated as a flag)",
    )

    reports: bool = key(
        True,
        section="Reports listener (JSON API and dashboard, HTTPS)",
        help="run the reports listener in serve; 'smtp-tracker reports' runs it alone",
    )
    reports_listen: HostPort = key(
        HostPort("127.0.0.1", 8444), help="address of the reports listener, HOST:PORT"
    )
    reports_plain_http: bool = key(
        False, help="serve the reports over plain HTTP; only allowed on a loopback reports_listen"
    )
    reports_token_file: Path | None = key(
        None,
        default_text="DATA_DIR/reports-token",
        example='"/var/lib/smtp-tracker/reports-token"',
        help="file holding the API bearer token, created 0600 with a random token when missing",
    )

    reports_users_file: Path | None = key(
        None,
        section="Reports: dashboard users and sessions",
        default_text="DATA_DIR/reports-users.json",
        example='"/var/lib/smtp-tracker/reports-users.json"',
        help="the dashboard's users and password hashes (argon2id), managed by 'smtp-tracker "
        "user'; not used with a PostgreSQL store, which holds them itself",
    )
    reports_session_s: float = key(43_200.0, help="seconds a dashboard login lasts (12 hours)")
    reports_login_failures_per_min: int = key(
        5,
        help="failed dashboard logins allowed per client address and per user name in any "
        "minute; more get 429 with Retry-After",
    )

    metrics: bool = key(
        False,
        section="Prometheus metrics",
        help="serve Prometheus metrics (GET /metrics, plain HTTP) on metrics_listen",
    )
    metrics_listen: HostPort = key(
        HostPort("127.0.0.1", 9425),
        help="address of the metrics endpoint, HOST:PORT; keep it on loopback or a "
        "private network: it has no authentication",
    )

    webhooks: tuple[WebhookSettings, ...] = key(
        (),
        section="Events out: webhooks and the event log",
        help="webhooks that get each event as a POST signed per Standard Webhooks: "
        "[[webhooks]] tables at the end of the file (or a list of inline tables) with the "
        "keys url, secret_file, events, counted_only, allow_plain_http, ca_file and name "
        "(as a flag: a TOML array of inline tables); 'smtp-tracker webhooks new-secret FILE' "
        "makes a secret; see docs/webhooks.md",
    )
    webhook_retry_hours: float = key(
        24.0,
        help="hours an event is retried (exponential backoff with jitter) before it becomes a "
        "dead letter ('smtp-tracker webhooks list-failed', 'webhooks retry')",
    )
    webhook_outbox_max_events: int = key(
        100_000,
        help="events the outbox in the store holds at most; beyond, new events are dropped and "
        "counted (mail and records go on)",
    )
    webhook_timeout_s: float = key(
        10.0, help="seconds a webhook has to answer an event (connect included)"
    )
    webhook_backoff_base_s: float = key(
        5.0, help="seconds before the first retry of a failed event; doubled at each retry"
    )
    webhook_backoff_max_s: float = key(3600.0, help="longest wait between two retries, seconds")
    webhook_sender: bool = key(
        True,
        help="deliver the outbox in this process; off: serve only writes events to it and "
        "'smtp-tracker webhooks send' (a process of its own, beside it) delivers them",
    )
    events_log: Path | None = key(
        None,
        example='"/var/log/smtp-tracker/events.ndjson"',
        help="file the same events are appended to as JSON lines (NDJSON), for log shippers; "
        "reopened on SIGHUP (logrotate)",
    )

    milter_listen: str = key(
        "127.0.0.1:8892",
        section="Milter mode ('smtp-tracker milter')",
        help="address of the milter listener: HOST:PORT, or unix:/path for a Unix-domain "
        "socket (mode 0660); Postfix's smtpd_milters names it (inet:HOST:PORT or unix:/path)",
    )
    milter_timeout_s: float = key(
        20.0,
        help="seconds from end of message the milter may take to rewrite and record before "
        "it passes the message on unchanged; keep it below Postfix's milter_content_timeout",
    )

    @property
    def reports_token_path(self) -> Path:
        """The API bearer token file: ``reports_token_file``, else ``DATA_DIR/reports-token``."""
        return self.reports_token_file or self.data_dir / "reports-token"

    @property
    def reports_users_path(self) -> Path:
        """The dashboard's users: ``reports_users_file``, else ``DATA_DIR/reports-users.json``."""
        return self.reports_users_file or self.data_dir / "reports-users.json"

    def upstream_address(self) -> HostPort:
        """The first upstream, which :func:`build_config` guarantees for ``serve``.

        :raises ConfigError: when no upstream is configured.
        """
        if not self.upstream:
            raise ConfigError("no upstream: set --upstream HOST:PORT or the key 'upstream'")
        return self.upstream[0]


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}

#: Keys that are never read from a flag (secrets) nor from TOML (derived).
_NOT_IN_TOML = {"upstream_password"}


def is_loopback_host(host: str) -> bool:
    """Whether *host* is ``localhost`` or a loopback address (127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host_port(text: str, *, what: str) -> HostPort:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6 addresses).

    :param what: the key or flag name, for the error message.
    :raises ConfigError: when the text is not of that form or the port is out of range.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is out of range 0-65535")
    return HostPort(host, port)


def _parse_networks(value: Any, *, what: str) -> tuple[IPNetwork, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{what}: expected a list of CIDR networks")
    networks: list[IPNetwork] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{what}: {text!r} is not a CIDR network like 10.0.0.0/8") from None
    return tuple(networks)


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML configuration file (UTF-8, as TOML 1.0 requires).

    :raises ConfigError: when the file cannot be read, is not UTF-8 (naming the line,
        column and byte offset of the first bad byte), or is not valid TOML.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{path}: not UTF-8: byte 0x{data[exc.start]:02x} at line {line}, column {column} "
            f"(offset {exc.start}); a TOML file must be saved as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _duration_unit(name: str) -> tuple[str, int]:
    """The unit of the number key *name* (``"hours"`` for ``*_hours``, else ``"seconds"``)
    and the most it takes: ten years (:data:`MAX_SECONDS`) in that unit."""
    if name.endswith("_hours"):
        return "hours", MAX_SECONDS // 3600
    return "seconds", MAX_SECONDS


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or flag value into the field's type; raise ConfigError if it can't."""
    kind = _FIELDS[name].type
    if name == "upstream":
        return _parse_host_ports(value, what=name)
    if name == "copies":
        return _parse_copies(value)
    if name in {"listen", "pixel_listen", "reports_listen", "metrics_listen", "lmtp_listen"}:
        if isinstance(value, HostPort):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string HOST:PORT")
        return parse_host_port(value, what=name)
    if name in {"allowed_clients", "trusted_proxies"}:
        return _parse_networks(value, what=name)
    if "Path" in str(kind):
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{name}: expected a file or directory path")
        return Path(value)
    if kind in {"bool"}:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{name}: expected a whole number")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {value!r}") from None
    if kind == "float":
        unit, most = _duration_unit(name)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{name}: expected a number of {unit}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number of {unit}, got {value!r}") from None
        if not math.isfinite(number):  # nan would turn every comparison (timeouts) off
            raise ConfigError(f"{name}: expected a finite number of {unit}, got {value!r}")
        if number > most:  # threads and timers overflow long before inf
            raise ConfigError(f"{name}: at most {most} {unit} (ten years), got {value!r}")
        return number
    literal = {
        "UpstreamTLS": UpstreamTLS,
        "CaptureMode": CaptureMode,
        "IpPolicy": IpPolicy,
        "DkimPolicy": DkimPolicy,
        "PixelPosition": PixelPosition,
        "LogLevel": LogLevel,
        "LogFormat": LogFormat,
        "TrackingMode": TrackingMode,
    }.get(str(kind))
    if literal is not None:
        choices = get_args(literal)
        text = str(value).lower()
        if text not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
        return text
    if name == "webhooks":
        return _parse_webhooks(value)
    if kind == "tuple[str, ...]":
        return _parse_strings(value, what=name)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string")
    return value


def _parse_host_ports(value: Any, *, what: str) -> HostPorts:
    """``HOST:PORT``, a list of them (TOML) or ``HOST:PORT,HOST:PORT`` (a flag)."""
    if isinstance(value, HostPort):
        return HostPorts((value,))
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{what}: expected HOST:PORT or a list of them")
    parsed: list[HostPort] = []
    for item in items:
        if isinstance(item, HostPort):
            parsed.append(item)
        elif isinstance(item, str):
            if item.strip():
                parsed.append(parse_host_port(item.strip(), what=what))
        else:
            raise ConfigError(f"{what}: expected HOST:PORT strings, got {item!r}")
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"{what}: an address is listed twice")
    return HostPorts(parsed)


def _parse_copies(value: Any) -> tuple[CopySpec, ...]:
    """``[[copies]]`` tables (TOML: a list of tables), or the flag's
    ``HOST:PORT[/required][/untracked],...``: the one place copies are read."""
    if isinstance(value, str):
        tables: list[Any] = []
        for item in value.split(","):
            address, *words = item.strip().split("/")
            if not address:
                continue
            unknown = set(words) - {"required", "untracked"}
            if unknown:
                raise ConfigError(f"copies: unknown option {sorted(unknown)[0]!r} in {item!r}")
            tables.append({"upstream": address, **{word: True for word in words}})
        value = tables
    if not isinstance(value, list | tuple):
        raise ConfigError("copies: expected [[copies]] tables (upstream, required, untracked)")
    copies: list[CopySpec] = []
    for number, table in enumerate(value, 1):
        if isinstance(table, CopySpec):
            copies.append(table)
            continue
        what = f"copies #{number}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{what}: expected a table with upstream, required, untracked")
        unknown = set(table) - {"upstream", "required", "untracked"}
        if unknown:
            raise ConfigError(f"{what}: unknown key {sorted(unknown)[0]!r}")
        target: Any = table.get("upstream")
        if not isinstance(target, str):
            raise ConfigError(f'{what}: upstream = "HOST:PORT" is required')
        flags = {name: table.get(name, False) for name in ("required", "untracked")}
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise ConfigError(f"{what}: {name}: expected true or false")
        copies.append(CopySpec(upstream=parse_host_port(target, what=what), **flags))
    return tuple(copies)


def _parse_strings(value: Any, *, what: str) -> tuple[str, ...]:
    """A list of strings from TOML (``["a", "b"]``) or a flag (``a,b``); blanks dropped."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{what}: expected a list of strings")
    return tuple(text for text in (item.strip() for item in items) if text)


def _parse_webhooks(value: Any) -> tuple[WebhookSettings, ...]:
    """``[[webhooks]]`` tables (TOML: a list of tables), or the flag's TOML array of
    inline tables: the one place webhooks are read (each by
    :meth:`~smtp_tracker.webhooks.settings.WebhookSettings.from_table`)."""
    if isinstance(value, str):
        try:
            value = tomllib.loads(f"webhooks = {value}")["webhooks"]
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"webhooks: expected a TOML array of inline tables ({exc})") from None
    if not isinstance(value, list | tuple):
        raise ConfigError("webhooks: expected [[webhooks]] tables (url, secret_file, ...)")
    hooks: list[WebhookSettings] = []
    problems: list[str] = []
    for number, table in enumerate(value, 1):
        if isinstance(table, WebhookSettings):
            hooks.append(table)
            continue
        if not isinstance(table, Mapping):
            problems.append(f"webhooks #{number}: expected a table with url and secret_file")
            continue
        try:
            hooks.append(WebhookSettings.from_table(table))
        except ValueError as exc:
            problems.extend(f"webhooks #{number}: {line}" for line in str(exc).splitlines())
    names = [hook.hook for hook in hooks]
    if len(set(names)) != len(names):
        problems.append("webhooks: two hooks have the same url (or name); give each a name")
    if problems:
        raise ConfigError(*problems)
    return tuple(hooks)


def _read_secret_file(path: Path, *, what: str, warnings: list[str]) -> str:
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror})") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"{what}: {path} is readable by group or others; run: chmod 600 {path}")
    return text.strip()


def build_config(
    file_values: Mapping[str, Any],
    flag_values: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    require_upstream: bool = False,
    warnings: list[str] | None = None,
) -> Config:
    """Merge TOML values and flags (flags win) into a validated :class:`Config`.

    :param file_values: the TOML file's table (flat keys as in :class:`Config`).
    :param flag_values: values from the command line; ``None`` means "not given".
    :param environ: where ``SMTP_TRACKER_UPSTREAM_PASSWORD`` is read (default ``os.environ``).
    :param require_upstream: whether a missing upstream is a problem (``serve``).
    :param warnings: a list that receives non-fatal findings (world-readable secrets).
    :raises ConfigError: with one line per problem found, all of them at once.
    """
    environ = os.environ if environ is None else environ
    warnings = [] if warnings is None else warnings
    problems: list[str] = []
    values: dict[str, Any] = {}

    for key, value in file_values.items():
        if key not in _FIELDS or key in _NOT_IN_TOML:
            problems.append(f"unknown key {key!r} in the config file")
            continue
        try:
            values[key] = _coerce(key, value)
        except ConfigError as exc:
            problems.extend(exc.problems)
    for key, value in flag_values.items():
        if value is None:
            continue
        try:
            values[key] = _coerce(key, value)
        except ConfigError as exc:
            problems.extend(exc.problems)

    if values.get("upstream_password_file") is not None:
        try:
            values["upstream_password"] = _read_secret_file(
                values["upstream_password_file"], what="upstream_password_file", warnings=warnings
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    elif environ.get(PASSWORD_ENV):
        values["upstream_password"] = environ[PASSWORD_ENV]

    problems.extend(_check(values, require_upstream=require_upstream))
    if problems:
        raise ConfigError(*problems)
    return Config(**values)


def _check(values: Mapping[str, Any], *, require_upstream: bool) -> list[str]:
    """Cross-field rules; returns the problems found."""
    problems: list[str] = []
    get = values.get
    if require_upstream and not get("upstream"):
        problems.append("no upstream: set --upstream HOST:PORT or the key 'upstream'")
    if get("upstream_user") and not get("upstream_password"):
        problems.append(
            f"upstream_user is set but no password: set {PASSWORD_ENV} "
            "or the key upstream_password_file"
        )
    if get("upstream_user") and get("upstream_tls", "starttls") == "none":
        problems.append(
            "upstream_user needs TLS: AUTH is never sent in plaintext; "
            "set upstream_tls to starttls or implicit"
        )
    if "allowed_clients" in values and not values["allowed_clients"]:
        default = ", ".join(f'"{network}"' for network in _DEFAULT_ALLOWED_CLIENTS)
        problems.append(
            "allowed_clients: empty, so every client would be refused (554 5.7.1); list the "
            f"networks Postfix connects from, e.g. allowed_clients = [{default}] (the default, "
            "also had by leaving the key out)"
        )
    if get("dkim_policy") == "resign" and get("dkim_key_table") is None:
        problems.append(
            "dkim_policy = resign needs dkim_key_table: the OpenDKIM KeyTable with the keys"
        )
    if get("dkim_signing_table") is not None and get("dkim_key_table") is None:
        problems.append(
            "dkim_signing_table needs dkim_key_table: the KeyTable its key names refer to"
        )
    copied = {copy.upstream for copy in get("copies", ())}
    if copied & set(get("upstream", ())):
        problems.append("copies: a copy's upstream is also in upstream; it would get mail twice")
    if len(copied) != len(get("copies", ())):
        problems.append("copies: an address is listed twice")
    if (get("tls_cert") is None) != (get("tls_key") is None):
        problems.append("tls_cert and tls_key go together: set both or neither")
    for name in (
        "max_message_bytes",
        "max_recipients",
        "max_connections",
        "reports_login_failures_per_min",
        "lmtp_parallel_copies",
    ):
        if name in values and values[name] <= 0:
            problems.append(f"{name}: must be greater than 0")
    if get("workers", 1) < 0:
        problems.append("workers: must be 0 (one per core) or more")
    if get("upstream_pool_size", 0) < 0:
        problems.append("upstream_pool_size: must be 0 (no pool) or more")
    for name in ("max_events_per_token_per_min", "max_events_per_token_client_per_min"):
        if name in values and values[name] < 0:
            problems.append(f"{name}: must be 0 (no limit) or more")
    for name in _FIELDS:
        if name.endswith("_s") and name in values and values[name] <= 0:
            problems.append(f"{name}: must be a positive number of seconds")
    header = get("control_header", "X-Track")
    if not header or any(c in header for c in ": \t\r\n") or not header.isascii():
        problems.append(f"control_header: {header!r} is not a valid header field name")
    problems.extend(_check_privacy(values))
    problems.extend(_check_clicks(values))
    problems.extend(_check_store(values))
    if values.get("webhook_retry_hours", 1.0) <= 0:
        problems.append("webhook_retry_hours: must be a positive number of hours")
    if values.get("webhook_outbox_max_events", 1) < 1:
        problems.append("webhook_outbox_max_events: must be at least 1")
    reports_listen = get("reports_listen", _FIELDS["reports_listen"].default)
    if get("reports_plain_http") and not is_loopback_host(reports_listen.host):
        problems.append(
            f"reports_plain_http: only allowed when reports_listen is a loopback address "
            f"(127.0.0.1, ::1, localhost), not {reports_listen}; the reports carry a bearer "
            "token and session cookies"
        )
    if get("tracking", True) and get("pixel_base_url") is not None:
        url = str(get("pixel_base_url"))
        if not url.startswith(("https://", "http://")):
            problems.append(f"pixel_base_url: expected an https:// URL, got {url!r}")
    return problems


def _check_store(values: Mapping[str, Any]) -> list[str]:
    """``store``: a postgresql:// URL without a password, or absent."""
    store = values.get("store")
    if store is None:
        return []
    from urllib.parse import urlsplit

    text = str(store)
    if not text.startswith(("postgresql://", "postgres://")):
        return [f"store: expected postgresql://USER@HOST:PORT/DBNAME (or no key), got {text!r}"]
    try:
        parts = urlsplit(text)
        has_password = parts.password is not None or "password=" in parts.query
    except ValueError:
        return ["store: not a valid postgresql:// URL"]
    if has_password:
        return [
            "store: the URL must not hold the password; use PGPASSFILE, ~/.pgpass, PGPASSWORD "
            "or store_password_file"
        ]
    if values.get("store_pool_size", 4) < 1:
        return ["store_pool_size: must be at least 1"]
    return []


def _check_clicks(values: Mapping[str, Any]) -> list[str]:
    """The click-tracking keys: patterns compile, the marker is an attribute name."""
    problems: list[str] = []
    for pattern in values.get("click_exclude_patterns", ()):
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            problems.append(
                f"click_exclude_patterns: {pattern!r} is not a regular expression ({exc})"
            )
    attribute = values.get("click_notrack_attribute", "data-notrack")
    if not re.fullmatch(r"[^\s\"'/>=\x00]+", attribute):
        problems.append(f"click_notrack_attribute: {attribute!r} is not an HTML attribute name")
    return problems


def _check_privacy(values: Mapping[str, Any]) -> list[str]:
    """The privacy keys: domain lists, disclosure header, retention."""
    from smtp_tracker.mime.disclosure import Disclosure
    from smtp_tracker.tracking.domains import DomainPolicy

    problems: list[str] = []
    lists = (
        "include_sender_domains",
        "exclude_sender_domains",
        "include_recipient_domains",
        "exclude_recipient_domains",
    )
    for name in lists:
        try:
            DomainPolicy(**{name: values.get(name, ())})
        except ValueError as exc:
            problems.append(str(exc))
    header = {
        "disclosure_header_name": {"header_name": values.get("disclosure_header_name", "X-T")},
        "disclosure_header": {"header_value": values.get("disclosure_header")},
    }
    for name, arguments in header.items():
        try:
            Disclosure(**arguments)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    for name in ("retention_days", "link_retention_days"):
        if values.get(name, 0) < 0:
            problems.append(f"{name}: must be 0 (keep forever) or a number of days")
    try:
        Disclosure(optout_text=values.get("disclosure_optout_text", "x"))
    except ValueError as exc:
        problems.append(f"disclosure_optout_text: {exc}")
    return problems


def config_from_sources(
    *,
    config_file: Path | None,
    flags: Mapping[str, Any],
    require_upstream: bool = False,
    warnings: list[str] | None = None,
) -> Config:
    """Load ``config_file`` (if any) and merge ``flags`` over it.

    :raises ConfigError: when the file is unreadable or any value is invalid.
    """
    file_values = load_toml(config_file) if config_file is not None else {}
    return build_config(file_values, flags, require_upstream=require_upstream, warnings=warnings)
