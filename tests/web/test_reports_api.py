"""The reports JSON API over real HTTPS, as ``serve`` composes it (Application).

A data directory is filled with known messages, opens (classified by a test
classifier) and clicks; then the Application starts the pixel endpoint and
the reports listener on port 0 with the test CA's certificate, and an aiohttp
client that trusts only that CA calls every route.
"""

from __future__ import annotations

import csv
import io
import logging
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from smtp_tracker.app import Application
from smtp_tracker.config import build_config
from smtp_tracker.errors import ConfigError, StoreError
from smtp_tracker.store import SqliteDatabase, SqliteStore
from smtp_tracker.store.records import (
    VERDICTS,
    ClickEvent,
    EventContext,
    LinkRecord,
    OpenEvent,
    Verdict,
)
from smtp_tracker.web.reports.api import CSV_COLUMNS, make_reports_app
from smtp_tracker.web.site import start_site

from .web_helpers import make_record, token

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
MESSAGES = 130  # more than two pages of 50
API_ROUTES = (
    "/api/messages",
    f"/api/messages/{token(1)}",
    "/api/stats",
    "/api/export.csv",
    "/api/openapi.json",
)


def classify_by_user_agent(event: EventContext) -> tuple[Verdict, str]:
    verdict = event.user_agent if event.user_agent in VERDICTS else "unknown"
    return verdict, f"test:{verdict}"  # type: ignore[return-value]


