"""STARTTLS from the client and what the relay keeps across it (RFC 3207 §4.2).

After the TLS handshake the client must forget what it knew, and the server
must too: aiosmtpd starts a new session.  These tests check that the old
session's upstream side goes with it (no transaction left open upstream, no
connection left behind) and that, as Postfix does, STARTTLS inside a mail
transaction is refused with ``503 5.5.1``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from smtp_tracker.smtp import replies
from tests.support.waiting import wait_until

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: tls\r\n\r\nhello\r\n"


@pytest.fixture
async def tls_relay(relay_factory: Any, cert_pem_path: Path, key_pem_path: Path) -> Application:
    """smtp-tracker offering STARTTLS to its clients, without the upstream pool: each
    session's own upstream connection is what these tests follow across STARTTLS."""
    app: Application = await relay_factory(
        tls_cert=str(cert_pem_path), tls_key=str(key_pem_path), upstream_pool_size=0
    )
    return app


@pytest.fixture
async def plain_client(
    tls_relay: Application, client_ssl_context: ssl.SSLContext
) -> AsyncIterator[aiosmtplib.SMTP]:
    """A client connected in plaintext, EHLO done, STARTTLS offered but not yet used."""
    host, port = tls_relay.smtp_address
    smtp = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, tls_context=client_ssl_context, timeout=10
    )
    await smtp.connect()
    await smtp.ehlo(hostname="postfix.test")
    assert smtp.supports_extension("starttls")
    yield smtp
    if smtp.is_connected:
        try:
            await smtp.quit()
        except aiosmtplib.SMTPException:
            smtp.close()


async def _relay_after_tls(smtp: aiosmtplib.SMTP) -> None:
    await smtp.starttls(server_hostname="localhost")
    await smtp.ehlo(hostname="postfix.test")
    errors, _ = await smtp.sendmail("carol@example.org", ["dave@example.net"], MESSAGE)
    assert errors == {}


async def _quit_and_settle(smtp: aiosmtplib.SMTP, app: Application, upstream: Any) -> None:
    await smtp.quit()
    await wait_until(
        lambda: not upstream.connections, timeout_s=10, message="upstream connection left open"
    )
    await app.handler.drain()
    assert app.handler.active_transactions == 0


async def test_starttls_inside_a_transaction_is_503_as_postfix_says(
    plain_client: aiosmtplib.SMTP, tls_relay: Application, upstream: Any
) -> None:
    """RFC 3207 §4: the client SHOULD NOT; Postfix answers 503 5.5.1 and the
    transaction goes on in plaintext."""
    await plain_client.mail("alice@example.org")
    response = await plain_client.execute_command(b"STARTTLS")
    assert (response.code, response.message) == (503, "5.5.1 Error: MAIL transaction in progress")
    assert str(response.code) + " " + response.message == str(replies.R503_TRANSACTION_IN_PROGRESS)
    # the transaction is intact: it completes, in plaintext, without a new MAIL
    await plain_client.rcpt("bob@example.net")
    await plain_client.data(MESSAGE)
    [arrived] = await upstream.wait_for_transactions(1)
    assert (arrived.mail_from, arrived.rcpt_tos) == ("alice@example.org", ["bob@example.net"])
    assert "Subject: tls" in arrived.data.decode()
    assert plain_client.get_transport_info("sslcontext") is None
    await _quit_and_settle(plain_client, tls_relay, upstream)


async def test_starttls_after_a_reset_transaction_leaves_nothing_upstream(
    plain_client: aiosmtplib.SMTP, tls_relay: Application, upstream: Any
) -> None:
    """MAIL opens the upstream connection; after RSET and STARTTLS the old
    session's connection is closed (QUIT), not left for the garbage collector,
    and the next transaction is the only one the upstream sees."""
    await plain_client.mail("alice@example.org")
    await plain_client.rset()
    assert len(upstream.connections) == 1
    await _relay_after_tls(plain_client)
    [arrived] = await upstream.wait_for_transactions(1)
    assert (arrived.mail_from, arrived.rcpt_tos) == ("carol@example.org", ["dave@example.net"])
    # the connection from before STARTTLS said QUIT: one connection is open now
    await wait_until(
        lambda: len(upstream.connections) == 1, timeout_s=10, message="old upstream connection"
    )
    assert upstream.commands.count("QUIT") == 1
    await _quit_and_settle(plain_client, tls_relay, upstream)
    assert upstream.commands.count("QUIT") == 2


@pytest.mark.upstream(mail_reply="451 4.3.0 try again later")
async def test_starttls_after_a_refused_mail_closes_the_old_upstream_connection(
    plain_client: aiosmtplib.SMTP, tls_relay: Application, upstream: Any
) -> None:
    """A MAIL the upstream refused leaves no transaction but an open connection:
    STARTTLS must still close it."""
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await plain_client.mail("alice@example.org")
    assert refused.value.code == 451
    assert len(upstream.connections) == 1
    await plain_client.starttls(server_hostname="localhost")
    await plain_client.ehlo(hostname="postfix.test")
    await wait_until(
        lambda: not upstream.connections, timeout_s=10, message="old upstream connection"
    )
    await _quit_and_settle(plain_client, tls_relay, upstream)


async def test_starttls_twice_is_refused(
    plain_client: aiosmtplib.SMTP, tls_relay: Application, upstream: Any
) -> None:
    """A second STARTTLS inside TLS is refused (Postfix: 554 5.5.1 Error: TLS already active)."""
    await plain_client.starttls(server_hostname="localhost")
    await plain_client.ehlo(hostname="postfix.test")
    response = await plain_client.execute_command(b"STARTTLS")
    assert (response.code, response.message) == (554, "5.5.1 Error: TLS already active")
    errors, _ = await plain_client.sendmail("carol@example.org", ["dave@example.net"], MESSAGE)
    assert errors == {}
    assert len(await upstream.wait_for_transactions(1)) == 1
    await _quit_and_settle(plain_client, tls_relay, upstream)
