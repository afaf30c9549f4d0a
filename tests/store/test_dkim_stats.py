"""The DKIM outcome of each message (issue 13) on both backends: stored, shown, and
counted per outcome by the reports' statistics."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from smtp_tracker.store.export import detail_to_dict
from smtp_tracker.store.queries import DKIM_OUTCOMES, stats_total

from .store_helpers import make_record, token

DAY = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ZERO = dict.fromkeys(DKIM_OUTCOMES, 0)


async def test_stats_count_each_outcome_per_day_and_domain_within_the_period(store: Any) -> None:
    outcomes = [
        (0, DAY, "a@one.example", "resigned"),
        (1, DAY, "b@one.example", "resigned"),
        (2, DAY, "c@two.example", "dkim-invalid"),
        (3, DAY, "d@two.example", None),
        (4, DAY + timedelta(days=1), "a@one.example", "dkim-signed"),
        (5, DAY + timedelta(days=2), "a@one.example", "resigned"),  # after until
    ]
    for i, at, sender, dkim in outcomes:
        await store.record_message(make_record(i, relayed_at=at, sender=sender, dkim=dkim))
    until = date(2026, 12, 2)
    by_day = await store.query_stats(since=DAY.date(), until=until)
    by_domain = await store.query_stats(since=DAY.date(), until=until, group="sender_domain")
    detail = await store.query_message(token(2))
    unsigned = await store.query_message(token(3))

    assert [(row.key, row.dkim) for row in by_day] == [
        ("2026-12-01", {**ZERO, "resigned": 2, "dkim-invalid": 1}),
        ("2026-12-02", {**ZERO, "dkim-signed": 1}),
    ]
    assert {row.key: row.dkim for row in by_domain} == {
        "one.example": {**ZERO, "resigned": 2, "dkim-signed": 1},
        "two.example": {**ZERO, "dkim-invalid": 1},
    }
    assert stats_total(by_day).dkim == {**ZERO, "resigned": 2, "dkim-invalid": 1, "dkim-signed": 1}
    assert detail is not None and detail_to_dict(detail)["dkim"] == "dkim-invalid"
    assert unsigned is not None and detail_to_dict(unsigned)["dkim"] is None
    found = await store.find_message(token(0))
    assert found is not None and found.record.dkim == "resigned"
