"""In-step copies (issue 21 item 2): ``[[copies]]`` with ``required``, ``untracked``.

A required copy that is down defers the transaction (nothing accepted by the
client); once it is back, Postfix's retry delivers each message exactly once
to each side, counted by Message-ID.  An optional copy that is down is
skipped and counted, and the mail still goes.  An untracked copy receives
the message without the pixel the upstream's copy carries.
"""

from __future__ import annotations

import collections
import re
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from tests.support.postfix import without_bounces
from tests.support.relay import tracking_over_tls
from tests.support.upstream import Transaction, UpstreamServer, upstream_factory
from tests.support.waiting import wait_until

__all__ = ["upstream_factory"]

pytestmark = pytest.mark.upstream(auth_required=False)

_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE | re.IGNORECASE)


def message(number: int, *, html: bool = False) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "alice@example.org"
    mail["To"] = "bob@example.net"
    mail["Subject"] = f"copy {number}"
    mail["Message-ID"] = f"<copy-{number}@example.org>"
    if html:
        mail.set_content("<html><body><p>hello</p></body></html>\n", subtype="html")
    else:
        mail.set_content("hello\n")
    return mail


def message_ids(transactions: list[Transaction]) -> collections.Counter[bytes]:
    return collections.Counter(
        match.group(1)
        for t in without_bounces(transactions)
        if (match := _MESSAGE_ID.search(t.data)) is not None
    )


async def send(relay: Application, mail: EmailMessage) -> None:
    host, port = relay.smtp_address
    await aiosmtplib.send(mail, hostname=host, port=port, start_tls=False, timeout=30)


async def test_a_required_copy_down_defers_and_nothing_is_accepted(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    copy = await upstream_factory(start=False, auth_required=False)
    relay = await relay_factory(
        copies=[{"upstream": copy.address, "required": True}], upstream_user=None
    )
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(relay, message(1))
    assert (refused.value.code, refused.value.message) == (
        451,
        "4.4.1 required copy unavailable, try again later",
    )
    assert upstream.transactions == [] and "DATA" not in upstream.commands
    assert "RSET" in upstream.commands  # the upstream's MAIL was taken back


@pytest.mark.postfix
async def test_a_required_copy_back_up_gets_each_message_once_as_the_upstream_does(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any, postfix_factory: Any
) -> None:
    copy = await upstream_factory(start=False, auth_required=False)
    relay = await relay_factory(
        copies=[{"upstream": copy.address, "required": True}],
        upstream_retry_s=0.2,
        upstream_user=None,
    )
    postfix = await postfix_factory(relay.smtp_address[1])
    count = 5
    for number in range(count):
        await postfix.send("alice@example.org", ["bob@example.net"], bytes(message(number)))

    async def all_deferred() -> bool:
        reasons = await postfix.deferred_reasons()
        return len([r for r in reasons if "451 4.4.1" in r]) == count

    await wait_until(all_deferred, timeout_s=30, message="Postfix did not defer every message")
    assert upstream.transactions == []
    await copy.start()
    assert relay.upstreams is not None
    health = relay.upstreams.copy_targets[0].health
    await wait_until(lambda: health.up, timeout_s=10, message="the copy's probe")
    await postfix.flush()
    await postfix.wait_until_queue_empty(timeout_s=30)
    expected = collections.Counter(f"<copy-{n}@example.org>".encode() for n in range(count))
    assert message_ids(upstream.transactions) == expected
    assert message_ids(copy.transactions) == expected


async def test_an_optional_copy_down_is_counted_and_the_mail_still_goes(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    copy = await upstream_factory(start=False, auth_required=False)
    relay = await relay_factory(copies=[{"upstream": copy.address}], upstream_user=None)
    await send(relay, message(1))
    await send(relay, message(2))
    assert message_ids(upstream.transactions) == {
        b"<copy-1@example.org>": 1,
        b"<copy-2@example.org>": 1,
    }
    assert relay.upstreams is not None
    health = relay.upstreams.copy_targets[0].health
    assert health.failed == 2 and health.carried == 0 and not health.up


async def test_copies_get_the_message_in_step_tracked_or_as_received(
    upstream: UpstreamServer,
    upstream_factory: Any,
    relay_factory: Any,
    cert_pem_path: Path,
    key_pem_path: Path,
) -> None:
    tracked = await upstream_factory(auth_required=False)
    untracked = await upstream_factory(auth_required=False)
    relay = await relay_factory(
        **tracking_over_tls(cert_pem_path, key_pem_path),
        copies=[
            {"upstream": tracked.address, "required": True},
            {"upstream": untracked.address, "untracked": True},
        ],
        upstream_user=None,
    )
    await send(relay, message(1, html=True))
    [main] = upstream.transactions
    [same] = tracked.transactions
    [plain] = untracked.transactions
    assert b"/o/" in main.data and same.data == main.data
    assert b"/o/" not in plain.data
    assert plain.data.split(b"\r\n\r\n", 1)[1] != main.data.split(b"\r\n\r\n", 1)[1]
    assert (plain.mail_from, plain.rcpt_tos) == (main.mail_from, main.rcpt_tos)
