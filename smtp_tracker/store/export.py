"""The JSON shapes of a message: :func:`detail_to_dict` for ``show --json`` and
``GET /api/messages/{id}`` (one shape, issue 14), :func:`summary_to_dict` for the
API's lists, :func:`message_to_dict` for ``smtp-tracker messages --json``.

Times are ISO 8601 in UTC with a ``Z`` suffix and microseconds, e.g.
``"2024-05-01T12:34:56.123456Z"`` (RFC 3339 §5.6 ``date-time``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from smtp_tracker.store.queries import MessageDetail, MessageSummary
from smtp_tracker.store.records import ClickEvent, MessageRecord, OpenEvent

__all__ = ["detail_to_dict", "format_time", "message_to_dict", "summary_to_dict"]


def format_time(value: datetime) -> str:
    """*value* (aware) as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def message_to_dict(
    record: MessageRecord, opens: Iterable[OpenEvent], clicks: Iterable[ClickEvent] = ()
) -> dict[str, Any]:
    """A JSON-ready dict for one message, its opens and its clicks.

    Keys, in this order: ``tracking_id``, ``queue_id``, ``message_id`` (str or
    null), ``sender`` (``""`` for the null reverse-path), ``recipients`` (list
    of str), ``size_bytes`` (int), ``received_at``, ``relayed_at``,
    ``upstream_reply``, ``tracked`` (bool), ``not_tracked_reason`` (str or
    null), ``dkim`` (str or null: ``resigned``, or why the signed message was
    relayed as received, e.g. ``dkim-foreign``), ``subject`` (only when the
    store kept one), and ``opens``: a list, oldest first, of ``{"at": time,
    "ip": str or null, "user_agent": str or null, "verdict": str,
    "verdict_reason": str or null}``, where ``ip`` is
    what the store's ``ip_policy`` kept and ``verdict`` one of ``human``,
    ``privacy_proxy``, ``mail_proxy``, ``scanner``, ``unknown`` with the rule
    that decided it (:mod:`smtp_tracker.classification`); ``links``: the
    links wrapped for click tracking, ``{"token": str, "url": str,
    "position": int}`` in order; ``clicks``: like ``opens`` with the
    ``link_token`` and ``url`` clicked.
    """
    result: dict[str, Any] = {
        "tracking_id": record.tracking_id,
        "queue_id": record.queue_id,
        "message_id": record.message_id,
        "sender": record.sender,
        "recipients": list(record.recipients),
        "size_bytes": record.size_bytes,
        "received_at": format_time(record.received_at),
        "relayed_at": format_time(record.relayed_at),
        "upstream_reply": record.upstream_reply,
        "tracked": record.tracked,
        "not_tracked_reason": record.not_tracked_reason,
        "dkim": record.dkim,
    }
    if record.subject is not None:
        result["subject"] = record.subject
    result["opens"] = [
        {
            "at": format_time(o.at),
            "ip": o.ip,
            "user_agent": o.user_agent,
            "verdict": o.verdict,
            "verdict_reason": o.verdict_reason,
        }
        for o in opens
    ]
    result["links"] = [
        {"token": link.token, "url": link.url, "position": link.position} for link in record.links
    ]
    result["clicks"] = [
        {
            "at": format_time(c.at),
            "link_token": c.link_token,
            "url": c.url,
            "ip": c.ip,
            "user_agent": c.user_agent,
            "verdict": c.verdict,
            "verdict_reason": c.verdict_reason,
        }
        for c in clicks
    ]
    return result


def _time(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def summary_to_dict(summary: MessageSummary) -> dict[str, Any]:
    """The JSON object of one message in a list (times RFC 3339 UTC, ``Z``)."""
    return {
        "tracking_id": summary.tracking_id,
        "queue_id": summary.queue_id,
        "message_id": summary.message_id,
        "sender": summary.sender,
        "recipients": list(summary.recipients),
        "subject": summary.subject,
        "relayed_at": format_time(summary.relayed_at),
        "tracked": summary.tracked,
        "not_tracked_reason": summary.not_tracked_reason,
        "dkim": summary.dkim,
        "opened": summary.opened,
        "opened_via": summary.opened_via,
        "open_count": summary.open_count,
        "counted_open_count": summary.counted_open_count,
        "first_open_at": _time(summary.first_open_at),
        "click_count": summary.click_count,
        "counted_click_count": summary.counted_click_count,
    }


def detail_to_dict(detail: MessageDetail) -> dict[str, Any]:
    """The JSON object of one message with its opens and clicks, oldest first.

    The one shape of a message: ``GET /api/messages/{id}`` and ``smtp-tracker show
    --json`` both print it (issue 14).
    """
    result = summary_to_dict(detail.summary)
    result["size_bytes"] = detail.size_bytes
    result["received_at"] = format_time(detail.received_at)
    result["upstream_reply"] = detail.upstream_reply
    result["opens"] = [
        {
            "at": format_time(event.at),
            "ip": event.ip,
            "user_agent": event.user_agent,
            "verdict": event.verdict,
            "verdict_reason": event.verdict_reason,
            "counted": event.counted,
        }
        for event in detail.opens
    ]
    result["clicks"] = [
        {
            "at": format_time(event.at),
            "url": event.url,
            "ip": event.ip,
            "user_agent": event.user_agent,
            "verdict": event.verdict,
            "verdict_reason": event.verdict_reason,
            "counted": event.counted,
        }
        for event in detail.clicks
    ]
    return result