def fill(data_dir: Path) -> None:
    """Messages 0..129, one per hour from T0; senders alternate between two domains;
    every 4th untracked; tracked even ones opened (verdict cycling), #1 clicked."""
    with SqliteDatabase.open(data_dir, classifier=classify_by_user_agent) as database:
        for i in range(MESSAGES):
            database.record_message(
                make_record(
                    i,
                    sender="news@example.com" if i % 2 == 0 else "billing@example.org",
                    recipients=[f"user{i % 10}@dest.test"],
                    message_id="=2+3@formula.test" if i == 7 else f"<m{i}@example.com>",
                    relayed_at=T0 + timedelta(hours=i),
                    received_at=T0 + timedelta(hours=i),
                    tracked=i % 4 != 3,
                    not_tracked_reason=None if i % 4 != 3 else "no-html",
                    links=(
                        LinkRecord(
                            token="L" + "k" * 22, url="https://example.com/?a=1&b=2", position=0
                        ),
                    )
                    if i == 1
                    else (),
                )
            )
        database.record_opens(
            [
                OpenEvent(
                    tracking_id=token(i),
                    at=T0 + timedelta(hours=i, minutes=5),
                    ip="192.0.2.10",
                    user_agent=VERDICTS[(i // 2) % len(VERDICTS)],
                )
                for i in range(0, MESSAGES, 2)
                if i % 4 != 3
            ]
            + [
                OpenEvent(
                    tracking_id=token(1),
                    at=T0 + timedelta(hours=2),
                    ip=None,
                    user_agent="human",
                )
            ]
        )
        database.record_clicks(
            [
                ClickEvent(
                    link_token="L" + "k" * 22,
                    at=T0 + timedelta(hours=3),
                    ip="192.0.2.11",
                    user_agent="human",
                )
            ]
        )


@dataclass
class Reports:
    app: Application
    token: str
    session: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"https://localhost:{self.app.reports_port}"

    @property
    def pixel_base(self) -> str:
        return f"https://localhost:{self.app.pixel_port}"

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def get(self, path: str, **params: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.session.get(self.base + path, params=params, headers=self.auth()) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body, r


@pytest.fixture
async def reports(
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> AsyncIterator[Reports]:
    data_dir = tmp_path / "data"
    fill(data_dir)
    config = build_config(
        {
            "data_dir": str(data_dir),
            "hostname": "localhost",
            "tracking": False,
            "pixel": True,
            "pixel_listen": "127.0.0.1:0",
            "reports": True,
            "reports_listen": "127.0.0.1:0",
            "tls_cert": str(cert_pem_path),
            "tls_key": str(key_pem_path),
        },
        {},
        environ={},
    )
    app = Application(config, smtp=False)
    caplog.set_level(logging.INFO)
    await app.start()
    try:
        token = (data_dir / "reports-token").read_text().strip()
        connector = aiohttp.TCPConnector(ssl=client_ssl_context)
        async with aiohttp.ClientSession(connector=connector) as session:
            yield Reports(app=app, token=token, session=session)
    finally:
        await app.stop(grace_s=0)


# -- token and authentication ---------------------------------------------------------------


async def test_token_file_is_made_private_and_never_logged(
    reports: Reports, caplog: pytest.LogCaptureFixture
) -> None:
    path = reports.app.config.data_dir / "reports-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(reports.token) >= 32
    logged = "\n".join(record.getMessage() for record in caplog.get_records("setup"))
    assert str(path) in logged
    assert reports.token not in logged
    assert "listening for HTTPS (reports)" in logged


@pytest.mark.parametrize("path", API_ROUTES)
async def test_every_route_needs_the_token(reports: Reports, path: str) -> None:
    url = reports.base + path
    async with reports.session.get(url) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in await response.json()
    for header in (
        {"Authorization": "Bearer wrong-token-of-the-right-length-0123456789"},
        {"Authorization": f"Bearer {reports.token[:-1]}"},
        {"Authorization": f"Basic {reports.token}"},
        {"Authorization": reports.token},
    ):
        async with reports.session.get(url, headers=header) as response:
            assert response.status == 401, header
            assert response.headers["Cache-Control"] == "no-store"
    async with reports.session.get(url, headers=reports.auth()) as response:
        assert response.status == 200


async def test_no_cors_headers_and_no_store_everywhere(reports: Reports) -> None:
    origin = {"Origin": "https://evil.example"}
    cases = [
        ("GET", "/api/messages", reports.auth()),
        ("GET", "/api/messages", {}),
        ("GET", "/api/messages/unknown", reports.auth()),
        ("GET", "/api/messages?limit=0", reports.auth()),
        ("GET", "/api/nothing-here", reports.auth()),
        ("OPTIONS", "/api/messages", {"Access-Control-Request-Method": "GET"}),
        ("GET", "/api/export.csv", reports.auth()),
    ]
    for method, path, headers in cases:
        async with reports.session.request(
            method, reports.base + path, headers={**origin, **headers}
        ) as response:
            await response.read()
            cors = [h for h in response.headers if h.lower().startswith("access-control-")]
            assert cors == [], (method, path)
            assert response.headers["Cache-Control"] == "no-store", (method, path)
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.status != 200 or method == "GET"


# -- /api/messages --------------------------------------------------------------------------


async def test_messages_first_page_newest_first(reports: Reports) -> None:
    status, body, response = await reports.get("/api/messages")
    assert status == 200
    assert response.content_type == "application/json"
    assert [item["tracking_id"] for item in body["items"]] == [
        token(i) for i in range(MESSAGES - 1, MESSAGES - 51, -1)
    ]
    assert isinstance(body["next_cursor"], str)
    first = body["items"][0]
    assert first["relayed_at"] == "2024-05-06T17:00:00.000000Z"
    assert set(first) == {
        "tracking_id",
        "queue_id",
        "message_id",
        "sender",
        "recipients",
        "subject",
        "relayed_at",
        "tracked",
        "not_tracked_reason",
        "dkim",
        "opened",
        "opened_via",
        "open_count",
        "counted_open_count",
        "first_open_at",
        "click_count",
        "counted_click_count",
    }


async def test_pages_cover_everything_once(reports: Reports) -> None:
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "17"} | ({"cursor": cursor} if cursor else {})
        status, body, _ = await reports.get("/api/messages", **params)
        assert status == 200
        seen.extend(item["tracking_id"] for item in body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 8  # 130 / 17
    assert seen == [token(i) for i in reversed(range(MESSAGES))]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"sender": "news@example.com"}, [i for i in range(MESSAGES) if i % 2 == 0]),
        ({"sender_domain": "EXAMPLE.ORG"}, [i for i in range(MESSAGES) if i % 2 == 1]),
        ({"recipient": "USER3@dest.test"}, [i for i in range(MESSAGES) if i % 10 == 3]),
        ({"q": token(42)}, [42]),
        ({"q": "Q000043"}, [43]),
        ({"q": "m44@example.com"}, [44]),
        ({"q": "<m44@example.com>"}, [44]),
        ({"since": "2024-05-05"}, [i for i in range(MESSAGES) if i >= 88]),
        ({"until": "2024-05-01"}, list(range(16))),  # a date includes its whole day
        ({"since": "2024-05-01T10:00:00Z", "until": "2024-05-01T12:00:00+00:00"}, [2, 3]),
        ({"since": "2024-05-01T12:00:00+02:00", "until": "2024-05-01T12:00:00"}, [2, 3]),
        (
            {"opened": "true"},
            sorted([1] + [i for i in range(0, MESSAGES, 2) if (i // 2) % 5 in (0, 2)]),
        ),
        ({"tracked": "false"}, [i for i in range(MESSAGES) if i % 4 == 3]),
        (
            {"sender": "news@example.com", "opened": "false", "since": "2024-05-03"},
            [i for i in range(40, MESSAGES, 2) if (i // 2) % 5 not in (0, 2)],
        ),
        ({"sender": "<>"}, []),
        ({"recipient": "", "q": " "}, list(range(MESSAGES))),  # empty means absent
    ],
    ids=lambda value: str(value)[:60],
)
async def test_message_filters(
    reports: Reports, params: dict[str, str], expected: list[int]
) -> None:
    status, body, _ = await reports.get("/api/messages", limit="500", **params)
    assert status == 200, body
    assert [item["tracking_id"] for item in body["items"]] == [token(i) for i in reversed(expected)]


async def test_opened_counts_only_human_and_mail_proxy(reports: Reports) -> None:
    _, body, _ = await reports.get("/api/messages", q=token(2))
    (item,) = body["items"]  # message 2: one open by privacy_proxy
    assert (item["opened"], item["open_count"], item["counted_open_count"]) == (False, 1, 0)
    assert item["first_open_at"] is None
    _, body, _ = await reports.get("/api/messages", q=token(4))
    (item,) = body["items"]  # message 4: one open by mail_proxy
    assert (item["opened"], item["open_count"], item["counted_open_count"]) == (True, 1, 1)
    assert item["first_open_at"] == "2024-05-01T12:05:00.000000Z"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"cursor": "garbage"}, "cursor"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2024-05-02", "until": "2024-05-01"}, "since"),
        ({"opened": "maybe"}, "opened"),
        ({"tracked": "1"}, "tracked"),
        ({"sender_name": "x"}, "unknown parameter"),
        ({"q": "x" * 1001}, "q"),
    ],
)
async def test_bad_parameters_are_400_with_a_json_error(
    reports: Reports, params: dict[str, str], message: str
) -> None:
    status, body, response = await reports.get("/api/messages", **params)
    assert status == 400
    assert response.content_type == "application/json"
    assert message in body["error"]


async def test_tampered_or_foreign_cursor_is_400(reports: Reports) -> None:
    _, body, _ = await reports.get("/api/messages", limit="10")
    cursor = body["next_cursor"]
    tampered = cursor[:5] + ("B" if cursor[5] == "A" else "A") + cursor[6:]
    status, body, _ = await reports.get("/api/messages", limit="10", cursor=tampered)
    assert (status, body["error"]) == (400, "cursor does not belong to these filters")
    status, _, _ = await reports.get("/api/messages", limit="10", cursor=cursor, opened="true")
    assert status == 400
    status, body, _ = await reports.get("/api/messages", limit="10", cursor=cursor)
    assert status == 200
    assert body["items"][0]["tracking_id"] == token(MESSAGES - 11)


# -- /api/messages/{id} ---------------------------------------------------------------------


async def test_one_message_with_its_opens_and_clicks(reports: Reports) -> None:
    status, body, _ = await reports.get(f"/api/messages/{token(1)}")
    assert status == 200
    assert body["tracking_id"] == token(1)
    assert body["upstream_reply"] == "250 2.0.0 Ok"
    assert body["opens"] == [
        {
            "at": "2024-05-01T10:00:00.000000Z",
            "ip": None,
            "user_agent": "human",
            "verdict": "human",
            "verdict_reason": "test:human",
            "counted": True,
        }
    ]
    assert body["clicks"] == [
        {
            "at": "2024-05-01T11:00:00.000000Z",
            "url": "https://example.com/?a=1&b=2",
            "ip": "192.0.2.0/24",
            "user_agent": "human",
            "verdict": "human",
            "verdict_reason": "test:human",
            "counted": True,
        }
    ]
    for ident in ("Q000001", "<m1@example.com>", "m1@example.com"):
        status, found, _ = await reports.get(f"/api/messages/{ident}")
        assert (status, found["tracking_id"]) == (200, token(1))


async def test_unknown_message_is_404_json(reports: Reports) -> None:
    status, body, response = await reports.get("/api/messages/no-such-message")
    assert status == 404
    assert response.content_type == "application/json"
    assert body == {"error": "Not Found"}


# -- /api/stats -----------------------------------------------------------------------------


async def test_stats_by_day(reports: Reports) -> None:
    status, body, _ = await reports.get("/api/stats", since="2024-05-01", until="2024-05-02")
    assert status == 200
    assert (body["group"], body["since"], body["until"]) == ("day", "2024-05-01", "2024-05-02")
    first, second = body["rows"]
    # day 1: messages 0..15 (08:00-23:00); untracked: 3, 7, 11, 15
    assert first["key"] == "2024-05-01"
    assert (first["relayed"], first["tracked"]) == (16, 12)
    # even ones opened: 0 human, 2 privacy, 4 mail, 6 scanner, 8 unknown, 10 human, 12 privacy,
    # 14 mail; plus #1 by a human
    assert first["opens_by_verdict"] == {
        "human": 3,
        "privacy_proxy": 2,
        "mail_proxy": 2,
        "scanner": 1,
        "unknown": 1,
    }
    assert (first["opens"], first["opened_any"], first["opened"]) == (9, 9, 5)
    assert first["open_rate"] == pytest.approx(5 / 12)
    assert (first["clicks"], first["clicked"]) == (1, 1)
    assert second["key"] == "2024-05-02"
    assert second["relayed"] == 24
    total = body["total"]
    assert total["relayed"] == 40
    assert total["opened"] == first["opened"] + second["opened"]
    assert total["open_rate"] == pytest.approx(total["opened"] / total["tracked"])


async def test_stats_by_sender_domain(reports: Reports) -> None:
    status, body, _ = await reports.get("/api/stats", group="sender_domain")
    assert status == 200
    rows = {row["key"]: row for row in body["rows"]}
    assert set(rows) == {"example.com", "example.org"}
    assert rows["example.com"]["relayed"] == rows["example.org"]["relayed"] == MESSAGES // 2
    # only even (example.com) messages were opened through the pixel, #1 aside
    assert rows["example.org"]["opened"] == 1
    assert body["total"]["relayed"] == MESSAGES


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"group": "week"}, "group"),
        ({"since": "2024-05-01T00:00:00Z"}, "since"),
        ({"since": "2024-05-03", "until": "2024-05-01"}, "since"),
        ({"day": "2024-05-01"}, "unknown parameter"),
    ],
)
async def test_stats_bad_parameters(reports: Reports, params: dict[str, str], message: str) -> None:
    status, body, _ = await reports.get("/api/stats", **params)
    assert status == 400
    assert message in body["error"]


