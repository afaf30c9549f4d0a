"""SIGHUP: read the configuration again and apply, without a restart, what can change.

What a reload applies, to connections, messages and events from then on
(nothing in flight is closed or cut):

* ``tls_cert`` and ``tls_key``: the certificate offered with STARTTLS and by
  the HTTPS listeners.  The one server :class:`ssl.SSLContext` they share loads
  the new chain; a handshake takes the context's certificate when it starts,
  so connections already established keep theirs (OpenSSL ``SSL_new`` copies it).
* the domain lists (``include_sender_domains`` and the rest) and the
  disclosure (``disclosure_footer_file``, read again, ``disclosure_header``,
  ``disclosure_header_name``, ``disclosure_optout_link``,
  ``disclosure_optout_text``), for the tracking stage;
* the network lists in ``DATA_DIR/networks`` (``smtp-tracker networks import``),
  for the open and click classifier.

The dashboard's users file needs no reload: it is read again whenever it
changes.  Any other key that differs needs a restart; the reload names those
in one warning line and applies the rest.

A reload is all or nothing: everything is read and checked first (the file,
the certificate and key loaded into a context of their own, the footer, the
lists); if anything fails, nothing changes and one line says why.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtp_tracker.classification import Classifier, load_networks
from smtp_tracker.config import Config
from smtp_tracker.errors import ConfigError, SmtpTrackerError
from smtp_tracker.mime.disclosure import Disclosure, read_footer
from smtp_tracker.tls import load_server_context
from smtp_tracker.tracking.domains import DomainPolicy

if TYPE_CHECKING:
    from smtp_tracker.store.records import EventClassifier, EventContext
    from smtp_tracker.tracking.stage import Tracker

__all__ = [
    "RELOADED_KEYS",
    "ReloadError",
    "ReloadPlan",
    "SwappableClassifier",
    "apply",
    "disclosure",
    "prepare",
]

log = logging.getLogger("smtp_tracker.main")

#: The keys a reload applies; any other changed key needs a restart.
RELOADED_KEYS = frozenset(
    {
        "tls_cert",
        "tls_key",
        "include_sender_domains",
        "exclude_sender_domains",
        "include_recipient_domains",
        "exclude_recipient_domains",
        "disclosure_footer_file",
        "disclosure_header",
        "disclosure_header_name",
        "disclosure_optout_link",
        "disclosure_optout_text",
    }
)


class ReloadError(SmtpTrackerError):
    """A reload could not be prepared; nothing was changed.  The message is one line."""


class SwappableClassifier:
    """The store's classifier, replaced whole by a reload.

    The store calls it from its writer thread; :meth:`swap` runs in the event
    loop.  Each call reads :attr:`current` once, and rebinding an attribute is
    atomic, so an event is judged wholly by the old or wholly by the new one.
    """

    def __init__(self, current: EventClassifier) -> None:
        self.current = current

    def __call__(self, event: EventContext) -> Any:
        return self.current(event)

    def swap(self, new: EventClassifier) -> None:
        """Judge events with ``new`` from now on."""
        self.current = new


@dataclass(frozen=True)
class ReloadPlan:
    """What :func:`prepare` read and checked, for :func:`apply` to put in place.

    :ivar config: the running configuration with the reloaded keys changed.
    :ivar restart_keys: keys that differ but need a restart (not applied).
    :ivar tls_dir: a private directory holding ``cert.pem`` and ``key.pem`` as
        read (so that a file replaced again meanwhile cannot mix in), or None
        when the certificate is not reloaded.
    """

    config: Config
    restart_keys: tuple[str, ...]
    tls_dir: Path | None
    domains: DomainPolicy
    disclosure: Disclosure
    classifier: Classifier | None

    def discard(self) -> None:
        """Remove the private copy of the certificate and key."""
        if self.tls_dir is not None:
            shutil.rmtree(self.tls_dir, ignore_errors=True)


def prepare(running: Config, new: Config, *, tls_reloadable: bool, classify: bool) -> ReloadPlan:
    """Read and check everything a reload to ``new`` needs (blocking: run it in a thread).

    :param running: the configuration in force.
    :param tls_reloadable: the process has a server context loaded from
        ``tls_cert``/``tls_key`` (not the embedded self-signed one).
    :param classify: the process classifies events (it has a store).
    :raises ReloadError: (one line) when a file cannot be read or is not
        usable: the certificate or key, the footer, a network list.
    """
    restart = tuple(
        sorted(
            f.name
            for f in dataclasses.fields(Config)
            if f.name not in RELOADED_KEYS
            and f.name != "upstream_password"
            and getattr(running, f.name) != getattr(new, f.name)
        )
    )
    changes: dict[str, Any] = {name: getattr(new, name) for name in RELOADED_KEYS}
    tls_dir: Path | None = None
    has_tls = new.tls_cert is not None and new.tls_key is not None
    if has_tls != tls_reloadable:  # turned on or off: the listeners were built without it
        restart = tuple(sorted({*restart, "tls_cert", "tls_key"}))
        changes["tls_cert"], changes["tls_key"] = running.tls_cert, running.tls_key
    elif tls_reloadable:
        assert new.tls_cert is not None and new.tls_key is not None
        tls_dir = _copy_certificate(new.tls_cert, new.tls_key)
    try:
        disclosure = _disclosure(new)
        classifier = None
        if classify:
            try:
                classifier = Classifier(load_networks(new.data_dir), running.prefetch_window_s)
            except (OSError, ValueError, SmtpTrackerError) as exc:
                raise ReloadError(f"network lists in {new.data_dir}: {exc}") from exc
    except BaseException:
        if tls_dir is not None:
            shutil.rmtree(tls_dir, ignore_errors=True)
        raise
    return ReloadPlan(
        config=dataclasses.replace(running, **changes),
        restart_keys=restart,
        tls_dir=tls_dir,
        domains=DomainPolicy(
            include_sender_domains=new.include_sender_domains,
            exclude_sender_domains=new.exclude_sender_domains,
            include_recipient_domains=new.include_recipient_domains,
            exclude_recipient_domains=new.exclude_recipient_domains,
        ),
        disclosure=disclosure,
        classifier=classifier,
    )


def apply(
    plan: ReloadPlan,
    *,
    tls_context: ssl.SSLContext | None,
    tracker: Tracker | None,
    classifier: SwappableClassifier | None,
) -> None:
    """Put ``plan`` in force (in the event loop; it does not block on the network).

    :raises ReloadError: when the live context refuses the certificate it
        was checked with (not expected: the same bytes loaded in :func:`prepare`).
    """
    try:
        if plan.tls_dir is not None and tls_context is not None:
            tls_context.load_cert_chain(plan.tls_dir / "cert.pem", plan.tls_dir / "key.pem")
    except (OSError, ssl.SSLError) as exc:
        raise ReloadError(f"the running TLS context refused the new certificate ({exc})") from exc
    finally:
        plan.discard()
    if tracker is not None:
        tracker.reconfigure(domains=plan.domains, disclosure=plan.disclosure)
    if classifier is not None and plan.classifier is not None:
        classifier.swap(plan.classifier)


def _copy_certificate(cert: Path, key: Path) -> Path:
    """Copy ``cert`` and ``key`` to a private directory and check they load together."""
    directory = Path(tempfile.mkdtemp(prefix="smtp-tracker-reload-"))  # mode 0700
    try:
        for source, name in ((cert, "cert.pem"), (key, "key.pem")):
            try:
                data = source.read_bytes()
            except OSError as exc:
                raise ReloadError(f"cannot read {source} ({exc.strerror})") from exc
            copy = directory / name
            copy.touch(mode=0o600)
            copy.write_bytes(data)
        try:
            load_server_context(directory / "cert.pem", directory / "key.pem")
        except SmtpTrackerError as exc:
            text = str(exc).replace(str(directory / "cert.pem"), str(cert))
            raise ReloadError(text.replace(str(directory / "key.pem"), str(key))) from exc
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def disclosure(config: Config) -> Disclosure:
    """The disclosure footer and header; reads ``disclosure_footer_file`` (blocking).

    Used at start (:mod:`smtp_tracker.app`) and by a reload.

    :raises ConfigError: when the footer file cannot be read or is not a
        usable UTF-8 HTML fragment.
    """
    footer = ""
    if config.disclosure_footer_file is not None:
        try:
            footer = read_footer(config.disclosure_footer_file)
        except ValueError as exc:
            raise ConfigError(f"disclosure_footer_file: {exc}") from None
    return Disclosure(
        footer_html=footer,
        header_name=config.disclosure_header_name,
        header_value=config.disclosure_header,
        optout_link=config.disclosure_optout_link,
        optout_text=config.disclosure_optout_text,
    )


def _disclosure(config: Config) -> Disclosure:
    """:func:`disclosure`, its failure a :class:`ReloadError` (the same one line)."""
    try:
        return disclosure(config)
    except ConfigError as exc:
        raise ReloadError(str(exc)) from None


def describe_failure(exc: BaseException) -> str:
    """The one line a failed reload logs."""
    if isinstance(exc, ConfigError):
        return "; ".join(exc.problems)
    return str(exc)
