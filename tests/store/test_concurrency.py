"""No lost update, on both backends: several writers (each its own connection, as serve
and pixel processes are) recording opens and clicks of the same messages at once keep
every counter and the daily rollup equal to counting the rows."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from smtp_tracker.store import ClickEvent, OpenEvent
from smtp_tracker.tokens import LinkRecord

from .store_helpers import T0, make_record, token

WRITERS = 4
ROUNDS = 25
MESSAGES = 6


def test_writers_at_once_lose_no_update(open_same_database: Any) -> None:
    def link(i: int) -> LinkRecord:
        return LinkRecord(token=f"L{i:021d}", url=f"https://example.com/{i}", position=0)

    with open_same_database() as db:
        for i in range(MESSAGES):
            db.record_message(make_record(i, links=(link(i),)))
    start = threading.Barrier(WRITERS)
    errors: list[BaseException] = []

    def write(w: int) -> None:
        try:
            with open_same_database() as db:
                start.wait(timeout=30)
                for r in range(ROUNDS):
                    at = T0 + timedelta(hours=1, seconds=r)
                    # every writer hits every message in each batch, in its own order
                    order = [(i + w) % MESSAGES for i in range(MESSAGES)]
                    db.record_opens(
                        [
                            OpenEvent(tracking_id=token(i), at=at, ip=None, user_agent=ua)
                            for i in order
                            for ua in ("Mozilla/5.0", None)
                        ]
                    )
                    db.record_clicks(
                        [
                            ClickEvent(
                                link_token=link(i).token,
                                at=at,
                                ip=None,
                                user_agent=None,
                            )
                            for i in reversed(order)
                        ]
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    with open_same_database() as reader:
        conn = reader.connection  # ``?`` placeholders on either backend

        def one(sql: str, params: tuple[int, ...] = ()) -> tuple[int, ...]:
            row = conn.execute(sql, params).fetchone()
            return tuple(int(v) for v in row)

        per_message = WRITERS * ROUNDS * 2
        assert one("SELECT count(*) FROM opens") == (MESSAGES * per_message,)
        assert one(
            "SELECT count(*) FROM messages m WHERE open_count <> ? OR click_count <> ?"
            " OR open_count <> (SELECT count(*) FROM opens o WHERE o.tracking_id = m.tracking_id)",
            (per_message, WRITERS * ROUNDS),
        ) == (0,)
        assert one(
            "SELECT sum(opens), sum(opened_any), sum(clicks),"
            " sum(opens_human + opens_privacy_proxy + opens_mail_proxy + opens_scanner"
            " + opens_unknown) FROM daily_stats"
        ) == one(
            "SELECT (SELECT count(*) FROM opens), (SELECT count(*) FROM messages"
            " WHERE open_count > 0), (SELECT count(*) FROM clicks), (SELECT count(*) FROM opens)"
        )