# -- /api/export.csv ------------------------------------------------------------------------


async def test_export_csv_parses_and_matches_the_list(reports: Reports) -> None:
    status, text, response = await reports.get("/api/export.csv", sender_domain="example.com")
    assert status == 200
    assert response.content_type == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    records = [dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows[1:]]
    assert [r["tracking_id"] for r in records] == [
        token(i) for i in reversed(range(0, MESSAGES, 2))
    ]
    by_id = {r["tracking_id"]: r for r in records}
    assert by_id[token(4)]["opened"] == "true"
    assert by_id[token(4)]["recipients"] == "user4@dest.test"
    assert by_id[token(4)]["relayed_at"] == "2024-05-01T12:00:00.000000Z"


async def test_export_csv_streams_more_than_a_page_and_defuses_formulas(
    reports: Reports,
) -> None:
    # 130 rows is less than one 500-row page; check the page loop with filters
    # that select everything, and that cells starting like a formula are quoted
    status, text, _ = await reports.get("/api/export.csv")
    assert status == 200
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert len(rows) == MESSAGES + 1
    message_ids = {row[CSV_COLUMNS.index("message_id")] for row in rows[1:]}
    assert "'=2+3@formula.test" in message_ids
    assert "=2+3@formula.test" not in message_ids


