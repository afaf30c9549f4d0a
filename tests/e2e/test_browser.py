"""A real headless Chromium uses the dashboard, as a new user would.

``smtp-tracker serve`` runs as a process with tracking, the pixel endpoint and
the reports listener (HTTPS, the session's trustme certificate); swaks relays
an HTML message through it to the upstream test server; the pixel in the
message the upstream received is fetched over verified HTTPS (a Thunderbird
and an Apple-MPP-like User-Agent); ``smtp-tracker user add`` adds a user.
Then Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright for
Python; no browser is downloaded) logs in, searches the message by its
Message-ID, opens its page and sees its opens with their verdicts, and sees
the overview's SVG chart.  Screenshots at laptop (1280x800) and phone (390x844)
sizes go to ``tests/artifacts/browser/`` (or ``$SMTP_TRACKER_ARTIFACTS/browser``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import shutil
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.certificates import CertificateFiles
from tests.support.process import Running
from tests.support.serve import launch_serve
from tests.support.waiting import wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MESSAGE_ID = "<browser-test-1@example.org>"
USER = "admin"
PASSWORD = "a long test password"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is missing (apt-get install chromium): the browser test needs it",
    ),
    pytest.mark.timeout(300),
]


def artifacts_dir() -> Path:
    """Where screenshots go: ``$SMTP_TRACKER_ARTIFACTS/browser``, or ``tests/artifacts/browser``."""
    base = os.environ.get("SMTP_TRACKER_ARTIFACTS")
    root = Path(base) if base else Path(__file__).resolve().parents[1] / "artifacts"
    directory = root / "browser"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def spki_sha256(cert_pem: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the leaf, for Chromium's SPKI allow-list."""
    leaf = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def listening_port(running: Running, what: str) -> int:
    """The port serve's log says the *what* (``pixel``, ``reports``) listener is bound to."""
    pattern = re.compile(rf"listening for HTTPS \({what}\) on 127\.0\.0\.1:(\d+)")

    def port() -> int | None:
        for line in running.log:
            if match := pattern.search(line):
                return int(match.group(1))
        return None

    return await wait_until(port, timeout_s=20, message=f"serve's {what} listener did not start")


async def run(*args: str, stdin: bytes = b"") -> str:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    assert process.returncode == 0, out.decode()
    return out.decode()


@pytest.fixture
async def served(
    upstream: Any, certificate_files: CertificateFiles, tmp_path: Path
) -> AsyncIterator[tuple[Running, Path]]:
    data_dir = tmp_path / "data"
    running = await launch_serve(
        upstream,
        certificate_files.ca,
        data_dir,
        "--tracking",
        "--pixel",
        "--pixel-listen",
        "127.0.0.1:0",
        "--reports",
        "--reports-listen",
        "127.0.0.1:0",
        "--tls-cert",
        str(certificate_files.cert),
        "--tls-key",
        str(certificate_files.key),
        "--prefetch-window-s",
        "0.001",  # our own fetches below come later than that: not prefetches
    )
    yield running, data_dir
    await running.finish()


async def relay_html_message(smtp_port: int) -> None:
    body = (
        "<html><head><title>Hello</title></head><body>"
        "<p>Hello Bob, the <b>November report</b> is attached.</p></body></html>"
    )
    args = [
        "--server", f"127.0.0.1:{smtp_port}",
        "--from", "alice@example.org",
        "--to", "bob@example.net",
        "--helo", "postfix.test",
        "--header", "Subject: November report",
        "--header", f"Message-Id: {MESSAGE_ID}",  # swaks' own spelling: replaces its id
        "--add-header", "MIME-Version: 1.0",
        "--add-header", "Content-Type: text/html; charset=utf-8",
        "--body", body,
    ]  # fmt: skip
    swaks = shutil.which("swaks")
    if swaks is not None:
        await run(swaks, *args)
        return
    import aiosmtplib  # no swaks here: the same message from Python's SMTP client

    message = (
        f"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: November report\r\n"
        f"Message-ID: {MESSAGE_ID}\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/html; charset=utf-8\r\n\r\n{body}\r\n"
    )
    await aiosmtplib.send(
        message.encode(),
        sender="alice@example.org",
        recipients=["bob@example.net"],
        hostname="127.0.0.1",
        port=smtp_port,
        start_tls=False,
    )


