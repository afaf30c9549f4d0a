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

__all__ = [
    "PASSWORD_ENV",
    "CaptureMode",
    "Config",
    "HostPort",
    "IpPolicy",
    "UpstreamTLS",
    "build_config",
    "is_loopback_host",
    "load_toml",
    "parse_host_port",
]

PASSWORD_ENV = "SMTP_TRACKER_UPSTREAM_PASSWORD"  # noqa: S105 - a variable name

UpstreamTLS = Literal["starttls", "implicit", "none"]
CaptureMode = Literal["off", "errors", "all"]
IpPolicy = Literal["full", "truncate", "hash", "none"]
DkimPolicy = Literal["skip", "track"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HostPort:
    """A ``HOST:PORT`` pair; IPv6 hosts are written ``[::1]:25``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """Everything smtp-tracker is told, validated.

    Durations are in seconds (``*_s``), sizes in bytes (``*_bytes``).
    """

    # -- SMTP listener (downstream: Postfix) ---------------------------------
    listen: HostPort = HostPort("127.0.0.1", 10025)
    hostname: str = field(default_factory=socket.getfqdn)
    allowed_clients: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    client_timeout_s: float = 300.0
    max_message_bytes: int = 52_428_800
    max_recipients: int = 1000
    max_connections: int = 100
    add_received_header: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # -- upstream (the smarthost) ---------------------------------------------
    upstream: HostPort | None = None
    upstream_tls: UpstreamTLS = "starttls"
    upstream_ca_file: Path | None = None
    insecure_skip_verify: bool = False
    upstream_user: str | None = None
    upstream_password: str | None = field(default=None, repr=False)
    upstream_password_file: Path | None = None
    upstream_connect_timeout_s: float = 30.0
    upstream_command_timeout_s: float = 300.0
    upstream_data_timeout_s: float = 600.0

    # -- data directory, capture, logs ----------------------------------------
    data_dir: Path = Path("smtp-tracker-data")
    capture: CaptureMode = "off"
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"

    # -- service life cycle ----------------------------------------------------
    shutdown_grace_s: float = 30.0

    # -- tracking --------------------------------------------------------------
    tracking: bool = True
    pixel_base_url: str | None = None
    dkim_policy: DkimPolicy = "skip"
    tracking_requires_opt_in: bool = False
    control_header: str = "X-Track"
    rewrite_timeout_s: float = 10.0
    store_subject: bool = False
    ip_policy: IpPolicy = "truncate"

    # -- rewrite threads (a burst waits for one, bounded) ----------------------
    rewrite_queue_wait_s: float = 5.0

    # -- click tracking ----------------------------------------------------------
    track_clicks: bool = False
    track_text_links: bool = False
    #: the same as smtp_tracker.mime.links.DEFAULT_CLICK_EXCLUDE_PATTERNS (a test checks)
    click_exclude_patterns: tuple[str, ...] = (
        r"unsubscri",
        r"\bunsub\b",
        r"opt[-_.]?out",
        r"preference",
    )
    click_notrack_attribute: str = "data-notrack"

    # -- privacy ---------------------------------------------------------------
    include_sender_domains: tuple[str, ...] = ()
    exclude_sender_domains: tuple[str, ...] = ()
    include_recipient_domains: tuple[str, ...] = ()
    exclude_recipient_domains: tuple[str, ...] = ()
    disclosure_footer_file: Path | None = None
    disclosure_header: str | None = None
    disclosure_header_name: str = "X-Tracking-Notice"
    retention_days: int = 365

    # -- open classification ---------------------------------------------------
    prefetch_window_s: float = 30.0

    # -- event rate limits (recorded events; the GIF is always served) -----------
    max_events_per_token_per_min: int = 30
    max_events_per_token_client_per_min: int = 5

    # -- pixel endpoint --------------------------------------------------------
    pixel: bool = True
    pixel_listen: HostPort = HostPort("0.0.0.0", 8443)  # noqa: S104 - public by design
    pixel_plain_http: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()

    # -- reports listener ------------------------------------------------------
    reports: bool = True
    reports_listen: HostPort = HostPort("127.0.0.1", 8444)
    reports_plain_http: bool = False
    reports_token_file: Path | None = None

    # -- reports: dashboard users and sessions ----------------------------------
    reports_users_file: Path | None = None
    reports_session_s: float = 43_200.0
    reports_login_failures_per_min: int = 5

    @property
    def reports_token_path(self) -> Path:
        """The API bearer token file: ``reports_token_file``, else ``DATA_DIR/reports-token``."""
        return self.reports_token_file or self.data_dir / "reports-token"

    @property
    def reports_users_path(self) -> Path:
        """The dashboard's users: ``reports_users_file``, else ``DATA_DIR/reports-users.json``."""
        return self.reports_users_file or self.data_dir / "reports-users.json"

    def upstream_address(self) -> HostPort:
        """The upstream, which :func:`build_config` guarantees for ``serve``.

        :raises ConfigError: when no upstream is configured.
        """
        if self.upstream is None:
            raise ConfigError("no upstream: set --upstream HOST:PORT or the key 'upstream'")
        return self.upstream


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
    """Read a TOML configuration file.

    :raises ConfigError: when the file cannot be read or is not valid TOML.
    """
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or flag value into the field's type; raise ConfigError if it can't."""
    kind = _FIELDS[name].type
    if name in {"listen", "upstream", "pixel_listen", "reports_listen"}:
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
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{name}: expected a number of seconds")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number of seconds, got {value!r}") from None
    literal = {
        "UpstreamTLS": UpstreamTLS,
        "CaptureMode": CaptureMode,
        "IpPolicy": IpPolicy,
        "DkimPolicy": DkimPolicy,
        "LogLevel": LogLevel,
        "LogFormat": LogFormat,
    }.get(str(kind))
    if literal is not None:
        choices = get_args(literal)
        text = str(value).lower()
        if text not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
        return text
    if kind == "tuple[str, ...]":
        return _parse_strings(value, what=name)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string")
    return value


def _parse_strings(value: Any, *, what: str) -> tuple[str, ...]:
    """A list of strings from TOML (``["a", "b"]``) or a flag (``a,b``); blanks dropped."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{what}: expected a list of strings")
    return tuple(text for text in (item.strip() for item in items) if text)


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
    if require_upstream and get("upstream") is None:
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
    if (get("tls_cert") is None) != (get("tls_key") is None):
        problems.append("tls_cert and tls_key go together: set both or neither")
    for name in (
        "max_message_bytes",
        "max_recipients",
        "max_connections",
        "reports_login_failures_per_min",
    ):
        if name in values and values[name] <= 0:
            problems.append(f"{name}: must be greater than 0")
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
    if values.get("retention_days", 0) < 0:
        problems.append("retention_days: must be 0 (keep forever) or a number of days")
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
