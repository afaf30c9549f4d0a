"""The click endpoint over real HTTPS: 302 to exactly the stored URL, clicks recorded, 404s."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from smtp_tracker.classification import Classifier
from smtp_tracker.classification.networks import load_networks
from smtp_tracker.errors import StoreError
from smtp_tracker.store import LinkRecord, SqliteStore
from smtp_tracker.tokens import new_tracking_id
from smtp_tracker.web.public.click import CLICK_KEY, LinkCache, location
from smtp_tracker.web.public.limits import EventLimiter
from tests.support.stores import OpensOnlyStore

from .web_helpers import StartPixel, get, make_record, raw_request, token, wait_until

#: A destination with what a browser must get back exactly: query, "&", "%", "#".
URL = "https://shop.example.com/a/b?utm_source=news&id=42&q=%C3%A9t%C3%A9#top"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


async def store_with_link(store: SqliteStore, url: str = URL, *, number: int = 1) -> str:
    link_token = new_tracking_id()
    relayed = datetime.now(UTC) - timedelta(hours=2)  # not a prefetch-window event
    await store.record_message(
        make_record(
            number,
            relayed_at=relayed,
            received_at=relayed,
            links=(LinkRecord(token=link_token, url=url, position=0),),
        )
    )
    return link_token


async def clicks_of(store: SqliteStore, number: int = 1) -> int:
    found = await store.find_message(token(number))
    assert found is not None
    return len(found.clicks)


def check_not_found(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 404
    assert "location" not in headers
    assert body == b"not found\n"
    assert headers["cache-control"] == "no-store"


@pytest.fixture
async def classified_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    classifier = Classifier(load_networks(None), 30.0)
    async with await SqliteStore.open(tmp_path / "classified", classifier=classifier) as opened:
        yield opened


async def test_click_redirects_to_exactly_the_stored_url_and_records_a_classified_click(
    start_pixel: StartPixel,
    classified_store: SqliteStore,
    client: aiohttp.ClientSession,
) -> None:
    link_token = await store_with_link(classified_store)
    server = await start_pixel(store=classified_store)
    async with client.get(
        f"{server.base_url}/c/{link_token}",
        allow_redirects=False,
        headers={"User-Agent": FIREFOX},
    ) as response:
        assert response.status == 302
        assert response.headers["Location"] == URL
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Server"] == "smtp-tracker"
        assert await response.read() == b""

    async def recorded() -> bool:
        return await clicks_of(classified_store) == 1

    await wait_until(recorded, what="the click to be recorded")
    found = await classified_store.find_message(token(1))
    assert found is not None
    (click,) = found.clicks
    assert (click.link_token, click.url, click.tracking_id) == (link_token, URL, token(1))
    assert click.user_agent == FIREFOX
    assert click.verdict == "human", (click.verdict, click.verdict_reason)
    assert click.verdict_reason
    assert click.ip == "127.0.0.0/24"  # the store's default ip_policy: truncate


async def test_head_redirects_without_recording(
    start_pixel: StartPixel, store: SqliteStore, client: aiohttp.ClientSession
) -> None:
    link_token = await store_with_link(store)
    server = await start_pixel(store=store)
    async with client.head(f"{server.base_url}/c/{link_token}", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == URL
    # a GET after it is the only click recorded
    async with client.get(f"{server.base_url}/c/{link_token}", allow_redirects=False) as r:
        assert r.status == 302

    async def recorded() -> bool:
        return await clicks_of(store) == 1

    await wait_until(recorded, what="the GET's click")
    endpoint = server.app[CLICK_KEY]
    assert (endpoint.redirects, endpoint.recorded_offers) == (2, 1)
    assert await clicks_of(store) == 1


async def test_forged_altered_unknown_and_malformed_tokens_get_404_and_no_location(
    start_pixel: StartPixel, store: SqliteStore, client_ssl_context: ssl.SSLContext
) -> None:
    link_token = await store_with_link(store)
    server = await start_pixel(store=store)
    altered = link_token[:5] + ("A" if link_token[5] != "A" else "B") + link_token[6:]
    paths = [
        f"/c/{new_tracking_id()}",  # well formed, never issued
        f"/c/{altered}",  # one character changed
        f"/c/{link_token}x",  # one character more
        f"/c/{link_token[:-1]}",  # one character less
        "/c/https://evil.example/",
        "/c/https%3A%2F%2Fevil.example%2F",
        "/c/?url=https://evil.example/",
        "/c/",
        "/c/..%2F..%2Fetc%2Fpasswd",
        f"/c/{token(1)}",  # the message's tracking id is not a link token
    ]
    for path in paths:
        status, headers, body = await raw_request(
            server.port, get(path), ssl_context=client_ssl_context
        )
        if path == "/c/" or path.startswith(("/c/https://", "/c/?")):
            assert status == 404 and "location" not in headers, (path, status, headers)
        else:
            check_not_found(status, headers, body)
    await wait_until(lambda: server.app[CLICK_KEY].not_found >= 7, what="404s counted")
    assert await clicks_of(store) == 0


async def test_the_destination_comes_only_from_the_store(
    start_pixel: StartPixel, store: SqliteStore, client_ssl_context: ssl.SSLContext
) -> None:
    link_token = await store_with_link(store)
    server = await start_pixel(store=store)
    for path in (
        f"/c/{link_token}?url=https://evil.example/",
        f"/c/{link_token}?redirect=%2F%2Fevil.example",
        f"/c/{link_token}#https://evil.example/",
    ):
        status, headers, _body = await raw_request(
            server.port,
            get(path, "Referer: https://evil.example/", "X-Forwarded-Host: evil.example"),
            ssl_context=client_ssl_context,
        )
        assert (status, headers["location"]) == (302, URL), path


async def test_replayed_clicks_are_limited_but_always_redirected(
    start_pixel: StartPixel, store: SqliteStore, client: aiohttp.ClientSession
) -> None:
    link_token = await store_with_link(store)
    limiter = EventLimiter(per_token_per_min=100, per_token_client_per_min=2)
    server = await start_pixel(store=store, limiter=limiter)
    for _ in range(5):
        async with client.get(f"{server.base_url}/c/{link_token}", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (302, URL)

    async def recorded() -> bool:
        return await clicks_of(store) == 2

    await wait_until(recorded, what="two clicks recorded")
    endpoint = server.app[CLICK_KEY]
    assert (endpoint.recorded_offers, endpoint.limited) == (2, 3)
    assert limiter.limited_client == 3


async def test_known_links_are_cached_unknown_ones_are_not(
    start_pixel: StartPixel, store: SqliteStore, client: aiohttp.ClientSession
) -> None:
    link_token = await store_with_link(store)
    server = await start_pixel(store=store)
    unknown = new_tracking_id()
    for _ in range(3):
        async with client.get(f"{server.base_url}/c/{link_token}", allow_redirects=False) as r:
            assert r.status == 302
        async with client.get(f"{server.base_url}/c/{unknown}", allow_redirects=False) as r:
            assert r.status == 404
    endpoint = server.app[CLICK_KEY]
    assert endpoint.cache_hits == 2
    assert len(endpoint.cache) == 1


async def test_non_ascii_destinations_are_percent_encoded_in_location(
    start_pixel: StartPixel, store: SqliteStore, client: aiohttp.ClientSession
) -> None:
    link_token = await store_with_link(store, "https://bücher.example/straße?q=1%20x&r=é")
    server = await start_pixel(store=store)
    async with client.get(f"{server.base_url}/c/{link_token}", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == "https://b%C3%BCcher.example/stra%C3%9Fe?q=1%20x&r=%C3%A9"


class _UnreadableStore(OpensOnlyStore):
    async def find_link(self, token: str) -> tuple[LinkRecord, str] | None:
        raise StoreError("disk I/O error")


async def test_a_store_that_cannot_be_read_is_a_503_never_a_redirect(
    start_pixel: StartPixel, client_ssl_context: ssl.SSLContext
) -> None:
    server = await start_pixel(store=_UnreadableStore())
    status, headers, body = await raw_request(
        server.port, get(f"/c/{new_tracking_id()}"), ssl_context=client_ssl_context
    )
    assert status == 503
    assert "location" not in headers
    assert body == b"temporarily unavailable\n"
    assert b"disk" not in body


def test_link_cache_is_bounded_least_recently_used_out() -> None:
    cache = LinkCache(2)
    cache.put("a", "https://a.example/")
    cache.put("b", "https://b.example/")
    assert cache.get("a") == "https://a.example/"  # now b is the least recently used
    cache.put("c", "https://c.example/")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (
        "https://a.example/",
        None,
        "https://c.example/",
    )
    assert len(cache) == 2
    with pytest.raises(ValueError):
        LinkCache(0)
    with pytest.raises(ValueError):
        LinkCache(1, ttl_s=0)


def test_link_cache_entries_expire() -> None:
    now = [100.0]
    cache = LinkCache(10, ttl_s=300, clock=lambda: now[0])
    cache.put("a", "https://a.example/")
    now[0] += 299
    assert cache.get("a") == "https://a.example/"
    now[0] += 1
    assert cache.get("a") is None
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (URL, URL),
        ("https://x.example/a b", "https://x.example/a%20b"),
        ("https://x.example/%41?a=%zz", "https://x.example/%41?a=%zz"),
        ("https://x.example/ü", "https://x.example/%C3%BC"),
    ],
)
def test_location_keeps_printable_ascii_as_stored(url: str, expected: str) -> None:
    assert location(url) == expected
