"""Failover, copies and LMTP in detail (issue 21): the cases the end-to-end tests leave out.

The configuration of ``upstream`` lists and ``[[copies]]`` tables, a 4xx or
421 to MAIL, a required copy lost in the middle of a transaction, and the
bound on LMTP's parallel connections.
"""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from smtp_tracker.config import CopySpec, HostPort, build_config, load_toml
from smtp_tracker.errors import ConfigError
from tests.smtp.test_hostile import Raw
from tests.support.upstream import UpstreamServer, upstream_factory
from tests.support.waiting import wait_until

__all__ = ["upstream_factory"]

pytestmark = pytest.mark.upstream(auth_required=False)


# -- configuration ----------------------------------------------------------------------------


def test_upstream_takes_one_address_or_an_ordered_list() -> None:
    one = build_config({"upstream": "a.example:25"}, {}, environ={})
    assert one.upstream == (HostPort("a.example", 25),) and str(one.upstream) == "a.example:25"
    listed = build_config({"upstream": ["a.example:25", "[::1]:26"]}, {}, environ={})
    assert listed.upstream == (HostPort("a.example", 25), HostPort("::1", 26))
    flag = build_config({}, {"upstream": "a.example:25,b.example:26"}, environ={})
    assert str(flag.upstream) == "a.example:25,b.example:26"
    with pytest.raises(ConfigError, match="listed twice"):
        build_config({"upstream": ["a.example:25", "a.example:25"]}, {}, environ={})


def test_copies_are_read_from_toml_tables_and_from_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "smtp-tracker.toml"
    path.write_text(
        'upstream = "smtp.example.net:587"\n'
        "\n"
        "[[copies]]\n"
        'upstream = "archive.example.net:25"\n'
        "required = true\n"
        "\n"
        "[[copies]]\n"
        'upstream = "new.example.net:25"\n'
        "untracked = true\n"
    )
    config = build_config(load_toml(path), {}, environ={})
    assert config.copies == (
        CopySpec(upstream=HostPort("archive.example.net", 25), required=True),
        CopySpec(upstream=HostPort("new.example.net", 25), untracked=True),
    )
    flag = build_config({}, {"copies": "archive.example.net:25/required"}, environ={})
    assert flag.copies == config.copies[:1]


