"""The pixel takes no room (issue 19, item 5), and two pixels make one open (item 4).

Every HTML template of the shared corpus is wrapped in a message, rewritten
with ``pixel_position`` ``end`` and ``both``, and rendered in headless Chromium
(Debian's ``/usr/bin/chromium`` driven by Playwright; no browser is
downloaded) beside the original: the page height and width (CSS px) must be
the same to the pixel, and so must a full-page screenshot, byte for byte.
The pixels point at a real pixel endpoint (``make_pixel_app`` over a real
store, loopback); every other request (the templates' remote images and
fonts) is aborted, the same way for both renders.  Each rewritten render
must fetch its pixel (so the style does not stop the fetch), and with two
pixel elements of the same URL Chromium makes one request, recorded as one
open.  Differing screenshots go to ``tests/artifacts/pixel-render/`` (or
``$SMTP_TRACKER_ARTIFACTS/pixel-render``).

Before the fix (an inline 1x1 image), 56 of the 85 templates rendered taller:
by 1 px at the end of a body with no margin, by a line box (18 px) after a
block such as ``</center>``.
"""

from __future__ import annotations

import email
import os
from collections.abc import AsyncIterator
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from smtp_tracker.mime import RewritePolicy, rewrite
from smtp_tracker.store import SqliteStore
from smtp_tracker.tokens import new_tracking_id, pixel_url
from smtp_tracker.web import make_pixel_app, start_site
from tests.corpus import corpus_root, html_as_message, html_paths, skip_reason
from tests.support.waiting import wait_until
from tests.web.web_helpers import make_record

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 800, "height": 600}

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is missing (apt-get install chromium): the render test needs it",
    ),
    pytest.mark.skipif(corpus_root() is None, reason=skip_reason()),
    pytest.mark.corpus,
    pytest.mark.timeout(900),
]


def artifacts_dir() -> Path:
    base = os.environ.get("SMTP_TRACKER_ARTIFACTS")
    root = Path(base) if base else Path(__file__).resolve().parents[1] / "artifacts"
    directory = root / "pixel-render"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def html_of(message: bytes) -> str:
    """The decoded text/html part of *message*."""
    for part in email.message_from_bytes(message, policy=compat32).walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode("utf-8")
    raise AssertionError("no text/html part")


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[tuple[str, SqliteStore]]:
    """A real pixel endpoint over a real store, on loopback port 0 (plain HTTP)."""
    async with await SqliteStore.open(tmp_path / "data", ip_policy="full") as store:
        app = make_pixel_app(store=store)
        runner: web.AppRunner
        runner, port = await start_site(app, host="127.0.0.1", port=0, ssl_context=None)
        try:
            yield f"http://127.0.0.1:{port}", store
        finally:
            await runner.cleanup()


async def test_the_pixel_takes_no_room_and_two_pixels_are_one_open(
    endpoint: tuple[str, SqliteStore],
) -> None:
    from playwright.async_api import Route, async_playwright

    base, store = endpoint
    templates = [p for p in html_paths() if p.suffix == ".html"]
    assert len(templates) >= 80
    requests: dict[str, int] = {}

    async def route(route: Route) -> None:
        url = route.request.url
        if url.startswith(base):
            requests[url] = requests.get(url, 0) + 1
            await route.continue_()
        else:
            await route.abort()

    problems: list[str] = []
    shots = artifacts_dir()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(20_000)
            await page.route("**/*", route)

            async def render(text: str) -> tuple[Any, bytes]:
                await page.set_content(text, wait_until="load")
                size = await page.evaluate(
                    "[document.documentElement.scrollHeight, document.documentElement.scrollWidth]"
                )
                return size, await page.screenshot(full_page=True)

            for number, path in enumerate(templates):
                original = html_as_message(
                    path.read_bytes(), charset="utf-8", cte="quoted-printable"
                )
                before_size, before_shot = await render(html_of(original))
                for position in ("end", "both"):
                    tracking_id = new_tracking_id()
                    await store.record_message(make_record(number, tracking_id=tracking_id))
                    url = pixel_url(base, tracking_id)
                    result = rewrite(original, url, RewritePolicy(pixel_position=position))
                    assert result.tracked, (path.name, result.reason, result.defects)
                    size, shot = await render(html_of(result.message))
                    name = f"{path.parent.name}/{path.name} ({position})"
                    if size != before_size:
                        problems.append(f"{name}: {before_size} CSS px became {size}")
                    if shot != before_shot:
                        problems.append(f"{name}: the screenshot differs")
                        stem = f"{path.parent.name}-{path.stem}-{position}"
                        (shots / f"{stem}-before.png").write_bytes(before_shot)
                        (shots / f"{stem}-after.png").write_bytes(shot)
                    loaded = await page.evaluate(
                        "u => [...document.images].filter(i => i.src === u)"
                        ".map(i => i.complete && i.naturalWidth === 1)",
                        url,
                    )
                    if loaded != [True] * result.pixels:
                        problems.append(f"{name}: pixel elements loaded {loaded}")
                    if requests.get(url) != 1:
                        problems.append(f"{name}: {requests.get(url)} requests for the pixel")
        finally:
            await browser.close()
    assert problems == []

    # every render fetched its pixel once, and the endpoint recorded one open per message,
    # whether it held one pixel element or two
    async def opens() -> list[int]:
        counts = []
        for url in requests:
            found = await store.find_message(url.rsplit("/", 1)[1].removesuffix(".gif"))
            assert found is not None
            counts.append(len(found.opens))
        return counts

    await wait_until(
        lambda: _all_recorded(opens),
        timeout_s=30,
        message="every pixel request recorded as an open",
    )
    assert await opens() == [1] * (2 * len(templates))


async def _all_recorded(opens: Any) -> bool:
    return all(count >= 1 for count in await opens())