async def test_export_csv_bad_filter_is_400(reports: Reports) -> None:
    status, body, _ = await reports.get("/api/export.csv", opened="yes")
    assert status == 400
    assert "opened" in body["error"]


# -- /api/openapi.json ----------------------------------------------------------------------


async def test_openapi_document_is_valid_and_lists_every_route(reports: Reports) -> None:
    from openapi_spec_validator import validate

    status, document, _ = await reports.get("/api/openapi.json")
    assert status == 200
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/api/messages",
        "/api/messages/{id}",
        "/api/stats",
        "/api/export.csv",
        "/api/openapi.json",
    }
    listed = {p["name"] for p in document["paths"]["/api/messages"]["get"]["parameters"]}
    assert listed == {
        "sender",
        "sender_domain",
        "recipient",
        "q",
        "since",
        "until",
        "opened",
        "tracked",
        "limit",
        "cursor",
    }


# -- listeners apart ------------------------------------------------------------------------


async def test_pixel_listener_serves_no_reports_route(reports: Reports) -> None:
    for path in API_ROUTES:
        async with reports.session.get(reports.pixel_base + path, headers=reports.auth()) as r:
            assert r.status == 404, path
            assert "tracking_id" not in await r.text()
    for path in ("/", "/login", "/messages"):
        async with reports.session.get(reports.pixel_base + path, allow_redirects=False) as r:
            assert r.status == 404, path


