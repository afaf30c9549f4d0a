"""The test infrastructure itself: the upstream test server and the private Postfix.

(a) an aiosmtplib client against the upstream: TLS, AUTH, parameters, each fault;
(b) Postfix delivering straight to the upstream (TLS required, SASL);
(c) Postfix deferring while the upstream is down, then delivering once.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiosmtplib
import pytest

from tests.support.postfix import (
    Postfix,
    sasl_missing_reason,
    smarthost_settings,
    without_bounces,
)
from tests.support.upstream import Transaction, UpstreamServer, options_from_markers
from tests.support.waiting import wait_until

PostfixFactory = Callable[..., Awaitable[Postfix]]

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: infrastructure\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".a line starting with a dot\r\n"
)


async def connect(upstream: UpstreamServer, **kwargs: object) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname=upstream.host, port=upstream.port, start_tls=False, timeout=10, **kwargs
    )  # type: ignore[arg-type]
    await smtp.connect()
    await smtp.ehlo(hostname="client.test")
    return smtp


async def secured(upstream: UpstreamServer, context: ssl.SSLContext) -> aiosmtplib.SMTP:
    smtp = await connect(upstream)
    await smtp.starttls(tls_context=context)
    await smtp.ehlo(hostname="client.test")
    return smtp


@pytest.fixture
async def client(
    upstream: UpstreamServer, client_ssl_context: ssl.SSLContext
) -> AsyncIterator[aiosmtplib.SMTP]:
    """STARTTLS done, logged in as the test user."""
    smtp = await secured(upstream, client_ssl_context)
    await smtp.login(upstream.user, upstream.password)
    yield smtp
    smtp.close()


async def command(smtp: aiosmtplib.SMTP, *words: str) -> aiosmtplib.SMTPResponse:
    return await smtp.execute_command(*(w.encode() for w in words))


# -- (a) the upstream, from an aiosmtplib client ------------------------------------------


async def test_starttls_is_required_before_mail(upstream: UpstreamServer) -> None:
    smtp = await connect(upstream)
    assert smtp.supports_extension("starttls")
    assert not smtp.supports_extension("auth")  # AUTH only after TLS
    reply = await command(smtp, "MAIL", "FROM:<alice@example.org>")
    assert (reply.code, reply.message) == (530, "5.7.0 Must issue a STARTTLS command first")
    smtp.close()
    assert "MAIL FROM:<alice@example.org>" in upstream.transcript
    assert upstream.transactions == []


async def test_auth_is_required_after_starttls(
    upstream: UpstreamServer, client_ssl_context: ssl.SSLContext
) -> None:
    smtp = await secured(upstream, client_ssl_context)
    assert smtp.supports_extension("auth")
    assert not smtp.supports_extension("starttls")
    reply = await command(smtp, "MAIL", "FROM:<alice@example.org>")
    assert (reply.code, reply.message) == (530, "5.7.0 Authentication required")
    smtp.close()


@pytest.mark.parametrize("mechanism", ["auth_plain", "auth_login"])
async def test_auth_then_a_message_is_recorded_exactly(
    upstream: UpstreamServer, client_ssl_context: ssl.SSLContext, mechanism: str
) -> None:
    smtp = await secured(upstream, client_ssl_context)
    auth = await getattr(smtp, mechanism)(upstream.user, upstream.password)
    assert (auth.code, auth.message) == (235, "2.7.0 Authentication successful")
    assert (await smtp.mail("alice@example.org")).message == "2.1.0 Ok"
    assert (await smtp.rcpt("bob@example.net")).message == "2.1.5 Ok"
    final = await smtp.data(MESSAGE)
    assert (final.code, final.message) == (250, "2.0.0 Ok: queued as UP000001")
    await smtp.quit()
    assert upstream.transactions == [
        Transaction(
            mail_from="alice@example.org",
            mail_options=[],
            rcpt_tos=["bob@example.net"],
            rcpt_options=[[]],
            data=MESSAGE,
            tls=True,
            auth_user="relay-user",
            helo="client.test",
            queue_id="UP000001",
        )
    ]
    assert "AUTH <redacted>" in upstream.transcript
    assert not any(upstream.password in line for line in upstream.transcript)
    assert upstream.commands[-1] == "QUIT" and upstream.transcript[-1] == "221 2.0.0 Bye"


async def test_wrong_password_is_535(
    upstream: UpstreamServer, client_ssl_context: ssl.SSLContext
) -> None:
    smtp = await secured(upstream, client_ssl_context)
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
        await smtp.auth_plain(upstream.user, "wrong")
    assert caught.value.code == 535
    smtp.close()


async def test_dsn_smtputf8_and_null_sender_parameters_arrive_unchanged(
    client: aiosmtplib.SMTP, upstream: UpstreamServer
) -> None:
    mail = await command(
        client,
        "MAIL",
        "FROM:<>",
        "RET=hdrs",
        "ENVID=Qx+2B1a",
        "BODY=8BITMIME",
        "SIZE=300",
        "SMTPUTF8",
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
    assert (await command(client, "RCPT", "TO:<carol@example.net>")).code == 250
    await client.data("Subject: ünïcode\r\n\r\nbody ✓\r\n".encode())
    (delivered,) = await upstream.wait_for_transactions(1, timeout_s=5)
    assert delivered.mail_from == ""
    assert delivered.mail_options == [
        "RET=hdrs",
        "ENVID=Qx+2B1a",
        "BODY=8BITMIME",
        "SIZE=300",
        "SMTPUTF8",
    ]
    assert delivered.rcpt_tos == ["bob@example.net", "carol@example.net"]
    assert delivered.rcpt_options == [
        ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Example.NET"],
        [],
    ]
    assert delivered.data == "Subject: ünïcode\r\n\r\nbody ✓\r\n".encode()
    assert without_bounces(upstream.transactions) == []


async def test_every_extension_is_advertised_by_default(client: aiosmtplib.SMTP) -> None:
    for extension in (
        "size",
        "8bitmime",
        "smtputf8",
        "pipelining",
        "enhancedstatuscodes",
        "dsn",
        "auth",
    ):
        assert client.supports_extension(extension), extension
    assert client.esmtp_extensions["size"] == str(10 * 1024 * 1024)
    assert client.server_auth_methods == ["plain", "login"]


@pytest.mark.upstream(advertise_dsn=False, advertise_smtputf8=False)
async def test_switched_off_extensions_are_not_advertised_and_refused(
    client: aiosmtplib.SMTP,
) -> None:
    assert not client.supports_extension("dsn")
    assert not client.supports_extension("smtputf8")
    assert client.supports_extension("8bitmime")
    reply = await command(client, "MAIL", "FROM:<alice@example.org>", "RET=FULL")
    assert (reply.code, reply.message) == (555, "5.5.4 Unsupported option: RET=FULL")
    assert (await command(client, "MAIL", "FROM:<alice@example.org>")).code == 250
    reply = await command(client, "RCPT", "TO:<bob@example.net>", "NOTIFY=NEVER")
    assert reply.code == 555


@pytest.mark.upstream(starttls=False)
async def test_starttls_false_does_not_offer_it(upstream: UpstreamServer) -> None:
    smtp = await connect(upstream)
    assert not smtp.supports_extension("starttls")
    reply = await command(smtp, "STARTTLS")
    assert (reply.code, reply.message) == (502, "5.5.1 Error: command not implemented")
    # without TLS there is no AUTH, and AUTH is still required
    assert (await command(smtp, "MAIL", "FROM:<a@example.org>")).code == 530
    smtp.close()


@pytest.mark.upstream(require_starttls=False, auth_required=False)
async def test_plaintext_without_auth_when_both_are_switched_off(upstream: UpstreamServer) -> None:
    smtp = await connect(upstream)
    await smtp.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
    smtp.close()
    (delivered,) = upstream.transactions
    assert (delivered.tls, delivered.auth_user) == (False, None)


@pytest.mark.upstream(cert="untrusted")
async def test_untrusted_certificate_fails_verification(
    upstream: UpstreamServer, client_ssl_context: ssl.SSLContext
) -> None:
    smtp = await connect(upstream)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        await smtp.starttls(tls_context=client_ssl_context)
    smtp.close()
    assert not any(line.startswith(("MAIL", "AUTH")) for line in upstream.transcript)


@pytest.mark.upstream(auth_ok=False)
async def test_auth_ok_false_refuses_the_right_password(
    client_ssl_context: ssl.SSLContext, upstream: UpstreamServer
) -> None:
    smtp = await secured(upstream, client_ssl_context)
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
        await smtp.auth_plain(upstream.user, upstream.password)
    assert (caught.value.code, caught.value.message) == (535, "5.7.8 Error: authentication failed")
    smtp.close()


@pytest.mark.upstream(refuse=True)
async def test_refuse_until_started_on_the_same_port(
    upstream: UpstreamServer, client_ssl_context: ssl.SSLContext
) -> None:
    port = upstream.port
    with pytest.raises(aiosmtplib.SMTPConnectError) as caught:
        await connect(upstream)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    await upstream.start()
    assert upstream.port == port
    smtp = await secured(upstream, client_ssl_context)
    assert (await smtp.noop()).code == 250
    smtp.close()


async def test_stop_drops_open_connections_and_start_serves_again(
    upstream: UpstreamServer, client: aiosmtplib.SMTP, client_ssl_context: ssl.SSLContext
) -> None:
    assert (await client.mail("alice@example.org")).code == 250
    await upstream.stop()
    assert upstream.connections == set()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.rcpt("bob@example.net")
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await connect(upstream)
    await upstream.start()
    again = await secured(upstream, client_ssl_context)
    await again.login(upstream.user, upstream.password)
    await again.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
    again.close()
    assert [t.rcpt_tos for t in upstream.transactions] == [["bob@example.net"]]


@pytest.mark.upstream(greeting="421 4.3.2 busy, come back later")
async def test_greeting_421_then_close(upstream: UpstreamServer) -> None:
    smtp = aiosmtplib.SMTP(hostname=upstream.host, port=upstream.port, start_tls=False, timeout=10)
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as caught:
        await smtp.connect()
    assert (caught.value.code, caught.value.message) == (421, "4.3.2 busy, come back later")


@pytest.mark.upstream(starttls_reply="454 4.7.0 TLS not available due to local problem")
async def test_starttls_reply_454(
    upstream: UpstreamServer, client_ssl_context: ssl.SSLContext
) -> None:
    smtp = await connect(upstream)
    with pytest.raises(aiosmtplib.SMTPResponseException) as caught:
        await smtp.starttls(tls_context=client_ssl_context)
    assert caught.value.code == 454
    # still plaintext, still STARTTLS required
    assert (await command(smtp, "MAIL", "FROM:<a@example.org>")).code == 530
    smtp.close()


@pytest.mark.upstream(mail_reply="451 4.3.0 try again later")
async def test_mail_reply(client: aiosmtplib.SMTP) -> None:
    reply = await command(client, "MAIL", "FROM:<alice@example.org>")
    assert (reply.code, reply.message) == (451, "4.3.0 try again later")
    # the transaction was not opened
    assert (await command(client, "RCPT", "TO:<bob@example.net>")).code == 503


@pytest.mark.upstream(rcpt_replies={"nobody@example.net": "550 5.1.1 no such user here"})
async def test_rcpt_replies(client: aiosmtplib.SMTP, upstream: UpstreamServer) -> None:
    assert (await command(client, "MAIL", "FROM:<alice@example.org>")).code == 250
    refused = await command(client, "RCPT", "TO:<nobody@example.net>")
    assert (refused.code, refused.message) == (550, "5.1.1 no such user here")
    assert (await command(client, "RCPT", "TO:<bob@example.net>")).code == 250
    await client.data(MESSAGE)
    (delivered,) = upstream.transactions
    assert delivered.rcpt_tos == ["bob@example.net"]


@pytest.mark.upstream(data_reply="554 5.6.0 content rejected")
async def test_data_reply(client: aiosmtplib.SMTP, upstream: UpstreamServer) -> None:
    with pytest.raises(aiosmtplib.SMTPDataError) as caught:
        await client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
    assert (caught.value.code, caught.value.message) == (554, "5.6.0 content rejected")
    assert upstream.transactions == []
    assert "554 5.6.0 content rejected" in upstream.transcript


@pytest.mark.upstream(data_command_reply="451 4.3.0 not now")
async def test_data_command_reply(client: aiosmtplib.SMTP, upstream: UpstreamServer) -> None:
    with pytest.raises(aiosmtplib.SMTPDataError) as caught:
        await client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
    assert (caught.value.code, caught.value.message) == (451, "4.3.0 not now")
    assert upstream.transactions == []


@pytest.mark.upstream(drop_during_data=True)
async def test_drop_during_data(client: aiosmtplib.SMTP, upstream: UpstreamServer) -> None:
    await client.mail("alice@example.org")
    await client.rcpt("bob@example.net")
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.data(MESSAGE * 2000)
    assert upstream.transactions == []
    assert upstream.transcript[-1].startswith("354 ")


@pytest.mark.upstream(drop_after_data=True)
async def test_drop_after_data(client: aiosmtplib.SMTP, upstream: UpstreamServer) -> None:
    await client.mail("alice@example.org")
    await client.rcpt("bob@example.net")
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.data(MESSAGE)
    assert upstream.transactions == []
    assert upstream.transcript[-1].startswith("354 ")


@pytest.mark.upstream(delay_s={"MAIL": 5.0})
async def test_delay_makes_the_reply_late(client: aiosmtplib.SMTP) -> None:
    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        await client.mail("alice@example.org", timeout=0.3)


@pytest.mark.upstream(delay_s={"EOM": 0.3})
async def test_delay_after_the_payload(client: aiosmtplib.SMTP, upstream: UpstreamServer) -> None:
    await client.mail("alice@example.org")
    await client.rcpt("bob@example.net")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.data(MESSAGE)
    assert loop.time() - started >= 0.3
    assert len(upstream.transactions) == 1


async def test_wait_for_transactions_times_out_with_the_transcript(
    upstream: UpstreamServer,
) -> None:
    with pytest.raises(AssertionError, match=r"accepted 0 of 1 transaction"):
        await upstream.wait_for_transactions(1, timeout_s=0.1)


def test_markers_are_merged_and_unknown_options_refused() -> None:
    near = pytest.mark.upstream(mail_reply="451 4.3.0 later").mark
    far = pytest.mark.upstream(mail_reply="550 5.0.0 no", starttls=False).mark
    options = options_from_markers([near, far])
    assert (options.mail_reply, options.starttls) == ("451 4.3.0 later", False)
    with pytest.raises(TypeError, match="drop_in_data"):
        options_from_markers([pytest.mark.upstream(drop_in_data=True).mark])
    with pytest.raises(ValueError, match="SMTP reply"):
        options_from_markers([pytest.mark.upstream(mail_reply="try later").mark])


async def test_wait_until_returns_the_value_or_fails_with_the_message() -> None:
    values = iter([0, 0, 7])
    assert await wait_until(lambda: next(values), timeout_s=1, message="never") == 7
    with pytest.raises(AssertionError, match=r"^nothing happened \(waited 0.05 s\)$"):
        await wait_until(lambda: False, timeout_s=0.05, message="nothing happened")


# -- (b) Postfix straight to the upstream ------------------------------------------------

sasl_missing = pytest.mark.skipif(
    sasl_missing_reason() is not None, reason=sasl_missing_reason() or ""
)
swaks_missing = pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks is not installed (apt-get install swaks)"
)


async def smarthost_postfix(postfix_factory: PostfixFactory, upstream: UpstreamServer) -> Postfix:
    """Postfix delivering straight to ``upstream``: TLS required, CA checked, SASL."""
    return await postfix_factory(
        upstream.port,
        **smarthost_settings(
            upstream.address,
            ca_file=upstream.ca_file,
            user=upstream.user,
            password=upstream.password,
        ),
    )


@pytest.mark.postfix
@sasl_missing
async def test_postfix_delivers_a_sendmail_message_over_tls_with_auth(
    postfix_factory: PostfixFactory, upstream: UpstreamServer
) -> None:
    postfix = await smarthost_postfix(postfix_factory, upstream)
    await postfix.send(
        "alice@example.org",
        ["bob@example.net"],
        MESSAGE,
        dsn_notify=["success", "failure"],
        ret="hdrs",
        envid="Env-1",
    )
    (delivered,) = await upstream.wait_for_transactions(1, timeout_s=20)
    assert (delivered.tls, delivered.auth_user) == (True, "relay-user")
    assert delivered.helo == "postfix.test.invalid"
    assert (delivered.mail_from, delivered.rcpt_tos) == ("alice@example.org", ["bob@example.net"])
    assert {"RET=HDRS", "ENVID=Env-1"} <= set(delivered.mail_options)
    assert "NOTIFY=SUCCESS,FAILURE" in delivered.rcpt_options[0]
    # Postfix adds its header lines; the body arrives intact, the dotted line too
    assert delivered.data.endswith(b"\r\nHello Bob.\r\n.a line starting with a dot\r\n")
    await postfix.wait_for_log(r"status=sent \(250 2\.0\.0 Ok: queued as UP000001\)")
    assert postfix.log_matches(r"Trusted TLS connection established to 127\.0\.0\.1")
    await postfix.wait_until_queue_empty(timeout_s=10)


@pytest.mark.postfix
@sasl_missing
@swaks_missing
async def test_postfix_relays_a_swaks_message_from_its_smtpd(
    postfix_factory: PostfixFactory, upstream: UpstreamServer
) -> None:
    postfix = await smarthost_postfix(postfix_factory, upstream)
    process = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        postfix.smtpd_address,
        "--from",
        "carol@example.org",
        "--to",
        "dan@example.net",
        "--helo",
        "swaks.test",
        "--body",
        "Hello from swaks",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, out.decode()
    (delivered,) = await upstream.wait_for_transactions(1, timeout_s=20)
    assert (delivered.mail_from, delivered.rcpt_tos) == ("carol@example.org", ["dan@example.net"])
    assert b"Hello from swaks" in delivered.data
    assert delivered.data.startswith(b"Received: from swaks.test (unknown [127.0.0.1])")
    await postfix.wait_until_queue_empty(timeout_s=10)


# -- (c) upstream down: Postfix defers, then delivers once ------------------------------


@pytest.mark.postfix
@sasl_missing
@pytest.mark.upstream(refuse=True)
async def test_postfix_defers_while_the_upstream_is_down_then_delivers_once(
    postfix_factory: PostfixFactory, upstream: UpstreamServer
) -> None:
    postfix = await smarthost_postfix(postfix_factory, upstream)
    await postfix.send("alice@example.org", ["bob@example.net"], MESSAGE)
    reasons = await wait_until(
        postfix.deferred_reasons, timeout_s=20, message="the message was never deferred"
    )
    assert reasons == [f"connect to 127.0.0.1[127.0.0.1]:{upstream.port}: Connection refused"]
    await postfix.wait_for_log(r"dsn=4\.4\.1, status=deferred \(connect to .*Connection refused")

    await upstream.start()
    await postfix.flush()
    await upstream.wait_for_transactions(1, timeout_s=20)
    await postfix.wait_until_queue_empty(timeout_s=20)
    assert len(upstream.transactions) == 1
    assert len(postfix.log_matches(r"to=<bob@example\.net>.* status=sent ")) == 1


@pytest.mark.postfix
@sasl_missing
@pytest.mark.upstream(mail_reply="451 4.3.0 try again later")
async def test_postfix_defers_on_a_4xx_reply_with_the_reply_as_reason(
    postfix_factory: PostfixFactory, upstream: UpstreamServer
) -> None:
    postfix = await smarthost_postfix(postfix_factory, upstream)
    await postfix.send("alice@example.org", ["bob@example.net"], MESSAGE)
    reasons = await wait_until(
        postfix.deferred_reasons, timeout_s=20, message="the message was never deferred"
    )
    assert reasons == [
        "host 127.0.0.1[127.0.0.1] said: 451 4.3.0 try again later (in reply to MAIL FROM command)"
    ]

    upstream.configure(mail_reply=None)
    await postfix.flush()
    (delivered,) = await upstream.wait_for_transactions(1, timeout_s=20)
    await postfix.wait_until_queue_empty(timeout_s=20)
    assert delivered.mail_from == "alice@example.org"
    assert len(upstream.transactions) == 1
