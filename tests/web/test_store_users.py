"""The dashboard's users in a PostgreSQL store (issue 14): ``smtp-tracker user ... --store``
as a real process, and reports apps on one store that follow it without a restart.

Real PostgreSQL (the session's cluster; the outage test has a cluster of its own, which
it stops and starts), the reports app as ``serve`` builds it, over HTTPS, and a
browser-like client.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from smtp_tracker.store.postgresql import PostgresStore
from smtp_tracker.web.reports.app import build_reports_app
from smtp_tracker.web.reports.users import UserDirectory
from smtp_tracker.web.site import start_site
from tests.support.postgres import pg_cluster, pg_dsn

from .dashboard_support import API_TOKEN, ReportsServer, login, runners
from .web_helpers import wait_until

__all__ = ["pg_cluster", "pg_dsn", "runners"]

psycopg = pytest.importorskip("psycopg")

PASSWORD = "a long enough password"


def user_cli(
    dsn: str, *args: str, stdin: str = "", data_dir: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "smtp_tracker",
            "user",
            *args,
            "--store",
            dsn,
            "--data-dir",
            str(data_dir),
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT name, password_hash FROM dashboard_users ORDER BY name"
        ).fetchall()


def test_add_list_replace_remove_in_the_store(pg_dsn: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    listed = user_cli(pg_dsn, "list", data_dir=data_dir)  # a database without a store
    assert listed.returncode == 1
    assert listed.stderr.startswith("smtp-tracker: error: no tracking store in ")
    assert "--store" in listed.stderr

    added = user_cli(
        pg_dsn, "add", "alice", "--password-stdin", stdin=PASSWORD + "\n", data_dir=data_dir
    )
    assert added.returncode == 0, added.stderr  # made the store, as serve would
    assert added.stdout == f"added user alice in {pg_dsn}\n"
    [(name, encoded)] = _rows(pg_dsn)
    assert name == "alice" and encoded.startswith("$argon2id$")
    assert not (data_dir / "reports-users.json").exists()  # the store, not the file

    again = user_cli(
        pg_dsn, "add", "alice", "--password-stdin", stdin=PASSWORD + "\n", data_dir=data_dir
    )
    assert again.returncode == 1
    assert (
        again.stderr
        == "smtp-tracker: error: user 'alice' exists; add --replace to set a new password\n"
    )
    assert _rows(pg_dsn) == [("alice", encoded)]

    replaced = user_cli(
        pg_dsn,
        "add",
        "alice",
        "--replace",
        "--password-stdin",
        stdin="another password 2\n",
        data_dir=data_dir,
    )
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stdout == f"changed the password of user alice in {pg_dsn}\n"
    [(_, changed)] = _rows(pg_dsn)
    assert changed != encoded and changed.startswith("$argon2id$")

    short = user_cli(pg_dsn, "add", "bob", "--password-stdin", stdin="short\n", data_dir=data_dir)
    assert short.returncode == 1 and "at least 10 characters" in short.stderr
    assert (
        user_cli(
            pg_dsn, "add", "bob", "--password-stdin", stdin=PASSWORD, data_dir=data_dir
        ).returncode
        == 0
    )
    listed = user_cli(pg_dsn, "list", data_dir=data_dir)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["alice", "bob"]
    assert all("\tadded 20" in line for line in listed.stdout.splitlines())

    removed = user_cli(pg_dsn, "remove", "alice", data_dir=data_dir)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == (
        f"removed user alice from {pg_dsn}; their sessions end at their next request\n"
    )
    assert [row[0] for row in _rows(pg_dsn)] == ["bob"]
    missing = user_cli(pg_dsn, "remove", "alice", data_dir=data_dir)
    assert missing.returncode == 1
    assert missing.stderr == f"smtp-tracker: error: no user 'alice' in {pg_dsn}\n"
    for result in (listed, removed, missing, again, short):
        assert PASSWORD not in result.stdout + result.stderr
        assert "$argon2" not in result.stdout + result.stderr


async def _start(
    store: PostgresStore,
    dsn: str,
    ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
    **options: Any,
) -> ReportsServer:
    """A reports app over *store*'s users, as ``serve`` builds it with PostgreSQL."""
    users = await UserDirectory.open_store(store, dsn, **options)
    app = build_reports_app(
        store=store,
        token=API_TOKEN,
        users=users,
        session_s=3600.0,
        login_failures_per_min=50,
        trusted_proxies=(),
    )
    runner, port = await start_site(app, host="127.0.0.1", port=0, ssl_context=ssl_context)
    runners.append(runner)
    return ReportsServer(app=app, port=port, users_path=Path(dsn))


