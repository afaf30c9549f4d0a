"""The relay honours the objection registry; the objection page records only its own POST.

A real relay (in-process :class:`~smtp_tracker.app.Application`) relays to the
upstream test server over real sockets; the pixel listener serves the objection
page over HTTPS with the session's trustme certificate; the store is read raw.
"""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smtp_tracker.store import consent
from tests.consent.helpers import CLICK, OPTOUT, PIXEL, message_row, rows, send
from tests.support.relay import tracking_over_tls
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

FORM_TOKEN = re.compile(r'name="form_token" value="([^"]+)"')


@pytest.fixture
async def relay_with_tracking(
    relay_factory: Any, cert_pem_path: Path, key_pem_path: Path, tmp_path: Path
) -> Any:
    async def make(**overrides: Any) -> Any:
        return await relay_factory(
            **tracking_over_tls(cert_pem_path, key_pem_path), track_clicks=True, **overrides
        )

    return make


def deny(data_dir: Path, *addresses: str) -> None:
    conn = consent.sqlite3.connect(data_dir / "tracker.sqlite3", isolation_level=None)
    try:
        consent.set_states(conn, [(a, "denied") for a in addresses], source="test")
    finally:
        conn.close()


def allow(data_dir: Path, *addresses: str) -> None:
    conn = consent.sqlite3.connect(data_dir / "tracker.sqlite3", isolation_level=None)
    try:
        consent.set_states(conn, [(a, "granted") for a in addresses], source="test")
    finally:
        conn.close()


