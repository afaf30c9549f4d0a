"""Findings of the security review of the reports listener, each a test that failed first.

* Path tricks (``//api``, ``/%61pi``, ``/static/..``, trailing slashes, ``;``), with
  any method, reach no route without credentials.
* A password set with ``user add --replace`` ends the sessions signed in with the old one.
* A reports token file or users file that group or others can read is warned about.
* A date the server cannot represent (``until=9999-12-31``) is a 400, not a 500 with a
  traceback in the log.
* Failed logins from IPv6 clients are counted per /64 (one host's allocation), so a
  client cannot skip the per-address limit by changing its interface identifier.
* An unknown user name costs one argon2 check with the same parameters as a known
  one's, and no hashing at login time.
* ``networks import``: a header value read from the file (a JSON ``creationTime``)
  cannot put a line break, and so a network nobody validated, into the list written.
* What a recipient controls (the User-Agent of a pixel or click fetch) and a sender's
  link are escaped on the pages, and a stored URL is never made a link there.
* Neither listener sends ``Strict-Transport-Security``: it would pin the whole host
  name (every port, RFC 6797 §8.1, §14.4), the pixel host's and ``localhost`` included.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
from datetime import timedelta
from pathlib import Path

import aiohttp
import argon2
import pytest
from aiohttp import web

from smtp_tracker.classification import import_network_list
from smtp_tracker.store import OpenEvent, SqliteStore
from smtp_tracker.store.records import ClickEvent, LinkRecord
from smtp_tracker.web import make_pixel_app, start_site
from smtp_tracker.web.reports import users as users_module
from smtp_tracker.web.reports.auth import SESSION_COOKIE, load_reports_token
from smtp_tracker.web.reports.users import UserDirectory, add_user, read_users

from .dashboard_support import (
    API_TOKEN,
    PASSWORD,
    T_DAY,
    USER,
    ReportsServer,
    browser,
    login,
    page,
    record,
    reports,
    runners,
    set_cookie_headers,
    start_reports,
    store,
)
from .web_helpers import raw_request, token

__all__ = ["browser", "reports", "runners", "store"]  # fixtures

NEW_PASSWORD = "a brand new long password"


async def _status(browser: aiohttp.ClientSession, server: ReportsServer, path: str) -> int:
    async with browser.get(server.base_url + path, allow_redirects=False) as response:
        await response.read()
        return response.status


# -- path tricks --------------------------------------------------------------------------

TRICK_PATHS = [
    "//api/messages",
    "/api//messages",
    "/%61pi/messages",
    "/API/messages",
    "/api/messages/",
    "/./api/messages",
    "/x/../api/messages",
    "/static/../api/messages",
    "/static/%2e%2e/api/messages",
    "/static/..%2f..%2fauth.py",
    "/static/%2e%2e/templates/base.html",
    "/static/",
    "/login/../messages",
    "/login/..%2fmessages",
    "/login;x",
    "/login/",
    "/messages/%2e%2e",
    "/api",
]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "POST"])
async def test_path_tricks_never_reach_a_route_without_credentials(
    reports: ReportsServer, client_ssl_context: ssl.SSLContext, method: str
) -> None:
    for path in TRICK_PATHS:
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        status, headers, body = await raw_request(
            reports.port, request, ssl_context=client_ssl_context
        )
        # refused (401, 303 to the login), or nothing there: never a page or data
        assert status in (303, 401, 403, 404, 405), (method, path, status)
        if status == 303:
            assert headers["location"].startswith("/login"), (method, path)
        assert b"tracking_id" not in body and b"{%" not in body, (method, path)


# -- sessions end when the password changes ---------------------------------------------------


async def test_a_new_password_ends_the_sessions_signed_in_with_the_old_one(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    assert (await login(browser, reports)).status == 303
    assert await _status(browser, reports, "/messages") == 200
    add_user(reports.users_path, USER, NEW_PASSWORD, replace=True)  # e.g. it leaked
    assert await _status(browser, reports, "/messages") == 303  # back to the login
    assert (await login(browser, reports)).status == 200  # the old password is refused
    response = await login(browser, reports, password=NEW_PASSWORD)
    assert response.status == 303
    assert set_cookie_headers(response, SESSION_COOKIE)
    assert await _status(browser, reports, "/messages") == 200


async def test_a_user_file_rewritten_for_another_user_keeps_the_sessions(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    assert (await login(browser, reports)).status == 303
    add_user(reports.users_path, "bob", NEW_PASSWORD)
    assert await _status(browser, reports, "/messages") == 200


# -- secret files others can read -------------------------------------------------------------


def test_a_reports_token_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "reports-token"
    path.write_text(API_TOKEN + "\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert load_reports_token(path) == API_TOKEN
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert f"chmod 600 {path}" in caplog.text
    assert API_TOKEN not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        load_reports_token(path)
    assert caplog.records == []


async def test_a_users_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "users.json"
    add_user(path, USER, PASSWORD)
    path.chmod(0o640)
    with caplog.at_level(logging.WARNING):
        await UserDirectory.open(path)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert f"chmod 600 {path}" in caplog.text
    assert "$argon2" not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        await UserDirectory.open(path)
    assert caplog.records == []


# -- dates out of range -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["until=9999-12-31", "since=0001-01-01&until=9999-12-31"],
)
async def test_a_date_beyond_what_the_server_represents_is_400_not_500(
    reports: ReportsServer,
    browser: aiohttp.ClientSession,
    query: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bearer = {"Authorization": f"Bearer {API_TOKEN}"}
    for path in ("/api/messages", "/api/export.csv"):
        async with browser.get(f"{reports.base_url}{path}?{query}", headers=bearer) as response:
            body = await response.json()
            assert response.status == 400, (path, body)
            assert "until" in body["error"]
    await login(browser, reports)
    assert await _status(browser, reports, f"/messages?{query}") == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- failed logins from IPv6 clients -------------------------------------------------------


async def test_failed_logins_from_one_ipv6_slash_64_share_one_allowance(
    store: SqliteStore,
    tmp_path: Path,
    server_ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
    browser: aiohttp.ClientSession,
) -> None:
    server = await start_reports(
        store,
        tmp_path / "users.json",
        server_ssl_context,
        runners,
        login_failures_per_min=3,
        trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")],
    )
    for attempt in range(3):  # a new user name and a new interface identifier each time
        forwarded = {"X-Forwarded-For": f"2001:db8:0:7::{attempt + 1:x}"}
        response = await login(
            browser, server, user=f"user{attempt}", password="wrong guess!", headers=forwarded
        )
        assert response.status == 200
    forwarded = {"X-Forwarded-For": "2001:db8:0:7:ffff:ffff:ffff:fffe"}
    assert (await login(browser, server, headers=forwarded)).status == 429
    # the next /64 is another client
    forwarded = {"X-Forwarded-For": "2001:db8:0:8::1"}
    assert (await login(browser, server, headers=forwarded)).status == 303


# -- user names cannot be told apart by timing ------------------------------------------------


async def test_an_unknown_user_costs_one_check_with_a_known_users_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users.json"
    add_user(path, USER, PASSWORD)
    users_module._dummy_hash.cache_clear()  # as in a freshly started process
    directory = await UserDirectory.open(path)

    def no_hashing(*args: object, **kwargs: object) -> str:
        raise AssertionError("hashing on the login path")

    checked: list[str] = []
    verify = users_module._verify

    def recording_verify(encoded: str, password: str) -> bool:
        checked.append(encoded)
        return verify(encoded, password)

    monkeypatch.setattr(argon2.PasswordHasher, "hash", no_hashing)
    monkeypatch.setattr(users_module, "_verify", recording_verify)
    assert not await directory.verify("mallory", PASSWORD)
    assert await directory.verify(USER, PASSWORD)
    known = read_users(path)[USER].password_hash
    assert len(checked) == 2
    assert argon2.extract_parameters(checked[0]) == argon2.extract_parameters(known)


# -- no HSTS ----------------------------------------------------------------------------------


async def test_neither_listener_sends_strict_transport_security(
    reports: ReportsServer,
    browser: aiohttp.ClientSession,
    store: SqliteStore,
    server_ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
) -> None:
    pixel_runner, pixel_port = await start_site(
        make_pixel_app(store=store), host="127.0.0.1", port=0, ssl_context=server_ssl_context
    )
    runners.append(pixel_runner)
    await login(browser, reports)
    urls = [
        reports.base_url + path
        for path in ("/", "/login", "/messages", "/static/style.css", "/api/messages")
    ] + [f"https://localhost:{pixel_port}{path}" for path in ("/o/x.gif", "/c/x", "/healthz")]
    for url in urls:
        async with browser.get(url, allow_redirects=False) as response:
            await response.read()
            assert "Strict-Transport-Security" not in response.headers, url


# -- networks import: the header cannot smuggle a network in ----------------------------------


@pytest.mark.parametrize("line_break", ["\n", "\r", "\u2028", "\x1c"])
def test_an_imported_lists_header_cannot_add_a_network(tmp_path: Path, line_break: str) -> None:
    source = tmp_path / "goog.json"
    created = f"2024-04-25{line_break}0.0.0.0/0"
    source.write_text(
        json.dumps({"creationTime": created, "prefixes": [{"ipv4Prefix": "192.0.2.0/24"}]})
    )
    imported = import_network_list(tmp_path / "data", "google", source)
    assert imported.count == 1
    assert "192.0.2.7" in imported
    assert "198.51.100.1" not in imported
    assert imported.date == "2024-04-25 0.0.0.0/0"  # kept, on its one line


# -- what a recipient controls is escaped --------------------------------------------------


async def test_a_recipients_user_agent_and_a_senders_link_are_escaped_on_the_pages(
    store: SqliteStore, reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    # anyone holding a pixel or click URL chooses the User-Agent stored with the event
    hostile_agent = '"><svg onload=alert(1)><script>alert(2)</script>'
    hostile_url = 'https://example.org/?"><img src=x onerror=alert(3)>'
    link_token = "L" + "h" * 22
    await store.record_message(
        record(5, links=(LinkRecord(token=link_token, url=hostile_url, position=0),))
    )
    at = T_DAY + timedelta(hours=1)
    await store.record_opens(
        [OpenEvent(tracking_id=token(5), at=at, ip="192.0.2.9", user_agent=hostile_agent)]
    )
    assert await store.record_clicks(
        [ClickEvent(link_token=link_token, at=at, ip="192.0.2.9", user_agent=hostile_agent)]
    )
    await login(browser, reports)
    async with browser.get(reports.base_url + f"/messages/{token(5)}") as response:
        assert response.status == 200
        text = await response.text()
    doc = page(text)
    assert doc.xpath("//script | //svg[@onload] | //img | //*[@onerror]") == []
    assert doc.xpath("//a[contains(@href, 'example.org')]") == []  # a stored URL is never a link
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    assert hostile_url in doc.xpath("string(//td[@data-label='Link'])")
