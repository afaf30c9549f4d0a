"""The reports app as ``serve`` builds it (API + auth + dashboard), started over HTTPS.

Shared by ``test_auth.py`` and ``test_dashboard.py``: a real store in ``tmp_path``,
a real users file (argon2 hashes), the app on 127.0.0.1 port 0 with the
session's trustme certificate, and a browser-like client that keeps cookies.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import lxml.html
import pytest
from aiohttp import web

from smtp_tracker.store import MessageRecord, OpenEvent, SqliteStore
from smtp_tracker.store.records import EventContext, Verdict
from smtp_tracker.web.reports.app import build_reports_app
from smtp_tracker.web.reports.users import UserDirectory, add_user
from smtp_tracker.web.site import start_site

from .web_helpers import token

API_TOKEN = "test-api-token-" + "x" * 32
USER = "alice"
PASSWORD = "correct horse battery staple"

#: User-Agents the test classifier maps to each verdict (see :func:`ua_classifier`).
VERDICT_UA: dict[str, str] = {
    "human": "Mozilla/5.0 (X11; Linux x86_64) Thunderbird/128.0",
    "mail_proxy": "Mozilla/5.0 (via ggpht.com GoogleImageProxy)",
    "privacy_proxy": "Mozilla/5.0 AppleMPP",
    "scanner": "Barracuda scanner",
    "unknown": "curl/8.0",
}


def ua_classifier(event: EventContext) -> tuple[Verdict, str]:
    """A stand-in classifier: the verdict named by the User-Agent (the real one is tested
    in tests/classification); its reason names the matched verdict."""
    agent = event.user_agent or ""
    for verdict, text in VERDICT_UA.items():
        if agent == text:
            return verdict, f"test:{verdict}"  # type: ignore[return-value]
    return "unknown", "test:none"


@dataclass
class ReportsServer:
    app: web.Application
    port: int
    users_path: Path

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"


async def open_store(data_dir: Path) -> SqliteStore:
    return await SqliteStore.open(data_dir, ip_policy="full", classifier=ua_classifier)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with await open_store(tmp_path / "data") as opened:
        yield opened


async def start_reports(
    store: SqliteStore,
    users_path: Path,
    ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
    *,
    session_s: float = 3600.0,
    login_failures_per_min: int = 5,
    trusted_proxies: Sequence[Any] = (),
    **limits: Any,
) -> ReportsServer:
    """The reports app built by the factory the composition root uses, started on port 0.

    :param limits: ``header_timeout_s``, ``body_timeout_s``, ``max_connections`` (of
        :func:`build_reports_app`).
    """
    if not users_path.exists():
        add_user(users_path, USER, PASSWORD)
    users = await UserDirectory.open(users_path, recheck_s=0.0)
    app = build_reports_app(
        store=store,
        token=API_TOKEN,
        users=users,
        session_s=session_s,
        login_failures_per_min=login_failures_per_min,
        trusted_proxies=trusted_proxies,
        **limits,
    )
    runner, port = await start_site(app, host="127.0.0.1", port=0, ssl_context=ssl_context)
    runners.append(runner)
    return ReportsServer(app=app, port=port, users_path=users_path)


@pytest.fixture
async def runners() -> AsyncIterator[list[web.AppRunner]]:
    started: list[web.AppRunner] = []
    yield started
    for runner in reversed(started):
        await runner.cleanup()


@pytest.fixture
async def reports(
    store: SqliteStore,
    tmp_path: Path,
    server_ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
) -> ReportsServer:
    return await start_reports(store, tmp_path / "users.json", server_ssl_context, runners)


@pytest.fixture
async def browser(client_ssl_context: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps cookies like a browser and does not follow redirects by itself."""
    connector = aiohttp.TCPConnector(ssl=client_ssl_context)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar()) as s:
        yield s


def page(text: str) -> Any:
    """The HTML document *text*, parsed by lxml."""
    return lxml.html.fromstring(text)


def form_token(html: str) -> str:
    """The ``csrf_token`` hidden field of the first form holding one."""
    values = page(html).xpath("//input[@name='csrf_token']/@value")
    assert values, "no csrf_token field in the page"
    return str(values[0])


async def login(
    client: aiohttp.ClientSession,
    server: ReportsServer,
    *,
    user: str = USER,
    password: str = PASSWORD,
    next_path: str | None = None,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    """GET the login form, POST it (with its CSRF token); the POST's response (not followed)."""
    query = {} if next_path is None else {"next": next_path}
    async with client.get(
        server.base_url + "/login", params=query, allow_redirects=False
    ) as response:
        assert response.status == 200, response.status
        html = await response.text()
    fields = {
        "csrf_token": form_token(html),
        "next": page(html).xpath("//input[@name='next']/@value")[0],
        "username": user,
        "password": password,
    }
    async with client.post(
        server.base_url + "/login", data=fields, allow_redirects=False, headers=headers
    ) as response:
        await response.read()
        return response


def set_cookie_headers(response: aiohttp.ClientResponse, name: str) -> list[str]:
    """The raw ``Set-Cookie`` values of *response* that set cookie *name*."""
    return [
        value for value in response.headers.getall("Set-Cookie", []) if value.startswith(name + "=")
    ]


def cookie_attributes(header: str) -> dict[str, str]:
    """The attributes of one ``Set-Cookie`` value, names lower-cased (flags map to '')."""
    attributes: dict[str, str] = {}
    for part in header.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        attributes[name.lower()] = value
    return attributes


T_DAY = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)


def record(i: int, *, relayed_at: datetime = T_DAY, **overrides: Any) -> MessageRecord:
    values: dict[str, Any] = {
        "tracking_id": token(i),
        "queue_id": f"Q{i:010X}",
        "message_id": f"<m{i}@example.org>",
        "sender": "alice@example.org",
        "recipients": [f"r{i}@example.net"],
        "size_bytes": 1000 + i,
        "received_at": relayed_at,
        "relayed_at": relayed_at,
        "upstream_reply": "250 2.0.0 Ok: queued as UP" + str(i),
        "tracked": True,
    }
    values.update(overrides)
    return MessageRecord(**values)


def open_hit(i: int, verdict: str, at: datetime, address: str = "192.0.2.7") -> OpenEvent:
    return OpenEvent(tracking_id=token(i), at=at, ip=address, user_agent=VERDICT_UA[verdict])


def route_paths(app: web.Application) -> list[tuple[str, str, web.AbstractResource]]:
    """(method, a concrete path, resource) for every route; ``{name}`` parts become ``x``."""
    result = []
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        path = re.sub(r"\{[^}]+\}", "x", resource.canonical)
        if path.endswith("/static"):
            path += "/style.css"
        result.append((route.method, path, resource))
    return result