async def test_a_denied_recipient_is_relayed_untracked_with_the_reason(
    relay_with_tracking: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    app = await relay_with_tracking()
    data_dir = tmp_path / "data"
    tracked = await send(app, upstream, "before objection", ["bob@example.net"])
    assert PIXEL.search(tracked.data) and CLICK.search(tracked.data)
    deny(data_dir, "Bob@Example.NET")  # as a CLI user would type it
    untracked = await send(app, upstream, "after objection", ["bob@example.net"])
    assert PIXEL.search(untracked.data) is None
    assert CLICK.search(untracked.data) is None  # links untouched
    assert b'href="https://shop.example.com/offer?id=42"' in untracked.data
    assert await message_row(data_dir, "after objection") == (
        0,
        "consent-denied",
        '["bob@example.net"]',
    )
    assert app.tracker.not_tracked_reasons["consent-denied"] == 1


async def test_one_denied_recipient_among_several_leaves_the_transaction_untracked(
    relay_with_tracking: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    app = await relay_with_tracking()
    data_dir = tmp_path / "data"
    deny(data_dir, "carol@example.com")
    mixed = await send(
        app, upstream, "mixed", ["alice@example.com", "carol@example.com", "dan@example.com"]
    )
    assert PIXEL.search(mixed.data) is None
    assert mixed.rcpt_tos == ["alice@example.com", "carol@example.com", "dan@example.com"]
    assert (await message_row(data_dir, "mixed"))[:2] == (0, "consent-denied")
    others = await send(app, upstream, "others", ["alice@example.com", "dan@example.com"])
    assert PIXEL.search(others.data) is not None
    assert (await message_row(data_dir, "others"))[:2] == (1, None)


async def test_tracking_requires_consent_tracks_only_when_every_recipient_granted(
    relay_with_tracking: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    app = await relay_with_tracking(tracking_requires_consent=True)
    data_dir = tmp_path / "data"
    allow(data_dir, "erin@example.com", "frank@example.com")
    granted = await send(app, upstream, "all granted", ["erin@example.com", "frank@example.com"])
    assert PIXEL.search(granted.data) is not None
    partly = await send(app, upstream, "one unknown", ["erin@example.com", "gina@example.com"])
    assert PIXEL.search(partly.data) is None
    assert (await message_row(data_dir, "one unknown"))[:2] == (0, "consent-missing")
    deny(data_dir, "frank@example.com")
    denied = await send(app, upstream, "one denied", ["erin@example.com", "frank@example.com"])
    assert PIXEL.search(denied.data) is None
    assert (await message_row(data_dir, "one denied"))[:2] == (0, "consent-denied")


async def test_an_unreadable_registry_relays_untracked_not_later(
    relay_with_tracking: Any, upstream: UpstreamServer, tmp_path: Path
) -> None:
    """Lawful by default: not knowing whether someone objected tracks nobody."""
    app = await relay_with_tracking()
    assert app.consent is not None

    async def broken(addresses: Any) -> Any:
        raise consent.StoreError("disk I/O error")

    app.consent.states = broken  # type: ignore[method-assign]
    relayed = await send(app, upstream, "registry down", ["hank@example.com"])
    assert PIXEL.search(relayed.data) is None
    assert (await message_row(tmp_path / "data", "registry down"))[:2] == (
        0,
        "consent-unavailable",
    )


# -- the objection link and page ---------------------------------------------------------


async def page(
    session: aiohttp.ClientSession, url: str, context: ssl.SSLContext, **kwargs: Any
) -> tuple[int, str]:
    method = kwargs.pop("method", "GET")
    async with session.request(method, url, ssl=context, **kwargs) as response:
        assert response.headers.get("Cache-Control") == "no-store", (
            response.status,
            await response.text(),
        )
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        return response.status, await response.text()


def consent_rows(data_dir: Path) -> list[tuple[Any, ...]]:
    return rows(data_dir, "SELECT address, state, source FROM consent ORDER BY address")


async def test_the_objection_page_records_only_its_own_post(
    relay_with_tracking: Any,
    upstream: UpstreamServer,
    tmp_path: Path,
    client_ssl_context: ssl.SSLContext,
) -> None:
    app = await relay_with_tracking(disclosure_optout_link=True)
    data_dir = tmp_path / "data"
    recipients = ["ivy@example.com", "jack@example.org"]
    tracked = await send(app, upstream, "with a link", recipients)
    found = OPTOUT.search(tracked.data)
    assert found is not None and PIXEL.search(tracked.data) is not None
    url, token = found.group(1).decode(), found.group(2).decode()
    assert "@" not in url and "example" not in url.split("/optout/")[1]  # no personal data
    assert b"Do not tell the sender when I open their messages" in tracked.data
    await message_row(data_dir, "with a link")
    query = "SELECT tracking_id, recipients FROM optout_links WHERE token = ?"
    linked = await wait_until(
        lambda: rows(data_dir, query, (token,)), timeout_s=10, message="no objection link kept"
    )
    assert json.loads(linked[0][1]) == recipients

    async with aiohttp.ClientSession() as session:
        # GET (a link scanner, a prefetcher) changes nothing
        before = rows(data_dir, "SELECT * FROM consent") + rows(
            data_dir, "SELECT * FROM optout_used"
        )
        for _ in range(3):
            status, body = await page(session, url, client_ssl_context)
            assert status == 200
            # several recipients (some maybe Bcc): each recognises theirs, none learns others'
            assert "i***@example.com" in body and "j***@example.org" in body
            assert "ivy@example.com" not in body and "jack@example.org" not in body
        head_status, _ = await page(session, url, client_ssl_context, method="HEAD")
        assert head_status == 200
        assert before == [] and rows(data_dir, "SELECT * FROM consent") == []
        assert rows(data_dir, "SELECT * FROM optout_used") == []
        form_token = FORM_TOKEN.search(body)
        assert form_token is not None

        # a forged token, another link's token, no token: refused, nothing recorded
        forged = form_token.group(1)[:-4] + (
            "AAAA" if not form_token.group(1).endswith("AAAA") else "BBBB"
        )
        for data in (
            {"form_token": forged, "recipient": "0"},
            {"recipient": "0"},
            {"form_token": "x.1.y", "recipient": "0"},
        ):
            status, body = await page(session, url, client_ssl_context, method="POST", data=data)
            assert status == 403, data
        other = url[: -len(token)] + ("A" * 22 + "E")
        status, _ = await page(
            session,
            other,
            client_ssl_context,
            method="POST",
            data={"form_token": form_token.group(1), "recipient": "0"},
        )
        assert status == 403
        # a cross-site form post (Origin of another site) is refused
        status, _ = await page(
            session,
            url,
            client_ssl_context,
            method="POST",
            data={"form_token": form_token.group(1), "recipient": "0"},
            headers={"Origin": "https://evil.example"},
        )
        assert status == 403
        assert consent_rows(data_dir) == []

        # the page's own POST records denied for that recipient only
        status, body = await page(
            session,
            url,
            client_ssl_context,
            method="POST",
            data={"form_token": form_token.group(1), "recipient": "0"},
        )
        assert status == 200 and "Objection recorded" in body and "i***@example.com" in body
        assert consent_rows(data_dir) == [("ivy@example.com", "denied", "optout-link")]
        # replayed: refused
        status, _ = await page(
            session,
            url,
            client_ssl_context,
            method="POST",
            data={"form_token": form_token.group(1), "recipient": "1"},
        )
        assert status == 403
        assert consent_rows(data_dir) == [("ivy@example.com", "denied", "optout-link")]
        # the other recipient objects with a fresh page
        status, body = await page(session, url, client_ssl_context)
        assert "Not tracked" in body
        fresh = FORM_TOKEN.search(body)
        assert fresh is not None
        status, _ = await page(
            session,
            url,
            client_ssl_context,
            method="POST",
            data={"form_token": fresh.group(1), "recipient": "1"},
        )
        assert status == 200
        # an unknown link says so
        status, body = await page(session, other, client_ssl_context)
        assert status == 404 and "not known" in body

    assert consent_rows(data_dir) == [
        ("ivy@example.com", "denied", "optout-link"),
        ("jack@example.org", "denied", "optout-link"),
    ]
    # the next message to that address is not tracked
    nxt = await send(app, upstream, "next message", ["ivy@example.com"])
    assert PIXEL.search(nxt.data) is None and OPTOUT.search(nxt.data) is None
    assert (await message_row(data_dir, "next message"))[:2] == (0, "consent-denied")
