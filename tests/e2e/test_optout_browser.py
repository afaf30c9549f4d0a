"""A real headless Chromium objects to tracking from a message's footer, as a recipient would.

The relay (in-process, tracking on, the pixel listener over HTTPS with the
session's trustme certificate, ``disclosure_optout_link`` and a disclosure
footer file) relays an HTML message to two recipients through the upstream
test server.  Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright;
no browser is downloaded) shows the message's HTML as received, clicks the
objection link in its footer, sees the page naming both recipients (local
parts cut: one may be Bcc), and presses the button of one of them; the
confirmation follows.  The next message to that address arrives untracked
(``consent-denied``), the other recipient's still tracked.  Screenshots at
laptop and phone sizes go to ``tests/artifacts/browser/`` (or ``$SMTP_TRACKER_ARTIFACTS/browser``).
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.consent.helpers import OPTOUT, PIXEL, message_row, rows, send
from tests.support.relay import tracking_over_tls
from tests.support.upstream import UpstreamServer

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
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
FOOTER = (
    '<p style="color:#666">This message tells its sender when it is opened; '
    "see our privacy notice.</p>"
)

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is missing (apt-get install chromium): the browser test needs it",
    ),
    pytest.mark.timeout(300),
]


def artifacts_dir() -> Path:
    base = os.environ.get("SMTP_TRACKER_ARTIFACTS")
    root = Path(base) if base else Path(__file__).resolve().parents[1] / "artifacts"
    directory = root / "browser"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def spki_sha256(cert_pem: Path) -> str:
    leaf = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def html_of(data: bytes) -> str:
    message = email.message_from_bytes(data, policy=email.policy.default)
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())  # type: ignore[attr-defined]


async def test_a_recipient_objects_from_the_footer_in_chromium(
    relay_factory: Any,
    upstream: UpstreamServer,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
) -> None:
    from playwright.async_api import async_playwright, expect

    footer = tmp_path / "footer.html"
    footer.write_text(FOOTER, encoding="utf-8")
    data_dir = tmp_path / "data"
    app = await relay_factory(
        **tracking_over_tls(cert_pem_path, key_pem_path),
        disclosure_footer_file=str(footer),
        disclosure_optout_link=True,
    )
    delivered = await send(app, upstream, "browser optout", ["ivy@example.com", "jo@example.org"])
    assert PIXEL.search(delivered.data) is not None
    found = OPTOUT.search(delivered.data)
    assert found is not None
    await message_row(data_dir, "browser optout")
    shots = artifacts_dir()
    args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_sha256(cert_pem_path)}"]
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=args,
            viewport=LAPTOP,
            locale="en-GB",
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.set_default_timeout(20_000)
            # the message as received, its footer and link where the sender's mail shows them
            await page.set_content(html_of(delivered.data))
            await expect(page.get_by_text("This message tells its sender")).to_be_visible()
            link = page.get_by_role("link", name="Do not tell the sender when I open their")
            await expect(link).to_be_visible()
            await page.screenshot(path=str(shots / "optout-message-laptop.png"), full_page=True)
            await link.click()
            await expect(page).to_have_url(found.group(1).decode())
            await expect(
                page.get_by_role("heading", name="Object to open tracking")
            ).to_be_visible()
            # two recipients (one may be Bcc): each sees theirs, cut, not the other's
            await expect(page.get_by_text("i***@example.com")).to_be_visible()
            await expect(page.get_by_text("j***@example.org")).to_be_visible()
            assert "jo@example.org" not in await page.content()
            assert rows(data_dir, "SELECT count(*) FROM consent") == [(0,)]  # GET: nothing
            await page.screenshot(path=str(shots / "optout-page-laptop.png"), full_page=True)

            # at phone size: nothing wider than the screen, the buttons on it
            await page.set_viewport_size(PHONE)
            await page.reload()
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], width
            buttons = page.get_by_role("button", name="Do not track me")
            await expect(buttons).to_have_count(2)
            for index in range(2):
                box = await buttons.nth(index).bounding_box()
                assert box is not None and box["x"] >= 0
                assert box["x"] + box["width"] <= PHONE["width"]
            await page.screenshot(path=str(shots / "optout-page-phone.png"), full_page=True)

            # ivy objects
            row = page.locator("li", has_text="i***@example.com")
            await row.get_by_role("button", name="Do not track me").click()
            await expect(page.get_by_role("heading", name="Objection recorded")).to_be_visible()
            await expect(page.locator("#done")).to_contain_text("i***@example.com")
            await page.screenshot(path=str(shots / "optout-done-phone.png"), full_page=True)
            # back to the page: ivy is not tracked, jo still may object
            await page.get_by_role("link", name="Back to the other recipients").click()
            await expect(page.locator("li", has_text="i***@example.com")).to_contain_text(
                "Not tracked"
            )
            await expect(page.get_by_role("button", name="Do not track me")).to_have_count(1)
        finally:
            await context.close()

    assert rows(data_dir, "SELECT address, state, source FROM consent") == [
        ("ivy@example.com", "denied", "optout-link")
    ]
    after = await send(app, upstream, "after optout", ["ivy@example.com"])
    assert PIXEL.search(after.data) is None
    assert (await message_row(data_dir, "after optout"))[:2] == (0, "consent-denied")
    other = await send(app, upstream, "to jo", ["jo@example.org"])
    assert PIXEL.search(other.data) is not None
