"""Privacy controls through the real relay: domain lists, disclosure footer and header.

aiosmtplib client (plays Postfix) → smtp-tracker with tracking → the aiosmtpd
upstream; what arrives upstream is compared octet for octet with what was sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from smtp_tracker.errors import ConfigError
from smtp_tracker.mime.inject import pixel_tag
from smtp_tracker.store import StoredMessage
from smtp_tracker.tokens import pixel_url
from tests.support.waiting import wait_until

BASE_URL = "https://track.example.test"
FOOTER = '<p class="notice">We count opens of this message. <a href="https://example.org/p">Privacy</a></p>'
NOTICE = (
    "This message contains an image that tells the sender when it is opened; "
    "see https://example.org/privacy"
)
HTML_MESSAGE = (
    b"From: Alice <alice@shop.example>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: news\r\n"
    b"Message-ID: <privacy-1@shop.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"<html><body>\r\n<p>Hello Bob</p>\r\n</body></html>\r\n"
)


async def start(relay_factory: Any, **overrides: Any) -> Application:
    return await relay_factory(
        tracking=True,
        pixel_base_url=BASE_URL,
        add_received_header=False,
        **overrides,
    )


async def deliver(
    app: Application,
    upstream: Any,
    data: bytes = HTML_MESSAGE,
    *,
    sender: str = "alice@shop.example",
    recipients: tuple[str, ...] = ("bob@example.net",),
) -> tuple[bytes, StoredMessage]:
    """Send one transaction; return the octets the upstream got and the record."""
    before = len(upstream.transactions)
    host, port = app.smtp_address
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
        errors, _ = await smtp.sendmail(sender, list(recipients), data)
        assert errors == {}
    delivered = await upstream.wait_for_transactions(before + 1, timeout_s=10)
    store = app.store
    assert store is not None

    async def recorded() -> list[StoredMessage]:
        return [m for m in await store.list_messages() if m.record.recipients == list(recipients)]

    found = await wait_until(recorded, timeout_s=10, message="the message was not recorded")
    return delivered[before].data, found[0]


def expected_tracked(data: bytes, tracking_id: str, *, footer: str = "") -> bytes:
    """``data`` with ``footer`` and the pixel spliced just before ``</body>``."""
    index = data.rindex(b"</body>")
    tag = pixel_tag(pixel_url(BASE_URL, tracking_id), extra_html=footer)
    return data[:index] + tag.encode() + data[index:]


async def test_footer_and_header_on_a_tracked_message_and_nothing_else_changed(
    relay_factory: Any, upstream: Any, tmp_path: Path
) -> None:
    footer_file = tmp_path / "footer.html"
    footer_file.write_text(FOOTER + "\n", encoding="utf-8")
    app = await start(
        relay_factory, disclosure_footer_file=str(footer_file), disclosure_header=NOTICE
    )
    delivered, stored = await deliver(app, upstream)
    assert stored.record.tracked is True
    field = (
        b"X-Tracking-Notice: This message contains an image that tells the sender when\r\n"
        b" it is opened; see https://example.org/privacy\r\n"
    )
    assert delivered == field + expected_tracked(
        HTML_MESSAGE, stored.record.tracking_id, footer=FOOTER
    )
    assert delivered.count(b"We count opens of this message.") == 1


async def test_untracked_messages_carry_neither_footer_nor_header(
    relay_factory: Any, upstream: Any, tmp_path: Path
) -> None:
    footer_file = tmp_path / "footer.html"
    footer_file.write_text(FOOTER, encoding="utf-8")
    app = await start(
        relay_factory, disclosure_footer_file=str(footer_file), disclosure_header=NOTICE
    )
    opted_out = HTML_MESSAGE.replace(b"Subject:", b"X-Track: no\r\nSubject:")
    delivered, stored = await deliver(app, upstream, opted_out)
    assert (stored.record.tracked, stored.record.not_tracked_reason) == (False, "opt-out")
    assert delivered == HTML_MESSAGE  # the control header removed, nothing else

    plain = b"From: alice@shop.example\r\nSubject: plain\r\n\r\nJust text.\r\n"
    delivered, stored = await deliver(app, upstream, plain, recipients=("carol@example.net",))
    assert (stored.record.tracked, stored.record.not_tracked_reason) == (False, "no-html-body")
    assert delivered == plain


@pytest.mark.parametrize(
    ("lists", "sender", "recipients", "reason"),
    [
        ({"exclude_sender_domains": "shop.example"}, "a@eu.SHOP.example", ("b@x.example",),
         "sender-domain-excluded"),
        ({"exclude_recipient_domains": "private.example"}, "a@shop.example",
         ("b@x.example", "c@mail.private.example"), "recipient-domain-excluded"),
        ({"include_sender_domains": "shop.example"}, "a@other.example", ("b@x.example",),
         "sender-domain-not-included"),
        ({"include_recipient_domains": "customers.example,bücher.example"}, "a@shop.example",
         ("b@customers.example", "c@elsewhere.example"), "recipient-domain-not-included"),
        ({"include_recipient_domains": "customers.example,bücher.example"}, "a@shop.example",
         ("b@customers.example", "c@xn--bcher-kva.example"), None),
        ({"exclude_recipient_domains": "private.example"}, "a@shop.example",
         ("b@notprivate.example",), None),
    ],
)  # fmt: skip
async def test_domain_lists_decide_on_every_forward_path(
    relay_factory: Any,
    upstream: Any,
    lists: dict[str, str],
    sender: str,
    recipients: tuple[str, ...],
    reason: str | None,
) -> None:
    app = await start(relay_factory, disclosure_header="tracked", **lists)
    delivered, stored = await deliver(app, upstream, sender=sender, recipients=recipients)
    assert stored.record.not_tracked_reason == reason
    assert stored.record.tracked is (reason is None)
    if reason is None:
        expected = b"X-Tracking-Notice: tracked\r\n"
        assert delivered == expected + expected_tracked(HTML_MESSAGE, stored.record.tracking_id)
    else:
        assert delivered == HTML_MESSAGE


async def test_an_excluded_domain_wins_over_the_senders_opt_in(
    relay_factory: Any, upstream: Any
) -> None:
    app = await start(
        relay_factory, tracking_requires_opt_in=True, exclude_recipient_domains="private.example"
    )
    opted_in = HTML_MESSAGE.replace(b"Subject:", b"X-Track: yes\r\nSubject:")
    delivered, stored = await deliver(app, upstream, opted_in, recipients=("b@private.example",))
    assert stored.record.not_tracked_reason == "recipient-domain-excluded"
    assert delivered == HTML_MESSAGE  # not tracked, and the control header still removed

    delivered, stored = await deliver(app, upstream, opted_in, recipients=("c@example.net",))
    assert stored.record.tracked is True
    assert delivered == expected_tracked(HTML_MESSAGE, stored.record.tracking_id)

    delivered, stored = await deliver(app, upstream, recipients=("d@example.net",))
    assert stored.record.not_tracked_reason == "no-opt-in"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        (b"<p>caf\xe9</p>", "is not UTF-8"),
        (b"<p>x</p><!--", "would not be shown"),
    ],
)
async def test_a_bad_footer_file_stops_the_start(
    relay_factory: Any, tmp_path: Path, content: bytes | None, problem: str
) -> None:
    footer_file = tmp_path / "footer.html"
    if content is not None:
        footer_file.write_bytes(content)
    with pytest.raises(ConfigError, match=f"disclosure_footer_file: .*{problem}"):
        await start(relay_factory, disclosure_footer_file=str(footer_file))
