"""The JSON shape of a message for the CLI.

No backend: records built in memory; the shape read from either backend is
test_one_shape.py's.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from smtp_tracker.store import ClickEvent, LinkRecord, OpenEvent, format_time, message_to_dict

from .store_helpers import T0, make_record, token


def test_message_to_dict_exact_shape() -> None:
    record = make_record(1, subject=None)
    opens = [
        OpenEvent(
            tracking_id=token(1),
            at=T0,
            ip="192.0.2.0/24",
            user_agent="Mail/1",
            verdict="human",
            verdict_reason="ua:mail-client",
        ),
        OpenEvent(tracking_id=token(1), at=T0 + timedelta(seconds=5), ip=None, user_agent=None),
    ]
    assert message_to_dict(record, opens) == {
        "tracking_id": token(1),
        "queue_id": "Q00001",
        "message_id": "<msg1@example.com>",
        "sender": "alice@example.com",
        "recipients": ["bob@example.net", "carol@example.org"],
        "size_bytes": 1001,
        "received_at": "2024-05-01T12:00:59.123456Z",
        "relayed_at": "2024-05-01T12:01:00.123456Z",
        "upstream_reply": "2.0.0 Ok: queued as UP1",
        "tracked": True,
        "not_tracked_reason": None,
        "dkim": None,
        "opens": [
            {
                "at": "2024-05-01T12:00:00.123456Z",
                "ip": "192.0.2.0/24",
                "user_agent": "Mail/1",
                "verdict": "human",
                "verdict_reason": "ua:mail-client",
            },
            {
                "at": "2024-05-01T12:00:05.123456Z",
                "ip": None,
                "user_agent": None,
                "verdict": "unknown",
                "verdict_reason": None,
            },
        ],
        "links": [],
        "clicks": [],
    }


def test_links_and_clicks_are_listed() -> None:
    link = LinkRecord(token="L" * 23, url="https://example.com/?a=1&b=2", position=0)
    record = make_record(1, links=(link,))
    click = ClickEvent(
        link_token=link.token,
        tracking_id=token(1),
        url=link.url,
        at=T0,
        ip=None,
        user_agent="Mail/1",
        verdict="human",
        verdict_reason="ua:mail-client",
    )
    as_dict = message_to_dict(record, [], [click])
    assert as_dict["links"] == [{"token": "L" * 23, "url": link.url, "position": 0}]
    assert as_dict["clicks"] == [
        {
            "at": "2024-05-01T12:00:00.123456Z",
            "link_token": "L" * 23,
            "url": "https://example.com/?a=1&b=2",
            "ip": None,
            "user_agent": "Mail/1",
            "verdict": "human",
            "verdict_reason": "ua:mail-client",
        }
    ]


def test_subject_only_when_stored_and_json_serialisable() -> None:
    as_dict = message_to_dict(make_record(2, subject="Hi"), [])
    assert as_dict["subject"] == "Hi"
    assert list(as_dict)[-3:] == ["opens", "links", "clicks"]
    assert json.loads(json.dumps(as_dict)) == as_dict


def test_times_are_utc_with_z() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert format_time(datetime(2024, 5, 1, 14, 0, tzinfo=plus2)) == "2024-05-01T12:00:00.000000Z"
    assert datetime.fromisoformat(format_time(T0)) == T0
    assert format_time(T0).endswith("Z") and format_time(T0) == format_time(T0.astimezone(UTC))
