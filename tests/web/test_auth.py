"""Authentication of the reports listener over real HTTPS: tokens, logins, sessions, CSRF.

Every route the app has (enumerated from its router, so a route added later is
covered) is refused without credentials; the bearer token is compared exactly;
the login sets a ``Secure; HttpOnly; SameSite=Strict`` cookie; forms without
their CSRF token get 403; failed logins are limited; ``next`` never leaves the
site; the pixel listener serves none of it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from smtp_tracker.store import SqliteStore
from smtp_tracker.web import make_pixel_app, start_site
from smtp_tracker.web.reports.auth import (
    AUTH_KEY,
    LOGIN_CSRF_COOKIE,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    FailureLimiter,
    SessionStore,
    load_reports_token,
    safe_next,
)
from smtp_tracker.web.reports.users import add_user, remove_user

from .dashboard_support import (
    API_TOKEN,
    PASSWORD,
    USER,
    ReportsServer,
    browser,
    cookie_attributes,
    form_token,
    login,
    page,
    reports,
    route_paths,
    runners,
    set_cookie_headers,
    start_reports,
    store,
)

__all__ = ["browser", "reports", "runners", "store"]  # fixtures

#: The only routes anyone may reach without credentials.
PUBLIC_PATHS = {"/login", "/static/style.css"}


# -- no credentials -----------------------------------------------------------------------


async def test_every_route_refuses_requests_without_credentials(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    routes = route_paths(reports.app)
    paths = {path for _, path, _ in routes}
    # the app has the API, the pages and the login: enumerating found them
    assert {"/api/messages", "/api/stats", "/", "/messages", "/messages/x", "/logout"} <= paths
    public = reports.app[AUTH_KEY].public
    assert {path for _, path, resource in routes if resource in public} == PUBLIC_PATHS
    checked = 0
    for method, path, _ in routes:
        if path in PUBLIC_PATHS:
            continue
        async with browser.request(
            method, reports.base_url + path, allow_redirects=False
        ) as response:
            body = await response.read()
            if path.startswith("/api/"):
                assert response.status == 401, (method, path)
                assert response.headers["WWW-Authenticate"].startswith("Bearer "), path
                if method != "HEAD":
                    assert (await response.json())["error"], path
            else:
                assert response.status == 303, (method, path)
                location = response.headers["Location"]
                assert urlsplit(location).path == "/login", (method, path, location)
                assert b"Overview" not in body and b"<table" not in body
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("path", ["/api/no-such-route", "/api", "/api/messages/x/y"])
async def test_unknown_api_paths_say_401_not_404(
    reports: ReportsServer, browser: aiohttp.ClientSession, path: str
) -> None:
    async with browser.get(reports.base_url + path, allow_redirects=False) as response:
        assert response.status == 401


async def test_unknown_page_paths_redirect_to_login_keeping_the_path(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    async with browser.get(
        reports.base_url + "/messages?q=%3Cm1%40example.org%3E", allow_redirects=False
    ) as response:
        assert response.status == 303
        location = urlsplit(response.headers["Location"])
    assert location.path == "/login"
    [target] = parse_qs(location.query)["next"]
    assert urlsplit(target).path == "/messages"
    assert parse_qs(urlsplit(target).query) == {"q": ["<m1@example.org>"]}


# -- the bearer token ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong-token",
        f"Bearer {API_TOKEN}x",
        f"Bearer {API_TOKEN[:-1]}",
        f"Basic {API_TOKEN}",
        API_TOKEN,
        "Bearer ",
        "Bearer \u00e9t\u00e9",
    ],
)
async def test_a_wrong_token_gets_401(
    reports: ReportsServer, browser: aiohttp.ClientSession, authorization: str
) -> None:
    headers = {"Authorization": authorization.encode().decode("latin-1")}
    async with browser.get(
        reports.base_url + "/api/stats", headers=headers, allow_redirects=False
    ) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="smtp-tracker')
        assert "rows" not in await response.json()


async def test_the_token_opens_the_api_and_only_the_api(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    for scheme in ("Bearer", "bearer"):
        headers = {"Authorization": f"{scheme} {API_TOKEN}"}
        async with browser.get(reports.base_url + "/api/stats", headers=headers) as response:
            assert response.status == 200
            assert "rows" in await response.json()
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with browser.get(
        reports.base_url + "/messages", headers=headers, allow_redirects=False
    ) as response:
        assert response.status == 303  # the pages want a login, not the token


async def test_a_session_cookie_does_not_open_the_api(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    assert (await login(browser, reports)).status == 303
    async with browser.get(reports.base_url + "/api/stats") as response:
        assert response.status == 401


def test_load_reports_token_reads_the_file_and_refuses_weak_ones(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_text(API_TOKEN + "\n")
    assert load_reports_token(good) == API_TOKEN
    from smtp_tracker.errors import StartupError

    for text in ("", "short", "has a space in it and is long enough to pass the length"):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(StartupError, match="reports_token_file"):
            load_reports_token(bad)
    with pytest.raises(StartupError, match="cannot read"):
        load_reports_token(tmp_path / "missing")


# -- login and the session cookie ---------------------------------------------------------


async def test_login_sets_a_secure_httponly_samesite_strict_session_cookie(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    response = await login(browser, reports)
    assert response.status == 303
    assert response.headers["Location"] == "/"
    [header] = set_cookie_headers(response, SESSION_COOKIE)
    attributes = cookie_attributes(header)
    assert "secure" in attributes
    assert "httponly" in attributes
    assert attributes["samesite"] == "Strict"
    assert attributes["path"] == "/"
    assert "domain" not in attributes  # __Host- prefix: this host only
    value = header.split(";")[0].partition("=")[2]
    assert len(value) >= 43  # 32 random bytes, base64url
    async with browser.get(reports.base_url + "/", allow_redirects=False) as home:
        assert home.status == 200
        assert f"Signed in as <strong>{USER}</strong>" in await home.text()


async def test_the_login_form_cookie_has_the_same_flags(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    async with browser.get(reports.base_url + "/login") as response:
        [header] = set_cookie_headers(response, LOGIN_CSRF_COOKIE)
        html = await response.text()
    attributes = cookie_attributes(header)
    assert {"secure", "httponly"} <= set(attributes)
    assert attributes["samesite"] == "Strict"
    # every input has a label
    document = page(html)
    for field in document.xpath("//input[not(@type='hidden')]"):
        assert document.xpath(f"//label[@for='{field.get('id')}']"), field.get("name")


async def test_a_wrong_password_or_user_sets_no_session(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    for user, password in ((USER, "wrong password!"), ("mallory", PASSWORD), (USER, "")):
        response = await login(browser, reports, user=user, password=password)
        assert response.status == 200
        assert not set_cookie_headers(response, SESSION_COOKIE)
    async with browser.get(reports.base_url + "/", allow_redirects=False) as home:
        assert home.status == 303


async def test_logins_are_logged_for_fail2ban_without_the_password(
    reports: ReportsServer, browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtp_tracker.web.reports.auth")
    await login(browser, reports, user="mal\nlory\u00e9", password="guess-1234")
    await login(browser, reports)
    lines = [record.getMessage() for record in caplog.records]
    assert "reports: login failed for user=mal\\x0alory\\xe9 from [127.0.0.1]" in lines
    assert f"reports: user={USER} logged in from [127.0.0.1]" in lines
    assert not any("guess-1234" in line or PASSWORD in line for line in lines)


async def test_logout_ends_the_session_on_the_server(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    await login(browser, reports)
    cookie = browser.cookie_jar.filter_cookies(URL(reports.base_url))[SESSION_COOKIE].value
    async with browser.get(reports.base_url + "/messages") as response:
        token = form_token(await response.text())
    async with browser.post(
        reports.base_url + "/logout", data={"csrf_token": token}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/login"
    # the old cookie, replayed, opens nothing
    async with browser.get(
        reports.base_url + "/",
        headers={"Cookie": f"{SESSION_COOKIE}={cookie}"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303


async def test_a_removed_user_is_signed_out(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    await login(browser, reports)
    async with browser.get(reports.base_url + "/", allow_redirects=False) as response:
        assert response.status == 200
    remove_user(reports.users_path, USER)
    async with browser.get(reports.base_url + "/", allow_redirects=False) as response:
        assert response.status == 303


async def test_a_user_added_while_running_can_log_in(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    add_user(reports.users_path, "bob", "another long password")
    response = await login(browser, reports, user="bob", password="another long password")
    assert response.status == 303
    assert set_cookie_headers(response, SESSION_COOKIE)


def test_sessions_expire_and_stay_bounded() -> None:
    now = [1000.0]
    sessions = SessionStore(lifetime_s=60, max_sessions=3, clock=lambda: now[0])
    token, session = sessions.create("alice")
    assert sessions.get(token) is not None
    assert sessions.get(token + "x") is None
    now[0] += 59.9
    assert sessions.get(token) is not None
    now[0] += 0.2
    assert sessions.get(token) is None
    tokens = [sessions.create(f"u{i}")[0] for i in range(5)]
    assert len(sessions) == 3
    assert sessions.get(tokens[0]) is None and sessions.get(tokens[-1]) is not None
    assert session.csrf_token != token


# -- CSRF ---------------------------------------------------------------------------------


async def test_login_without_or_with_a_wrong_csrf_token_is_403(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    async with browser.get(reports.base_url + "/login") as response:
        token = form_token(await response.text())
    credentials = {"username": USER, "password": PASSWORD}
    for extra in ({}, {"csrf_token": ""}, {"csrf_token": token + "x"}):
        async with browser.post(
            reports.base_url + "/login", data={**credentials, **extra}, allow_redirects=False
        ) as response:
            assert response.status == 403, extra
            assert not set_cookie_headers(response, SESSION_COOKIE)
    # the right field but no cookie (another site's form): 403 too
    browser.cookie_jar.clear()
    async with browser.post(
        reports.base_url + "/login",
        data={**credentials, "csrf_token": token},
        allow_redirects=False,
    ) as response:
        assert response.status == 403


async def test_logout_without_or_with_a_wrong_csrf_token_is_403(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    await login(browser, reports)
    async with browser.get(reports.base_url + "/") as response:
        token = form_token(await response.text())
    for data in ({}, {"csrf_token": "x" * 43}, {"csrf_token": token[:-1]}):
        async with browser.post(
            reports.base_url + "/logout", data=data, allow_redirects=False
        ) as response:
            assert response.status == 403, data
    async with browser.get(reports.base_url + "/", allow_redirects=False) as response:
        assert response.status == 200  # still signed in


async def test_every_state_changing_request_to_a_page_needs_the_csrf_token(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    """Not only logout: any non-GET request with a session is refused without the token."""
    await login(browser, reports)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/", "/messages", "/messages/x"):
            async with browser.request(
                method, reports.base_url + path, allow_redirects=False
            ) as response:
                assert response.status == 403, (method, path)


# -- failed logins --------------------------------------------------------------------------


async def test_failed_logins_are_limited_per_address(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    for attempt in range(5):
        response = await login(browser, reports, user=f"user{attempt}", password="wrong guess!")
        assert response.status == 200
    response = await login(browser, reports)  # even the right password now waits
    assert response.status == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert not set_cookie_headers(response, SESSION_COOKIE)


async def test_failed_logins_are_limited_per_user_name_across_addresses(
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
    for attempt in range(3):
        forwarded = {"X-Forwarded-For": f"198.51.100.{attempt}"}
        response = await login(browser, server, password="wrong guess!", headers=forwarded)
        assert response.status == 200
    response = await login(browser, server, headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.status == 429
    # another user from a fresh address is not held up
    add_user(server.users_path, "bob", "another long password")
    response = await login(
        browser,
        server,
        user="bob",
        password="another long password",
        headers={"X-Forwarded-For": "203.0.113.10"},
    )
    assert response.status == 303


def test_the_failure_limiter_forgets_after_its_window_and_stays_bounded() -> None:
    now = [0.0]
    limiter = FailureLimiter(max_failures=2, window_s=60, max_keys=100, clock=lambda: now[0])
    limiter.record("a")
    assert limiter.retry_after_s("a") == 0
    now[0] = 10
    limiter.record("a")
    assert limiter.retry_after_s("a") == pytest.approx(50)
    now[0] = 30
    assert limiter.retry_after_s("a") == pytest.approx(30)
    now[0] = 60.5  # the failure at 0 left the window
    assert limiter.retry_after_s("a") == 0
    limiter.record("a")
    assert limiter.retry_after_s("a") == pytest.approx(9.5)  # until the one at 10 leaves
    now[0] = 70.5
    assert limiter.retry_after_s("a") == 0
    for i in range(1000):
        limiter.record(f"key{i}")
    assert len(limiter) == 100


# -- redirects stay on the site -------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example",
        "//evil.example/messages",
        "/\\evil.example",
        "\\\\evil.example",
        "https://evil.example/",
        "http:evil.example",
        "javascript:alert(1)",
        "/\t/evil.example",
        "evil.example",
        "",
    ],
)
async def test_login_redirects_only_to_a_local_path(
    reports: ReportsServer, browser: aiohttp.ClientSession, target: str
) -> None:
    response = await login(browser, reports, next_path=target)
    assert response.status == 303
    assert response.headers["Location"] == "/"


async def test_login_returns_to_the_page_asked_for(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    response = await login(browser, reports, next_path="/messages?q=%3Cm1%40example.org%3E")
    assert response.headers["Location"] == "/messages?q=%3Cm1%40example.org%3E"


async def test_a_signed_in_visit_to_login_with_an_evil_next_stays_local(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    await login(browser, reports)
    async with browser.get(
        reports.base_url + "/login", params={"next": "//evil.example"}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/"


def test_safe_next_keeps_paths_and_queries() -> None:
    assert safe_next("/messages/abc?x=1&y=%2F") == "/messages/abc?x=1&y=%2F"
    assert safe_next("/%2F%2Fevil.example") == "/%2F%2Fevil.example"  # a path here
    assert safe_next("/caf\u00e9") == "/caf%C3%A9"
    assert safe_next("/" + "a" * 3000) == "/"


# -- headers on every response ------------------------------------------------------------


async def test_security_headers_on_every_response_and_never_cors(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    await login(browser, reports)
    cases = [
        ("GET", "/", {}),
        ("GET", "/messages", {}),
        ("GET", "/messages/no-such-message", {}),
        ("GET", "/no-such-page", {}),
        ("GET", "/login", {}),
        ("GET", "/static/style.css", {}),
        ("GET", "/api/stats", {}),
        ("GET", "/api/stats", {"Authorization": f"Bearer {API_TOKEN}"}),
        ("OPTIONS", "/api/stats", {"Access-Control-Request-Method": "GET"}),
        ("POST", "/logout", {}),
    ]
    for method, path, headers in cases:
        async with browser.request(
            method,
            reports.base_url + path,
            headers={"Origin": "https://evil.example", **headers},
            allow_redirects=False,
        ) as response:
            await response.read()
            for name, value in SECURITY_HEADERS.items():
                assert response.headers.get(name) == value, (path, name)
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]
            cors = [h for h in response.headers if h.lower().startswith("access-control-")]
            assert cors == [], (path, cors)
            if not path.startswith("/static/"):
                assert response.headers["Cache-Control"] == "no-store", path


# -- the two listeners serve different things ---------------------------------------------


async def test_the_pixel_listener_serves_no_reports_route(
    reports: ReportsServer,
    store: SqliteStore,
    server_ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
    browser: aiohttp.ClientSession,
) -> None:
    pixel_app = make_pixel_app(store=store)
    runner, port = await start_site(
        pixel_app, host="127.0.0.1", port=0, ssl_context=server_ssl_context
    )
    runners.append(runner)
    await login(browser, reports)  # even with a session cookie and the token
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    for _, path, _ in route_paths(reports.app):
        async with browser.get(
            f"https://localhost:{port}{path}", headers=headers, allow_redirects=False
        ) as response:
            assert response.status == 404, path
            assert b"smtp-tracker reports" not in await response.read()


async def test_a_second_login_page_load_keeps_the_first_form_valid(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    """A browser loads /login again behind the user's back (a favicon redirected there, a
    second tab): the form already on screen must still be accepted."""
    async with browser.get(reports.base_url + "/login") as response:
        first = form_token(await response.text())
    async with browser.get(reports.base_url + "/login?next=/favicon.ico") as response:
        assert form_token(await response.text()) == first
    async with browser.post(
        reports.base_url + "/login",
        data={"csrf_token": first, "next": "/", "username": USER, "password": PASSWORD},
        allow_redirects=False,
    ) as response:
        assert response.status == 303
        assert set_cookie_headers(response, SESSION_COOKIE)


async def test_failed_logins_sent_in_parallel_are_all_counted(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    """Attempts waiting for the (slow) password check count at once: a burst gets no more
    guesses than the limit."""
    async with browser.get(reports.base_url + "/login") as response:
        token = form_token(await response.text())
    fields = {"csrf_token": token, "next": "/", "username": USER}

    async def attempt(i: int) -> int:
        data = {**fields, "password": f"wrong guess {i}"}
        async with browser.post(
            reports.base_url + "/login", data=data, allow_redirects=False
        ) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(attempt(i) for i in range(12)))
    assert statuses.count(200) == 5
    assert statuses.count(429) == 7


async def test_a_successful_login_does_not_use_up_the_allowance(
    reports: ReportsServer, browser: aiohttp.ClientSession
) -> None:
    for _ in range(6):
        browser.cookie_jar.clear()  # signed out again
        assert (await login(browser, reports)).status == 303
    browser.cookie_jar.clear()
    for _ in range(4):
        assert (await login(browser, reports, password="wrong guess!")).status == 200
    assert (await login(browser, reports)).status == 303  # 4 failures + 1 success: allowed
