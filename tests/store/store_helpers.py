"""Helpers for the tracking store tests: deterministic tokens and records."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

from smtp_tracker.store import MessageRecord

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def token(i: int) -> str:
    """A well-formed, deterministic tracking id for test message *i*."""
    return base64.urlsafe_b64encode(i.to_bytes(17, "big")).rstrip(b"=").decode()


def make_record(i: int = 0, **overrides: Any) -> MessageRecord:
    """Message record *i*, relayed *i* minutes after :data:`T0`."""
    at = T0 + timedelta(minutes=i)
    fields: dict[str, Any] = {
        "tracking_id": token(i),
        "queue_id": f"Q{i:05d}",
        "message_id": f"<msg{i}@example.com>",
        "sender": "alice@example.com",
        "recipients": ["bob@example.net", "carol@example.org"],
        "size_bytes": 1000 + i,
        "received_at": at - timedelta(seconds=1),
        "relayed_at": at,
        "upstream_reply": f"2.0.0 Ok: queued as UP{i}",
        "tracked": True,
        "not_tracked_reason": None,
        "subject": f"Hello {i}",
    }
    fields.update(overrides)
    return MessageRecord(**fields)