async def test_a_browser_logs_in_finds_the_message_and_sees_its_open(
    served: tuple[Running, Path],
    upstream: Any,
    certificate_files: CertificateFiles,
    client_ssl_context: ssl.SSLContext,
) -> None:
    from playwright.async_api import async_playwright, expect

    running, data_dir = served
    pixel_port = await listening_port(running, "pixel")
    reports_port = await listening_port(running, "reports")

    # 1. relay an HTML message; the upstream gets it with the pixel
    await relay_html_message(running.port)
    [transaction] = await upstream.wait_for_transactions(1)
    assert f"Message-Id: {MESSAGE_ID}".encode() in transaction.data
    match = re.search(rb'<img src="https://[^/"]+/o/([A-Za-z0-9_-]+)\.gif"', transaction.data)
    assert match, transaction.data.decode(errors="replace")
    tracking_id = match.group(1).decode()

    # 2. the recipient opens it (Thunderbird), and Apple's privacy proxy fetches it too
    connector = aiohttp.TCPConnector(ssl=client_ssl_context)
    async with aiohttp.ClientSession(connector=connector) as http:
        for agent in (
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Thunderbird/128.4.0",
            "Mozilla/5.0",
        ):
            async with http.get(
                f"https://localhost:{pixel_port}/o/{tracking_id}.gif",
                headers={"User-Agent": agent},
            ) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "image/gif"

    # 3. a user, added with the real command (password on standard input)
    out = await run(
        sys.executable, "-m", "smtp_tracker", "user", "add", USER, "--password-stdin",
        "--data-dir", str(data_dir), stdin=f"{PASSWORD}\n".encode(),
    )  # fmt: skip
    assert f"added user {USER}" in out
    assert (data_dir / "reports-users.json").stat().st_mode & 0o777 == 0o600

    # 4. Chromium
    shots = artifacts_dir()
    base = f"https://localhost:{reports_port}"
    args = [
        *CHROMIUM_ARGS,
        f"--ignore-certificate-errors-spki-list={spki_sha256(certificate_files.cert)}",
    ]
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(data_dir.parent / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=args,
            viewport=LAPTOP,
            locale="en-GB",
            timezone_id="UTC",
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.set_default_timeout(20_000)

            # not signed in: the overview sends us to the login
            await page.goto(base + "/")
            await expect(page).to_have_url(re.compile(r"/login"))
            await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
            await page.screenshot(path=str(shots / "login-laptop.png"), full_page=True)

            await page.get_by_label("User name").fill(USER)
            await page.get_by_label("Password").fill(PASSWORD)
            await page.get_by_role("button", name="Log in").click()
            await expect(page).to_have_url(base + "/")
            await expect(page.get_by_text(f"Signed in as {USER}")).to_be_visible()
            cookies = {c["name"]: c for c in await context.cookies(base)}
            session = cookies["__Host-smtp-tracker-session"]
            assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"

            # the overview: an SVG chart with a bar for today's opens
            chart = page.locator("svg.chart__bars")
            await expect(chart).to_be_visible()
            assert await chart.locator("rect.bar--human").count() == 1
            assert await chart.locator("rect.bar--privacy_proxy").count() == 1
            await expect(page.locator(".tiles")).to_contain_text("Open rate")
            await expect(page.locator("table.domains")).to_contain_text("example.org")
            await page.screenshot(path=str(shots / "overview-laptop.png"), full_page=True)

            # search the message by its Message-ID
            await page.get_by_role("link", name="Messages").click()
            await page.get_by_label("Message-ID, queue id or tracking id").fill(MESSAGE_ID)
            await page.get_by_role("button", name="Search").click()
            rows = page.locator("table.messages tbody tr")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_contain_text("opened")
            await page.screenshot(path=str(shots / "messages-laptop.png"), full_page=True)

            # its page: the open timeline, with verdicts and reasons
            await rows.first.get_by_role("link", name=MESSAGE_ID).click()
            await expect(page).to_have_url(f"{base}/messages/{tracking_id}")
            await expect(page.get_by_role("heading", level=1)).to_have_text(MESSAGE_ID)
            timeline = page.locator("section[aria-labelledby=opens-heading] table tbody tr")
            await expect(timeline).to_have_count(2)
            await expect(timeline.nth(0)).to_contain_text("Human")
            await expect(timeline.nth(0)).to_contain_text("Thunderbird/128.4.0")
            await expect(timeline.nth(1)).to_contain_text("Privacy proxy")
            await expect(page.locator(".status-line")).to_contain_text("opened")
            await page.screenshot(path=str(shots / "message-laptop.png"), full_page=True)

            # the same pages on a phone: nothing wider than the screen
            await page.set_viewport_size(PHONE)
            for name, path in (
                ("message", f"/messages/{tracking_id}"),
                ("messages", f"/messages?q={MESSAGE_ID}"),
                ("overview", "/"),
            ):
                await page.goto(base + path)
                width = await page.evaluate("document.documentElement.scrollWidth")
                assert width <= PHONE["width"], (name, width)
                await page.screenshot(path=str(shots / f"{name}-phone.png"), full_page=True)

            # log out: back to the login, and the pages are closed again
            await page.get_by_role("button", name="Log out").click()
            await expect(page).to_have_url(re.compile(r"/login$"))
            await page.goto(base + "/messages")
            await expect(page).to_have_url(re.compile(r"/login\?next="))
        finally:
            await context.close()


async def test_login_over_plain_http_on_loopback(tmp_path: Path) -> None:
    """``reports_plain_http`` (loopback only): the ``Secure`` ``__Host-`` cookie still works,
    because browsers treat loopback origins as secure."""
    from playwright.async_api import async_playwright, expect

    from smtp_tracker.store import SqliteStore
    from smtp_tracker.web.reports.app import build_reports_app
    from smtp_tracker.web.reports.users import UserDirectory, add_user
    from smtp_tracker.web.site import start_site

    add_user(tmp_path / "users.json", USER, PASSWORD)
    async with await SqliteStore.open(tmp_path / "data") as store:
        users = await UserDirectory.open(tmp_path / "users.json")
        app = build_reports_app(store=store, token="t" * 40, users=users, session_s=600)
        runner, port = await start_site(app, host="127.0.0.1", port=0, ssl_context=None)
        try:
            async with async_playwright() as playwright:
                context = await playwright.chromium.launch_persistent_context(
                    str(tmp_path / "chromium-profile"),
                    executable_path=str(CHROMIUM),
                    headless=True,
                    args=CHROMIUM_ARGS,
                )
                try:
                    page = await context.new_page()
                    page.set_default_timeout(20_000)
                    for host in ("localhost", "127.0.0.1"):
                        await page.goto(f"http://{host}:{port}/messages")
                        await page.get_by_label("User name").fill(USER)
                        await page.get_by_label("Password").fill(PASSWORD)
                        await page.get_by_role("button", name="Log in").click()
                        await expect(page).to_have_url(f"http://{host}:{port}/messages")
                        await expect(page.get_by_role("heading", level=1)).to_have_text("Messages")
                finally:
                    await context.close()
        finally:
            await runner.cleanup()
