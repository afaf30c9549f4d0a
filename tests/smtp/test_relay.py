"""The relay in step: aiosmtplib client → smtp-tracker → aiosmtpd upstream (STARTTLS, AUTH).

Each upstream fault is scripted with ``@pytest.mark.upstream(...)``; every case
checks the exact reply the downstream gets and what reached the upstream.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from tests.support.waiting import wait_until

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: in step\r\n"
    b"Message-ID: <relay-test-1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".leading dot survives dot-stuffing\r\n"
)

ENHANCED = re.compile(r"^\d\.\d{1,3}\.\d{1,3} ")


async def command(client: aiosmtplib.SMTP, *words: str) -> aiosmtplib.SMTPResponse:
    return await client.execute_command(*(w.encode() for w in words))


async def send(
    client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes = MESSAGE
) -> list[aiosmtplib.SMTPResponse]:
    """MAIL, each RCPT, DATA if any recipient was accepted; return every reply."""
    replies = [await command(client, "MAIL", f"FROM:<{sender}>")]
    if replies[0].code != 250:
        return replies
    for recipient in recipients:
        replies.append(await command(client, "RCPT", f"TO:<{recipient}>"))
    if any(r.code == 250 for r in replies[1:]):
        try:
            replies.append(await client.data(data))
        except aiosmtplib.SMTPDataError as exc:
            replies.append(aiosmtplib.SMTPResponse(exc.code, exc.message))
    return replies


async def test_message_arrives_over_starttls_with_auth_and_same_body(
    client: aiosmtplib.SMTP, upstream: Any
) -> None:
    replies = await send(client, "alice@example.org", ["bob@example.net"])
    assert [r.code for r in replies] == [250, 250, 250]
    await upstream.wait_for_transactions(1, timeout_s=10)
    (delivered,) = upstream.transactions
    assert delivered.tls is True
    assert delivered.auth_user == upstream.user
    assert delivered.mail_from == "alice@example.org"
    assert delivered.rcpt_tos == ["bob@example.net"]
    # our trace header first, then the message byte for byte
    assert delivered.data.startswith(b"Received: from postfix.test ([127.0.0.1])\r\n")
    assert delivered.data.endswith(MESSAGE)
    header = delivered.data[: len(delivered.data) - len(MESSAGE)]
    assert header.count(b"\r\n") == 3 and b"by relay.test (smtp-tracker) with ESMTP" in header


async def test_downstream_gets_the_upstreams_own_reply(
    client: aiosmtplib.SMTP, upstream: Any
) -> None:
    replies = await send(client, "alice@example.org", ["bob@example.net"])
    data_reply = replies[-1]
    assert len(upstream.transactions) == 1
    # the upstream's own final reply, queue id and all, is what Postfix sees
    upstream_final = [line for line in upstream.transcript if "queued as" in line]
    assert upstream_final == [f"250 {data_reply.message}"], (upstream_final, data_reply)
    assert ENHANCED.match(data_reply.message), data_reply.message


@pytest.mark.upstream(rcpt_replies={"nobody@example.net": "550 5.1.1 no such user here"})
async def test_one_of_two_recipients_refused_is_passed_on(
    client: aiosmtplib.SMTP, upstream: Any
) -> None:
    replies = await send(client, "alice@example.org", ["nobody@example.net", "bob@example.net"])
    assert [r.code for r in replies] == [250, 550, 250, 250]
    assert replies[1].message == "5.1.1 no such user here"
    (delivered,) = upstream.transactions
    assert delivered.rcpt_tos == ["bob@example.net"]


@pytest.mark.upstream(starttls=False)
async def test_starttls_required_but_not_offered_is_451_4_7_4_and_nothing_in_plaintext(
    client: aiosmtplib.SMTP, upstream: Any
) -> None:
    reply = await command(client, "MAIL", "FROM:<alice@example.org>")
    assert reply.code == 451 and reply.message.startswith("4.7.4 ")
    assert upstream.transactions == []
    assert not any(line.upper().startswith(("MAIL", "AUTH")) for line in upstream.transcript)


@pytest.mark.upstream(cert="untrusted")
async def test_certificate_failing_verification_is_451_4_7_5(
    client: aiosmtplib.SMTP, upstream: Any
) -> None:
    reply = await command(client, "MAIL", "FROM:<alice@example.org>")
    assert reply.code == 451 and reply.message.startswith("4.7.5 ")
    assert not any(line.upper().startswith(("MAIL", "AUTH")) for line in upstream.transcript)


@pytest.mark.upstream(auth_ok=False)
async def test_auth_rejected_is_451_4_7_8(client: aiosmtplib.SMTP, upstream: Any) -> None:
    reply = await command(client, "MAIL", "FROM:<alice@example.org>")
    assert reply.code == 451 and reply.message.startswith("4.7.8 ")
    assert upstream.transactions == []


@pytest.mark.upstream(refuse=True)
async def test_upstream_refusing_connections_is_451_4_4_1(client: aiosmtplib.SMTP) -> None:
    reply = await command(client, "MAIL", "FROM:<alice@example.org>")
    assert reply.code == 451 and reply.message.startswith("4.4.1 ")


@pytest.mark.upstream(greeting="421 4.3.2 busy, come back later")
async def test_upstream_421_greeting_is_a_4xx(client: aiosmtplib.SMTP) -> None:
    reply = await command(client, "MAIL", "FROM:<alice@example.org>")
    assert reply.code == 451 and reply.message == "4.3.2 busy, come back later"


@pytest.mark.upstream(starttls_reply="454 4.7.0 TLS not available due to local problem")
async def test_upstream_454_to_starttls_is_a_4xx(client: aiosmtplib.SMTP, upstream: Any) -> None:
    reply = await command(client, "MAIL", "FROM:<alice@example.org>")
    assert reply.code == 454 and reply.message.startswith("4.7.0 ")
    assert not any(line.upper().startswith("MAIL") for line in upstream.transcript)


@pytest.mark.upstream(mail_reply="451 4.3.0 try again later")
async def test_upstream_4xx_to_mail_is_passed_on(client: aiosmtplib.SMTP) -> None:
    reply = await command(client, "MAIL", "FROM:<alice@example.org>")
    assert (reply.code, reply.message) == (451, "4.3.0 try again later")


@pytest.mark.upstream(mail_reply="550 5.7.1 sender not allowed")
async def test_upstream_5xx_to_mail_is_passed_on(client: aiosmtplib.SMTP) -> None:
    reply = await command(client, "MAIL", "FROM:<alice@example.org>")
    assert (reply.code, reply.message) == (550, "5.7.1 sender not allowed")


@pytest.mark.upstream(data_reply="554 5.6.0 content rejected")
async def test_upstream_5xx_to_data_is_passed_on(client: aiosmtplib.SMTP, upstream: Any) -> None:
    replies = await send(client, "alice@example.org", ["bob@example.net"])
    assert (replies[-1].code, replies[-1].message) == (554, "5.6.0 content rejected")


@pytest.mark.upstream(drop_during_data=True)
async def test_upstream_dropping_during_data_is_451_4_4_2(client: aiosmtplib.SMTP) -> None:
    replies = await send(client, "alice@example.org", ["bob@example.net"], MESSAGE * 2000)
    assert replies[-1].code == 451 and replies[-1].message.startswith("4.4.2 ")


@pytest.mark.upstream(drop_after_data=True)
async def test_upstream_dropping_after_payload_is_451_4_4_2(client: aiosmtplib.SMTP) -> None:
    replies = await send(client, "alice@example.org", ["bob@example.net"])
    assert replies[-1].code == 451 and replies[-1].message.startswith("4.4.2 ")


@pytest.mark.upstream(delay_s={"MAIL": 5.0})
async def test_upstream_too_slow_is_451_4_4_2(relay_factory: Any, upstream: Any) -> None:
    app = await relay_factory(upstream_command_timeout_s=0.5)
    host, port = app.smtp_address
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
        await smtp.ehlo(hostname="postfix.test")
        reply = await command(smtp, "MAIL", "FROM:<alice@example.org>")
        assert reply.code == 451 and reply.message.startswith("4.4.2 ")
        assert "timed out" in reply.message


async def test_connection_lost_later_in_transaction_poisons_it(
    client: aiosmtplib.SMTP, upstream: Any
) -> None:
    assert (await command(client, "MAIL", "FROM:<alice@example.org>")).code == 250
    await upstream.stop()
    reply = await command(client, "RCPT", "TO:<bob@example.net>")
    assert reply.code == 451 and reply.message.startswith("4.4.")
    again = await command(client, "RCPT", "TO:<carol@example.net>")
    assert again.code == 451
    assert (await command(client, "RSET")).code == 250


async def test_dsn_and_smtputf8_parameters_reach_the_upstream_unchanged(
    client: aiosmtplib.SMTP, upstream: Any
) -> None:
    mail = await command(
        client,
        "MAIL",
        "FROM:<alice@example.org>",
        "SMTPUTF8",
        "RET=HDRS",
        "ENVID=Qx+2B1a",
        "BODY=8BITMIME",
        "SIZE=300",
    )
    assert mail.code == 250, mail
    rcpt = await command(
        client,
        "RCPT",
        "TO:<bob@example.net>",
        "NOTIFY=SUCCESS,FAILURE",
        "ORCPT=rfc822;Bob@Example.NET",
    )
    assert rcpt.code == 250, rcpt
    await client.data("Subject: ünïcode\r\n\r\nbody ✓\r\n".encode())
    (delivered,) = upstream.transactions
    assert delivered.mail_options == [
        "SMTPUTF8",
        "RET=HDRS",
        "ENVID=Qx+2B1a",
        "BODY=8BITMIME",
        "SIZE=300",
    ]
    assert delivered.rcpt_options == [["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Example.NET"]]


@pytest.mark.upstream(advertise_dsn=False)
async def test_dsn_parameters_are_not_sent_to_an_upstream_without_dsn(
    client: aiosmtplib.SMTP, upstream: Any
) -> None:
    assert (await command(client, "MAIL", "FROM:<alice@example.org>", "RET=FULL")).code == 250
    assert (await command(client, "RCPT", "TO:<bob@example.net>", "NOTIFY=NEVER")).code == 250
    await client.data(MESSAGE)
    (delivered,) = upstream.transactions
    assert delivered.mail_options == []
    assert delivered.rcpt_options == [[]]


async def test_two_transactions_with_rset_between_do_not_mix(
    client: aiosmtplib.SMTP, upstream: Any
) -> None:
    assert (await command(client, "MAIL", "FROM:<first@example.org>")).code == 250
    assert (await command(client, "RCPT", "TO:<one@example.net>")).code == 250
    assert (await command(client, "RSET")).code == 250
    replies = await send(client, "second@example.org", ["two@example.net"], MESSAGE)
    assert [r.code for r in replies] == [250, 250, 250]
    replies = await send(
        client, "third@example.org", ["three@example.net"], MESSAGE.replace(b"Hello", b"Bye")
    )
    assert [r.code for r in replies] == [250, 250, 250]
    first, second = upstream.transactions
    assert (first.mail_from, first.rcpt_tos) == ("second@example.org", ["two@example.net"])
    assert (second.mail_from, second.rcpt_tos) == ("third@example.org", ["three@example.net"])
    assert b"Hello Bob" in first.data and b"Bye Bob" in second.data
    # one upstream connection served the whole downstream session
    assert sum(1 for line in upstream.transcript if line.upper().startswith("EHLO")) == 2  # +TLS


async def test_client_outside_allowed_clients_is_refused(relay_factory: Any) -> None:
    app = await relay_factory(allowed_clients=["192.0.2.0/24"])
    host, port = app.smtp_address
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as caught:
        await smtp.connect()
    assert caught.value.code == 554 and caught.value.message.startswith("5.7.1 ")


async def test_auth_is_not_offered_downstream(client: aiosmtplib.SMTP) -> None:
    assert not client.supports_extension("auth")
    for extension in ("size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes", "dsn"):
        assert client.supports_extension(extension), extension
    reply = await command(client, "AUTH", "PLAIN", "AGFsaWNlAHNlY3JldA==")
    assert reply.code == 502


async def test_client_dropping_mid_transaction_relays_nothing(
    relay: Application, upstream: Any
) -> None:
    host, port = relay.smtp_address
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
    await smtp.connect()
    await smtp.ehlo(hostname="postfix.test")
    assert (await command(smtp, "MAIL", "FROM:<alice@example.org>")).code == 250
    assert (await command(smtp, "RCPT", "TO:<bob@example.net>")).code == 250
    smtp.close()
    await wait_until(
        lambda: any(line.upper().startswith(("RSET", "QUIT")) for line in upstream.transcript),
        timeout_s=10,
        message="smtp-tracker never ended the upstream transaction",
    )
    await relay.handler.drain()
    assert upstream.transactions == []
    assert relay.handler.active_transactions == 0


@pytest.mark.upstream(delay_s={"QUIT": 2.0})
async def test_client_hanging_up_right_after_quit_still_closes_the_upstream(
    relay_factory: Any, upstream: Any
) -> None:
    """Postfix may close right after its QUIT, while we wait for the upstream's 221:
    the hook is cancelled there, and the upstream connection must still be closed.

    Without the pool (``upstream_pool_size = 0``): with it, the connection is kept
    for the next session and not closed at the client's QUIT (tests/smtp/test_pool.py)."""
    relay = await relay_factory(upstream_pool_size=0)
    host, port = relay.smtp_address
    reader, writer = await asyncio.open_connection(host, port)
    await reader.readline()
    for line in (b"EHLO postfix.test", b"MAIL FROM:<alice@example.org>", b"RSET"):
        writer.write(line + b"\r\n")
        while (reply := await reader.readline())[3:4] != b" ":
            pass
        assert reply.startswith(b"250"), reply
    assert len(upstream.connections) == 1
    writer.write(b"QUIT\r\n")
    await wait_until(
        lambda: upstream.transcript[-1:] == ["QUIT"],
        timeout_s=10,
        message="QUIT never reached the upstream",
    )
    writer.close()
    await relay.handler.drain()
    await wait_until(
        lambda: not upstream.connections,
        timeout_s=1.5,
        message="the relay kept its upstream connection after the client left",
    )