async def test_reports_listener_serves_no_pixel(reports: Reports) -> None:
    url = f"{reports.base}/o/{token(5)}.gif"
    async with reports.session.get(url, headers=reports.auth(), allow_redirects=False) as r:
        assert r.content_type != "image/gif"
        assert r.status in (303, 404)  # the dashboard's login redirect, or not found
    async with reports.session.get(url.replace("/o/", "/api/o/"), headers=reports.auth()) as r:
        assert r.status == 404
    _, body, _ = await reports.get(f"/api/messages/{token(5)}")
    assert body["opens"] == []  # nothing was recorded
    async with reports.session.get(f"{reports.pixel_base}/o/{token(5)}.gif") as r:
        assert r.content_type == "image/gif"  # the same path on the pixel listener


# -- configuration --------------------------------------------------------------------------


def test_plain_http_only_on_loopback() -> None:
    for host in ("127.0.0.1:8444", "[::1]:8444", "localhost:8444"):
        config = build_config({"reports_plain_http": True, "reports_listen": host}, {}, environ={})
        assert config.reports_plain_http
    with pytest.raises(ConfigError, match="reports_plain_http"):
        build_config({"reports_plain_http": True, "reports_listen": "0.0.0.0:8444"}, {}, environ={})
    with pytest.raises(ConfigError, match="reports_plain_http"):
        build_config({"reports_plain_http": True}, {"reports_listen": "192.0.2.1:1"}, environ={})
    config = build_config({"reports_listen": "0.0.0.0:8444"}, {}, environ={})
    assert config.reports_listen.port == 8444
    assert config.reports_token_path == Path("smtp-tracker-data") / "reports-token"


# -- the app alone --------------------------------------------------------------------------


class FailingStore:
    """A reports store whose reads fail as an unreadable database does."""

    async def query_messages(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("cannot read the store: disk I/O error /secret/path")

    query_message = query_stats = query_messages


async def start_reports_app(
    app: web.Application, server_ssl_context: ssl.SSLContext
) -> tuple[web.AppRunner, str]:
    runner, port = await start_site(app, host="127.0.0.1", port=0, ssl_context=server_ssl_context)
    return runner, f"https://localhost:{port}"


async def test_export_streams_page_by_page(
    tmp_path: Path,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
) -> None:
    data_dir = tmp_path / "data"
    fill(data_dir)
    async with await SqliteStore.open(data_dir) as store:
        reads = 0
        query_messages = store.query_messages

        async def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            assert kwargs["limit"] == 7
            return await query_messages(*args, **kwargs)

        store.query_messages = counting  # type: ignore[method-assign]
        app = make_reports_app(store=store, auth_middleware=None, export_page_rows=7)
        runner, base = await start_reports_app(app, server_ssl_context)
        try:
            connector = aiohttp.TCPConnector(ssl=client_ssl_context)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(base + "/api/export.csv", params={"tracked": "true"}) as r,
            ):
                assert r.status == 200
                assert "Content-Length" not in r.headers  # streamed (chunked)
                text = await r.text()
        finally:
            await runner.cleanup()
    rows = list(csv.reader(io.StringIO(text, newline="")))
    expected = [token(i) for i in reversed(range(MESSAGES)) if i % 4 != 3]
    assert [row[CSV_COLUMNS.index("tracking_id")] for row in rows[1:]] == expected
    assert reads == -(-len(expected) // 7)  # one read per page of 7


async def test_store_failure_is_503_without_details(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_reports_app(store=FailingStore(), auth_middleware=None)
    runner, base = await start_reports_app(app, server_ssl_context)
    try:
        connector = aiohttp.TCPConnector(ssl=client_ssl_context)
        async with aiohttp.ClientSession(connector=connector) as session:
            for path in ("/api/messages", "/api/messages/x", "/api/stats", "/api/export.csv"):
                async with session.get(base + path) as r:
                    assert r.status == 503, path
                    body = await r.json()
                    assert body == {"error": "the tracking store cannot be read"}
                    assert r.headers["Cache-Control"] == "no-store"
    finally:
        await runner.cleanup()
    assert "disk I/O error" in caplog.text  # logged for the admin, not sent
