"""Click tracking end to end: a message relayed with ``track_clicks``, its wrapped link followed.

smtp-tracker runs in the test's loop (relay, store and HTTPS pixel endpoint),
a downstream SMTP client plays Postfix, the upstream test server receives the
message; the wrapped link found in what the upstream got is fetched over
HTTPS by a client that verifies the session CA.
"""

from __future__ import annotations

import email
import re
import ssl
from email.message import Message
from email.policy import compat32
from typing import Any, get_args

import aiohttp
import aiosmtplib

from smtp_tracker.store import LinkRecord
from smtp_tracker.store.records import Verdict
from tests.support.relay import tracking_over_tls
from tests.support.waiting import wait_until

HTML = (
    "<html><body>\r\n"
    '<p>Our <a href="https://shop.example.com/sale?a=1&amp;b=2&#x26;c=%41">sale</a> and\r\n'
    "<a href='https://shop.example.com/sale?a=1&amp;b=2&#x26;c=%41'>again</a>.</p>\r\n"
    '<p><a href="mailto:help@example.org">help</a> <a href="#top">top</a>\r\n'
    '<a href="https://lists.example.org/u/9f2">leave</a>\r\n'
    '<a href="https://example.org/prefs" data-notrack>settings</a></p>\r\n'
    "</body></html>\r\n"
)
TEXT = "Our sale: https://shop.example.com/sale?a=1&b=2&c=%41.\r\n"
MESSAGE = (
    "From: News <news@example.org>\r\n"
    "To: bob@example.net\r\n"
    "Subject: sale\r\n"
    "Message-ID: <sale-1@example.org>\r\n"
    "List-Unsubscribe: <https://lists.example.org/u/9f2>, <mailto:u@example.org>\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/alternative; boundary="b"\r\n'
    "\r\n"
    "--b\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    f"{TEXT}"
    "--b\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n"
    "\r\n"
    f"{HTML.replace('=', '=3D')}"
    "--b--\r\n"
).encode()
DESTINATION = "https://shop.example.com/sale?a=1&b=2&c=%41"
CLICK = re.compile(r"https://localhost:\d+/c/([A-Za-z0-9_-]{23})")


def payload(message: Message, ctype: str) -> str:
    for part in message.walk():
        if part.get_content_type() == ctype:
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            return data.decode("utf-8")
    raise AssertionError(f"no {ctype} part")


async def test_a_wrapped_link_relayed_through_the_relay_redirects_to_its_destination(
    relay_factory: Any,
    upstream: Any,
    cert_pem_path: Any,
    key_pem_path: Any,
    client_ssl_context: ssl.SSLContext,
) -> None:
    app = await relay_factory(
        **tracking_over_tls(cert_pem_path, key_pem_path),
        track_clicks=True,
        track_text_links=True,
    )
    host, port = app.smtp_address
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
        await smtp.sendmail("news@example.org", ["bob@example.net"], MESSAGE)
    await upstream.wait_for_transactions(1, timeout_s=20)
    delivered = email.message_from_bytes(upstream.transactions[0].data, policy=compat32)
    html, text = payload(delivered, "text/html"), payload(delivered, "text/plain")

    # two <a> to the sale (each its own token), the text/plain URL; nothing else wrapped
    html_tokens = CLICK.findall(html)
    text_tokens = CLICK.findall(text)
    assert len(html_tokens) == 2 and len(text_tokens) == 1, (html, text)
    assert len(set(html_tokens + text_tokens)) == 3
    assert f"'https://localhost:{app.pixel_port}/c/{html_tokens[1]}'" in html  # quote kept
    for kept in (
        '<a href="mailto:help@example.org">',
        '<a href="#top">',
        '<a href="https://lists.example.org/u/9f2">',
        '<a href="https://example.org/prefs" data-notrack>',
    ):
        assert kept in html
    # (the part's last line ending belongs to the boundary, RFC 2046 §5.1.1)
    assert text == TEXT.removesuffix("\r\n").replace(
        DESTINATION, f"https://localhost:{app.pixel_port}/c/{text_tokens[0]}"
    )

    store = app.store
    assert store is not None

    async def recorded() -> bool:
        return len(await store.list_messages()) == 1

    await wait_until(recorded, timeout_s=20, message="the message was not recorded")
    (stored,) = await store.list_messages()
    assert stored.record.tracked
    assert stored.record.links == tuple(
        LinkRecord(token=t, url=DESTINATION, position=i)
        for i, t in enumerate(html_tokens + text_tokens)
    )

    async with aiohttp.ClientSession() as session:
        for link_token in html_tokens + text_tokens:
            async with session.get(
                f"https://localhost:{app.pixel_port}/c/{link_token}",
                ssl=client_ssl_context,
                allow_redirects=False,
                headers={"User-Agent": "e2e-reader/1.0"},
            ) as response:
                assert response.status == 302
                assert response.headers["Location"] == DESTINATION
                assert response.headers["Cache-Control"] == "no-store"

    async def clicked() -> bool:
        found = await store.find_message(stored.record.tracking_id)
        return found is not None and len(found.clicks) == 3

    await wait_until(clicked, timeout_s=20, message="the clicks were not recorded")
    found = await store.find_message(stored.record.tracking_id)
    assert found is not None
    assert sorted(c.link_token for c in found.clicks) == sorted(html_tokens + text_tokens)
    for click in found.clicks:
        assert click.url == DESTINATION
        assert click.verdict in get_args(Verdict)
        assert click.verdict_reason