@pytest.mark.parametrize(
    ("copies", "problem"),
    [
        ([{"required": True}], 'copies #1: upstream = "HOST:PORT" is required'),
        ([{"upstream": "a:1", "mandatory": True}], "copies #1: unknown key 'mandatory'"),
        ([{"upstream": "a:1", "required": "yes"}], "copies #1: required: expected true or false"),
        ([{"upstream": "smtp.example.net:587"}], "copies: a copy's upstream is also in upstream"),
        ("a:1/always", "copies: unknown option 'always' in 'a:1/always'"),
    ],
)
def test_bad_copies_are_named(copies: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config({"upstream": "smtp.example.net:587", "copies": copies}, {}, environ={})
    assert any(p.startswith(problem) for p in raised.value.problems), raised.value.problems


# -- health ---------------------------------------------------------------------------------


def test_failures_of_an_upstream_already_down_do_not_lengthen_its_wait() -> None:
    from smtp_tracker.smtp.failover import Upstreams
    from smtp_tracker.smtp.upstream import UpstreamSettings

    now = [1000.0]
    settings = UpstreamSettings(host="a", port=25, tls="none", tls_context=None, helo_name="h")
    upstreams = Upstreams([settings], retry_s=60.0, clock=lambda: now[0])
    health = upstreams.first
    for _ in range(10):  # ten sessions finding it dead at once
        upstreams.mark_failed(health, "451 4.4.1 upstream unavailable")
    assert (health.up, health.failures, health.failed) == (False, 1, 10)
    assert health.retry_at == 1060.0
    assert upstreams.candidates() == [health]  # the only one: tried anyway
    upstreams.mark_ok(health)
    assert (health.up, health.failures) == (True, 0)


# -- MAIL replies and failover ----------------------------------------------------------------


def mail(number: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = "bob@example.net"
    message["Message-ID"] = f"<topology-{number}@example.org>"
    message.set_content("hello\n")
    return message


async def send(relay: Application, number: int) -> None:
    host, port = relay.smtp_address
    await aiosmtplib.send(mail(number), hostname=host, port=port, start_tls=False, timeout=20)


async def test_a_4xx_to_mail_tries_the_next_upstream_without_marking_the_first_down(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    first = await upstream_factory(auth_required=False, mail_reply="451 4.7.1 rate limited")
    relay = await relay_factory(upstream=[first.address, upstream.address], upstream_user=None)
    await send(relay, 1)
    assert len(upstream.transactions) == 1 and first.transactions == []
    assert relay.upstreams is not None and relay.upstreams.health[0].up
    assert first.commands.count("QUIT") == 1  # its connection is not kept


async def test_when_every_upstream_says_4xx_the_first_reply_is_given(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    first = await upstream_factory(auth_required=False, mail_reply="451 4.7.1 rate limited")
    upstream.configure(mail_reply="452 4.3.1 out of space")
    relay = await relay_factory(upstream=[first.address, upstream.address], upstream_user=None)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(relay, 1)
    assert (refused.value.code, refused.value.message) == (451, "4.7.1 rate limited")
    assert relay.upstreams is not None and all(h.up for h in relay.upstreams.health)


async def test_a_421_to_mail_marks_the_upstream_down(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    first = await upstream_factory(auth_required=False, mail_reply="421 4.3.2 shutting down")
    relay = await relay_factory(upstream=[first.address, upstream.address], upstream_user=None)
    await send(relay, 1)
    assert len(upstream.transactions) == 1
    assert relay.upstreams is not None and not relay.upstreams.health[0].up


async def test_a_5xx_to_mail_is_the_senders_and_passed_on(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    first = await upstream_factory(auth_required=False, mail_reply="550 5.7.1 sender refused")
    relay = await relay_factory(upstream=[first.address, upstream.address], upstream_user=None)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(relay, 1)
    assert refused.value.code == 550
    assert upstream.accepted == 0


# -- copies in the middle of a transaction ----------------------------------------------------


async def test_a_required_copy_lost_at_rcpt_defers_and_leaves_the_upstream_clean(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    copy = await upstream_factory(auth_required=False)
    relay = await relay_factory(
        copies=[{"upstream": copy.address, "required": True}], upstream_user=None
    )
    client = await Raw.open(relay.smtp_address)
    try:
        assert (await client.reply()).startswith("220 ")
        client.writer.write(b"EHLO postfix.test\r\n")
        await client.lines()
        assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
        await copy.stop()  # the copy goes away between MAIL and RCPT
        reply = await client.command("RCPT TO:<bob@example.net>")
        assert reply == "451 4.4.0 required copy did not accept, try again later"
        assert (await client.command("RCPT TO:<carol@example.net>")).startswith("451 ")
        assert await client.command("RSET") == "250 2.0.0 OK"
        # the upstream's transaction was ended: a new MAIL is not a nested one
        await copy.start()
        assert relay.upstreams is not None
        relay.upstreams.mark_ok(relay.upstreams.copy_targets[0].health)
        assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
    finally:
        await client.close()
    assert upstream.commands.count("RSET") >= 1
    assert upstream.transactions == []


async def test_the_upstream_lost_at_rcpt_ends_the_copies_transaction_too(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    copy = await upstream_factory(auth_required=False)
    relay = await relay_factory(copies=[{"upstream": copy.address}], upstream_user=None)
    client = await Raw.open(relay.smtp_address)
    try:
        assert (await client.reply()).startswith("220 ")
        client.writer.write(b"EHLO postfix.test\r\n")
        await client.lines()
        assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
        await upstream.stop()  # the upstream goes away between MAIL and RCPT
        assert (await client.command("RCPT TO:<bob@example.net>")).startswith("451 4.4.2 ")
        assert await client.command("RSET") == "250 2.0.0 OK"
        await upstream.start()
        assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
        assert await client.command("RCPT TO:<bob@example.net>") == "250 2.1.5 Ok"
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(b"Subject: again\r\n\r\nhello\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as UP")
    finally:
        await client.close()
    assert len(upstream.transactions) == 1
    assert [t.rcpt_tos for t in copy.transactions] == [["bob@example.net"]]
    assert not any(line.startswith("503") for line in copy.transcript)


# -- LMTP: the parallel connections -----------------------------------------------------------


async def test_lmtp_relays_on_at_most_lmtp_parallel_copies_connections(
    upstream: UpstreamServer, relay_factory: Any
) -> None:
    relay = await relay_factory(
        lmtp=True,
        lmtp_listen="127.0.0.1:0",
        lmtp_parallel_copies=2,
        upstream_user=None,
        metrics=True,
        metrics_listen="127.0.0.1:0",
    )
    assert relay.lmtp_listener is not None and relay.metrics is not None
    client = await Raw.open(relay.lmtp_listener.address)
    try:
        assert (await client.reply()).startswith("220 ")
        client.writer.write(b"LHLO postfix.test\r\n")
        await client.lines()
        for transaction in range(2):
            assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 OK"
            for number in range(6):
                await client.command(f"RCPT TO:<r{transaction}-{number}@example.net>")
            assert (await client.command("DATA")).startswith("354 ")
            client.writer.write(b"Subject: six\r\n\r\nhello\r\n.\r\n")
            replies = [await client.reply(timeout_s=20) for _ in range(6)]
            assert all(r.startswith("250 2.0.0 Ok: queued as UP") for r in replies)
        assert await client.command("QUIT") == "221 2.0.0 Bye"
    finally:
        await client.close()
    assert len(upstream.transactions) == 12
    assert upstream.accepted == 2  # two connections, kept for the second delivery
    order = [t.rcpt_tos[0] for t in upstream.transactions]
    assert sorted(order) == sorted(f"r{t}-{n}@example.net" for t in range(2) for n in range(6))
    scraped = relay.metrics.exposition().decode()
    assert 'smtp_tracker_lmtp_recipients_total{outcome="relayed"} 12.0' in scraped
    assert 'smtp_tracker_lmtp_recipients_total{outcome="deferred"} 0.0' in scraped


async def test_lmtp_client_gone_mid_delivery_no_recipient_is_begun_after(
    upstream: UpstreamServer, relay_factory: Any
) -> None:
    """Recipients whose reply could not reach Postfix are not relayed: Postfix retries them.

    The upstream holds each MAIL 0.3 s, so the client is gone while the first
    recipient is in flight (an ordering, not a time bound)."""
    upstream.configure(delay_s={"MAIL": 0.3})
    relay = await relay_factory(
        lmtp=True, lmtp_listen="127.0.0.1:0", lmtp_parallel_copies=1, upstream_user=None
    )
    assert relay.lmtp_listener is not None
    handler = relay.lmtp_listener.handler
    client = await Raw.open(relay.lmtp_listener.address)
    assert (await client.reply()).startswith("220 ")
    client.writer.write(b"LHLO postfix.test\r\n")
    await client.lines()
    assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 OK"
    for number in range(5):
        await client.command(f"RCPT TO:<r{number}@example.net>")
    assert (await client.command("DATA")).startswith("354 ")
    client.writer.write(b"Subject: gone\r\n\r\nhello\r\n.\r\n")
    await wait_until(
        lambda: any(c.startswith("MAIL") for c in upstream.commands),
        timeout_s=10,
        message="the first recipient's MAIL upstream",
    )
    client.writer.transport.abort()  # gone before any reply
    await wait_until(lambda: handler.active_transactions == 0, timeout_s=10, message="ended")
    await handler.drain()
    assert [t.rcpt_tos for t in upstream.transactions] == [["r0@example.net"]]
    assert sum(c.startswith("MAIL") for c in upstream.commands) == 1
