"""One ``[[webhooks]]`` table of the configuration, validated.

::

    [[webhooks]]
    url = "https://crm.example.com/hooks/smtp-tracker"
    secret_file = "/etc/smtp-tracker/webhook-crm.secret"   # smtp-tracker webhooks new-secret
    events = ["message.opened", "link.clicked"]             # default: every type
    counted_only = true                                     # default false
    # allow_plain_http = false   # http:// only with this
    # ca_file = "/etc/ssl/private-ca.pem"   # verify the receiver with this CA instead
    # name = "crm"               # how status and logs name it (default: the URL)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from smtp_tracker.webhooks.events import EVENT_TYPES, EventType

__all__ = ["EVENTS_LOG_HOOK", "WebhookSettings"]

#: The outbox's name for the ``events_log`` file, beside the webhooks' names.
EVENTS_LOG_HOOK = "events_log"

_KEYS = frozenset({"url", "secret_file", "events", "counted_only", "allow_plain_http", "ca_file"})


@dataclass(frozen=True, kw_only=True, slots=True)
class WebhookSettings:
    """One webhook.

    :ivar url: where events are POSTed (https unless *allow_plain_http*).
    :ivar secret_file: file holding the Standard Webhooks secret (``whsec_...``).
    :ivar events: the event types sent (default: all of :data:`.events.EVENT_TYPES`).
    :ivar counted_only: send only the opens and clicks the reports count.
    :ivar allow_plain_http: allow an ``http://`` URL.
    :ivar ca_file: PEM certificates to verify the receiver with, instead of the system's.
    :ivar name: the hook's name in the outbox, logs and ``webhooks status`` (default: the URL).
    """

    url: str
    secret_file: Path
    events: tuple[EventType, ...] = EVENT_TYPES
    counted_only: bool = False
    allow_plain_http: bool = False
    ca_file: Path | None = None
    name: str = ""

    @property
    def hook(self) -> str:
        """The hook's name: *name*, else the URL."""
        return self.name or self.url

    def wants(self, event_type: str, counted: bool) -> bool:
        """Whether this hook is sent an event of *event_type* (*counted* for opens and clicks)."""
        return event_type in self.events and (counted or not self.counted_only)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> WebhookSettings:
        """Validate one TOML table.

        :raises ValueError: with every problem found, one per line.
        """
        problems: list[str] = []
        unknown = sorted(set(table) - _KEYS - {"name"})
        if unknown:
            problems.append(f"unknown keys {', '.join(unknown)}")
        url = table.get("url")
        plain = table.get("allow_plain_http", False)
        if not isinstance(plain, bool):
            problems.append("allow_plain_http: expected true or false")
            plain = False
        if not isinstance(url, str) or not url:
            problems.append("url: expected an https:// URL")
        else:
            parts = urlsplit(url)
            schemes = ("https", "http") if plain else ("https",)
            if parts.scheme not in schemes or not parts.hostname:
                problems.append(
                    f"url: expected an https:// URL, got {url!r}"
                    + ("" if plain or parts.scheme != "http" else " (allow_plain_http = true?)")
                )
        secret = table.get("secret_file")
        if not isinstance(secret, str) or not secret:
            problems.append("secret_file: expected the path of a whsec_ secret file")
        events = table.get("events", list(EVENT_TYPES))
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            problems.append("events: expected a list of event types")
            events = list(EVENT_TYPES)
        bad = [e for e in events if e not in EVENT_TYPES]
        if bad:
            problems.append(
                f"events: unknown {', '.join(map(repr, bad))}; known: {', '.join(EVENT_TYPES)}"
            )
        counted_only = table.get("counted_only", False)
        if not isinstance(counted_only, bool):
            problems.append("counted_only: expected true or false")
        ca_file = table.get("ca_file")
        if ca_file is not None and (not isinstance(ca_file, str) or not ca_file):
            problems.append("ca_file: expected a path")
        name = table.get("name", "")
        if not isinstance(name, str) or name == EVENTS_LOG_HOOK:
            problems.append(f"name: expected a string other than {EVENTS_LOG_HOOK!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return cls(
            url=str(url),
            secret_file=Path(str(secret)),
            events=tuple(e for e in EVENT_TYPES if e in events),
            counted_only=bool(counted_only),
            allow_plain_http=plain,
            ca_file=Path(ca_file) if ca_file else None,
            name=str(name),
        )
