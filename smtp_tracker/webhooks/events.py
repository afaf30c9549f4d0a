"""The events smtp-tracker pushes out, and their one JSON shape.

Every event is one JSON object with these members (RFC 8259), the same in a
webhook's body and in a line of ``events_log``:

``id``
    A UUIDv7 (RFC 9562 §5.7), made once when the event is written to the
    outbox and the same on every retry; it is also the ``webhook-id`` header,
    which receivers deduplicate on (delivery is at least once).
``type``
    One of :data:`EVENT_TYPES`.
``occurred_at``
    When it happened, RFC 3339 in UTC with microseconds (``2026-12-07T05:30:00.123456Z``).
``tracking_id``, ``queue_id``, ``message_id``, ``sender``, ``recipients``
    The message the event is about (``message_id`` may be null).

Then by type:

* ``message.relayed``: ``tracked`` (bool), ``not_tracked_reason`` (null when
  tracked), ``size_bytes``, ``upstream_reply``;
* ``message.deferred`` (4xx) and ``message.bounced`` (5xx), refused in step
  at the end of data: ``reply`` (``{"code": 451, "enhanced_status": "4.4.1",
  "text": ...}``), what the client was told;
* ``message.opened`` and ``link.clicked``: ``verdict``, ``verdict_reason``,
  ``counted`` (whether the reports count it), ``first`` (the first counted
  open, or click, of the message), ``ip`` (as ``ip_policy`` keeps it),
  ``user_agent``; clicks add ``link`` (``{"position": 0, "url": ...}``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from smtp_tracker.store.instant import Instant, to_us

__all__ = [
    "EVENT_TYPES",
    "Event",
    "EventType",
    "new_event_id",
    "rfc3339",
]

EventType = Literal[
    "message.relayed", "message.deferred", "message.bounced", "message.opened", "link.clicked"
]
EVENT_TYPES: Final[tuple[EventType, ...]] = (
    "message.relayed",
    "message.deferred",
    "message.bounced",
    "message.opened",
    "link.clicked",
)


def new_event_id(now_ns: int | None = None) -> str:
    """A new UUIDv7 (RFC 9562 §5.7): 48 bits of Unix milliseconds, then 74 random bits.

    Ids made later sort later (to the millisecond), so a receiver's index on
    them grows at its end.

    :param now_ns: the time in nanoseconds since the epoch (default: now).
    """
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | rand & ((1 << 80) - 1)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # variant 10
    return str(uuid.UUID(int=value))


def rfc3339(at: datetime) -> str:
    """*at* as RFC 3339 in UTC with microseconds and ``Z`` (RFC 3339 §5.6).

    :raises ValueError: when *at* is naive.
    """
    if at.tzinfo is None:
        raise ValueError("naive datetime")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Event:
    """One event as it goes into the outbox.

    :ivar id: its UUIDv7.
    :ivar type: one of :data:`EVENT_TYPES`.
    :ivar order_key: events with the same key are delivered in the order they
        were written (the tracking id, or the queue id when there is none).
    :ivar counted: for opens and clicks, whether the reports count it (a hook
        with ``counted_only`` gets only those); True for the other types.
    :ivar body: the JSON text sent and logged.
    :ivar occurred_us: ``occurred_at`` in microseconds since the epoch.
    """

    id: str
    type: EventType
    order_key: str
    counted: bool
    body: str
    occurred_us: Instant

    @classmethod
    def make(
        cls,
        type: EventType,
        *,
        occurred_at: datetime,
        tracking_id: str | None,
        queue_id: str,
        message_id: str | None,
        sender: str,
        recipients: list[str],
        counted: bool = True,
        **fields: Any,
    ) -> Event:
        """Build an event with a new id; *fields* are the type's own members."""
        event_id = new_event_id()
        document = {
            "id": event_id,
            "type": type,
            "occurred_at": rfc3339(occurred_at),
            "tracking_id": tracking_id,
            "queue_id": queue_id,
            "message_id": message_id,
            "sender": sender,
            "recipients": recipients,
            **fields,
        }
        if type in ("message.opened", "link.clicked"):
            document["counted"] = counted
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
        occurred_us = to_us(occurred_at)
        return cls(event_id, type, tracking_id or queue_id, counted, body, occurred_us)