@pytest.fixture
async def stores(pg_dsn: str) -> AsyncIterator[list[PostgresStore]]:
    """Two stores on one database: two reports hosts (closed after the servers stop)."""
    opened = [await PostgresStore.open(pg_dsn, timeout_s=1.0) for _ in range(2)]
    yield opened
    for store in opened:
        await store.aclose()


async def _status(browser: aiohttp.ClientSession, server: ReportsServer, path: str = "/") -> int:
    async with browser.get(server.base_url + path, allow_redirects=False) as response:
        await response.read()
        return response.status


async def test_a_user_added_on_one_host_logs_in_on_every_host_until_removed(
    pg_dsn: str,
    stores: list[PostgresStore],
    tmp_path: Path,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
) -> None:
    one = await _start(stores[0], pg_dsn, server_ssl_context, runners, recheck_s=0.0)
    two = await _start(stores[1], pg_dsn, server_ssl_context, runners)  # the default: 1 s
    data_dir = tmp_path / "data"
    added = user_cli(pg_dsn, "add", "alice", "--password-stdin", stdin=PASSWORD, data_dir=data_dir)
    assert added.returncode == 0, added.stderr

    users_two = two.app[_auth_key()].users

    async def known() -> bool:
        await users_two.refresh()
        return users_two.exists("alice")

    await wait_until(known, timeout_s=10.0, what="host two to see alice")
    browsers = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl_context), cookie_jar=aiohttp.CookieJar()
        )
        for _ in range(3)
    ]
    try:
        wrong = await login(browsers[2], one, user="alice", password=PASSWORD + "!")
        assert wrong.status == 200  # the form again, with its error
        assert "Wrong user name or password" in await wrong.text()
        for browser, server in zip(browsers, (one, two), strict=False):
            response = await login(browser, server, user="alice", password=PASSWORD)
            assert response.status == 303, response.status
            assert await _status(browser, server) == 200

        removed = user_cli(pg_dsn, "remove", "alice", data_dir=data_dir)
        assert removed.returncode == 0, removed.stderr
        assert await _status(browsers[0], one) == 303  # the session ended at once (0 s)

        async def refused() -> bool:
            return await _status(browsers[1], two) == 303

        await wait_until(refused, timeout_s=10.0, what="host two to end alice's session")
        for browser, server in zip(browsers, (one, two), strict=False):
            async with browser.get(server.base_url + "/", allow_redirects=False) as response:
                assert response.headers["Location"].startswith("/login")
            again = await login(browser, server, user="alice", password=PASSWORD)
            assert again.status == 200  # refused: the login form again
            assert "Wrong user name or password" in await again.text()
    finally:
        for browser in browsers:
            await browser.close()


def _auth_key() -> Any:
    from smtp_tracker.web.reports.auth import AUTH_KEY

    return AUTH_KEY


@pytest.mark.timeout(180)
async def test_the_store_down_refuses_logins_and_pages_and_keeps_sessions(
    own_pg_cluster: Any,
    tmp_path: Path,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
    runners: list[web.AppRunner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = own_pg_cluster.new_database()
    added = user_cli(dsn, "add", "alice", "--password-stdin", stdin=PASSWORD, data_dir=tmp_path)
    assert added.returncode == 0, added.stderr
    store = await PostgresStore.open(dsn, timeout_s=1.0)
    connector = aiohttp.TCPConnector(ssl=client_ssl_context)
    browser = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar())
    try:
        server = await _start(store, dsn, server_ssl_context, runners, recheck_s=0.0)
        assert (await login(browser, server, user="alice", password=PASSWORD)).status == 303
        assert await _status(browser, server, "/login") == 303  # signed in: sent on

        stranger = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl_context), cookie_jar=aiohttp.CookieJar()
        )
        own_pg_cluster.stop()

        async def unavailable() -> bool:
            return await _status(browser, server) == 503

        await wait_until(unavailable, timeout_s=30.0, what="pages refused with the store down")
        refused = await login(stranger, server, user="alice", password=PASSWORD)
        await stranger.close()
        assert refused.status == 503 and refused.headers["Retry-After"]
        assert "Logins are unavailable" in await refused.text()
        outage_logs = [r for r in caplog.records if "dashboard's users" in r.getMessage()]
        assert len(outage_logs) == 1  # once per outage, however many requests
        assert dsn in outage_logs[0].getMessage()
        assert "$argon2" not in caplog.text

        own_pg_cluster.start()

        async def back() -> bool:
            return await _status(browser, server) == 200

        await wait_until(back, timeout_s=30.0, what="the session to work again")
        assert "read from" in caplog.text  # the end of the outage, logged
    finally:
        await browser.close()
        for runner in reversed(runners):
            await runner.cleanup()
        runners.clear()
        await store.aclose()
