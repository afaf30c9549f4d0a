"""What the probe of issue 12 found on the SMTP side, each with the probe's own input.

Raw SMTP over real sockets (the :class:`~tests.smtp.test_hostile.Raw` client,
or a blocking socket where the bytes must be in the kernel before the relay's
loop runs) against smtp-tracker started in the test's loop, relaying to the
scripted upstream.
"""

from __future__ import annotations

import ast
import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import aiosmtplib
import aiosmtplib.protocol
import pytest

from smtp_tracker.app import Application
from smtp_tracker.errors import CommandRejected
from smtp_tracker.smtp import replies, server
from smtp_tracker.smtp.parameters import sendable
from smtp_tracker.smtp.upstream import UpstreamSession
from tests.smtp.test_hostile import Raw, greeted, open_transaction, upstream_commands
from tests.support.serve import launch_serve
from tests.support.waiting import wait_until

SYNC_ERROR = "554 5.5.0 Error: SMTP protocol synchronization"
CONTROL = "501 5.5.2 control character in command"


# -- the import circle (issue 11) ---------------------------------------------------------


def test_the_protocol_module_does_not_import_the_handler() -> None:
    """server.py names the hooks it calls (RelayHooks); handler.py imports server.py, not
    back: no import of handler.py in server.py at all, not even for type checking."""
    tree = ast.parse(Path(server.__file__).read_text(encoding="utf-8"))
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    imported |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert "smtp_tracker.smtp" in {m.rpartition(".")[0] for m in imported}  # the check sees them
    assert "smtp_tracker.smtp.handler" not in imported
    assert "smtp_tracker.smtp.listener" not in imported


# -- item 3: a TAB in an address ------------------------------------------------------------


async def test_a_tab_in_a_recipient_refuses_that_recipient_alone(
    relay: Application, upstream: Any
) -> None:
    """RCPT TO:<"c\\td"@d.example> gets 501 5.5.2; the others, the message and the
    upstream connection go on (was: 451 4.3.0, the upstream dropped, the message deferred)."""
    async with greeted(relay) as client:
        await open_transaction(client)  # bob0, accepted upstream
        assert await client.command(b'RCPT TO:<"c\td"@d.example>') == CONTROL
        assert await client.command("RCPT TO:<carol@example.net>") == "250 2.1.5 Ok"
        assert len(upstream.connections) == 1
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(b"Subject: tab\r\n\r\nok\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as UP")
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.rcpt_tos == ["bob0@example.net", "carol@example.net"]
    assert len(upstream_commands(upstream, "MAIL")) == 1
    assert not any("\t" in c for c in upstream.commands)
    assert relay.handler.counters["upstream_failures"] == 0


async def test_a_tab_in_the_sender_refuses_that_mail_alone(
    relay: Application, upstream: Any
) -> None:
    async with greeted(relay) as client:
        assert await client.command(b'MAIL FROM:<"a\tb"@example.org>') == CONTROL
        await open_transaction(client)
        assert (await client.command("DATA")).startswith("354 ")
        client.writer.write(b"Subject: tab\r\n\r\nok\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as UP")
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.mail_from == "alice@example.org"
    assert not any("\t" in c for c in upstream.commands)


async def test_an_argument_aiosmtplib_would_refuse_is_never_sent_and_the_connection_stays(
    relay: Application, upstream: Any
) -> None:
    """The upstream side checks each argument before aiosmtplib sees it (a second line of
    defence behind the protocol's): CommandRejected, and the connection is still open."""
    session = UpstreamSession(relay.handler._settings)
    try:
        assert (await session.mail("alice@example.org", [])).code == 250
        with pytest.raises(CommandRejected) as refused:
            await session.rcpt('"c\td"@d.example', [])
        assert refused.value.reply == replies.R501_CONTROL_CHARACTER
        assert session.is_open
        assert (await session.rcpt("bob@example.net", [])).code == 250
    finally:
        await session.close()


@pytest.mark.parametrize("byte", range(128))
async def test_sendable_refuses_exactly_what_aiosmtplib_refuses(byte: int) -> None:
    """A canary for aiosmtplib's command-argument check (protocol.execute_command):
    an unconnected protocol raises ValueError for an argument it refuses, and
    SMTPServerDisconnected (not connected) for one it would send."""
    argument = b"a" + bytes([byte]) + b"b"
    protocol = aiosmtplib.protocol.SMTPProtocol()
    try:
        await protocol.execute_command(b"RCPT", argument)
    except ValueError:
        refused = True
    except aiosmtplib.SMTPServerDisconnected:
        refused = False
    assert sendable(argument) is not refused
    assert sendable(argument.decode("latin-1")) is not refused


# -- item 9: pipelining before the greeting, before our 354 -----------------------------------


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


WHOLE_TRANSACTION = (
    b"EHLO probe.test\r\n"
    b"MAIL FROM:<alice@example.org>\r\n"
    b"RCPT TO:<bob@example.net>\r\n"
    b"DATA\r\n"
    b"Subject: too early\r\n\r\nhello\r\n.\r\n"
    b"QUIT\r\n"
)


async def test_a_client_that_talks_before_the_greeting_is_refused_and_nothing_is_relayed(
    relay: Application, upstream: Any
) -> None:
    """The probe's input: a whole transaction written before our 220 (Postfix: 554 5.5.0)."""
    sock = socket.create_connection(relay.smtp_address)
    try:
        sock.sendall(WHOLE_TRANSACTION)  # in the kernel before the relay's loop accepts
        sock.settimeout(10)
        said = await asyncio.to_thread(_read_all, sock)
    finally:
        sock.close()
    assert said == SYNC_ERROR.encode() + b"\r\n"
    assert upstream.commands == []
    assert relay.handler.counters["relayed"] == 0


async def test_commands_pipelined_after_ehlo_before_its_reply_are_refused(
    relay: Application, upstream: Any
) -> None:
    """RFC 2920 §3.1: EHLO ends a group; what follows it unanswered is out of step."""
    async with greeted(relay, ehlo=False) as client:
        client.writer.write(b"EHLO probe.test\r\nMAIL FROM:<alice@example.org>\r\n")
        assert await client.reply() == SYNC_ERROR
        assert await client.closed()
    assert upstream.commands == []


async def test_message_content_sent_before_our_354_is_refused_and_never_relayed(
    relay: Application, upstream: Any
) -> None:
    async with greeted(relay) as client:
        client.writer.write(
            b"MAIL FROM:<alice@example.org>\r\n"
            b"RCPT TO:<bob@example.net>\r\n"
            b"DATA\r\n"
            b"Subject: too early\r\n\r\nhello\r\n.\r\n"
        )
        assert await client.reply() == "250 2.1.0 Ok"
        assert await client.reply() == "250 2.1.5 Ok"
        assert await client.reply() == SYNC_ERROR
        assert await client.closed()
    await relay.handler.drain()
    assert upstream_commands(upstream, "DATA") == []
    assert upstream.transactions == []
    assert relay.handler.active_transactions == 0
    assert relay.handler.counters["aborted"] == 1


async def test_rfc_2920_pipelining_after_ehlo_is_kept(relay: Application, upstream: Any) -> None:
    """MAIL, RCPTs and DATA in one write (as Postfix sends them), content after our 354."""
    async with greeted(relay) as client:
        client.writer.write(
            b"MAIL FROM:<alice@example.org>\r\n"
            b"RCPT TO:<bob@example.net>\r\n"
            b"RCPT TO:<carol@example.net>\r\n"
            b"DATA\r\n"
        )
        assert await client.reply() == "250 2.1.0 Ok"
        assert await client.reply() == "250 2.1.5 Ok"
        assert await client.reply() == "250 2.1.5 Ok"
        assert (await client.reply()).startswith("354 ")
        client.writer.write(b"Subject: pipelined\r\n\r\nok\r\n.\r\nQUIT\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as UP")
        assert await client.reply() == "221 2.0.0 Bye"
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.rcpt_tos == ["bob@example.net", "carol@example.net"]


# -- item 10: QUIT, then gone without reading our 221 ---------------------------------------------


async def test_a_client_that_quits_without_reading_221_logs_no_error(
    upstream: Any, ca_pem_path: Path, tmp_path: Path
) -> None:
    """Postfix's smtp client (smtp_skip_quit_response = yes) sends QUIT and closes at
    once; about 1 session in 8 logged an IncompleteReadError traceback at error level.

    ``serve`` as a process, as the probe ran it: in the test's own loop the upstream's
    221 never arrives in the same turn as the client's end of stream, which the race
    needs.  Counted in sessions, not seconds.  Without the upstream pool, so that
    each session's upstream connection ends with it, as the race needs (a kept
    one would stay open until its idle timeout, as long as this test waits).
    """
    sessions = 80
    served = await launch_serve(
        upstream, ca_pem_path, tmp_path / "data", "--upstream-pool-size", "0"
    )
    try:
        for n in range(sessions):
            client = await Raw.open(("127.0.0.1", served.port))
            assert (await client.reply()).startswith("220 ")
            assert (await client.command("EHLO postfix.test")).startswith("250 ")
            await open_transaction(client)
            assert (await client.command("DATA")).startswith("354 ")
            client.writer.write(f"Subject: {n}\r\n\r\nok\r\n.\r\n".encode())
            assert (await client.reply()).startswith("250 2.0.0 Ok: queued as UP")
            client.writer.write(b"QUIT\r\n")
            client.writer.close()  # gone, 221 unread
        await upstream.wait_for_transactions(sessions)
        await wait_until(
            lambda: not upstream.connections, timeout_s=30, message="upstream sessions left open"
        )
    finally:
        await served.finish()
    log = "".join(served.log)
    assert "Traceback" not in log
    assert not re.search(r"smtpd\[\d+\]: (error|warning|critical):", log)
    assert len(re.findall(r"status=sent", log)) == sessions


# -- item 11: enhanced status codes everywhere ----------------------------------------------------


async def test_vrfy_expn_and_help_carry_enhanced_status_codes(relay: Application) -> None:
    async with greeted(relay) as client:
        assert await client.command("VRFY bob@example.net") == (
            "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
        )
        assert await client.command("VRFY") == "501 5.5.4 syntax: VRFY <address>"
        assert await client.command("EXPN staff") == "502 5.5.1 EXPN not implemented"
        listed = "DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"
        assert await client.command("HELP") == f"214 2.0.0 Supported commands: {listed}"
        assert await client.command("HELP mail") == (
            "214 2.0.0 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"
        )
        assert await client.command("HELP FOO") == f"501 5.5.4 Supported commands: {listed}"


async def test_starttls_is_answered_220_2_0_0(
    relay_factory: Any, cert_pem_path: Path, key_pem_path: Path
) -> None:
    relay = await relay_factory(tls_cert=str(cert_pem_path), tls_key=str(key_pem_path))
    client = await Raw.open(relay.smtp_address)
    try:
        assert (await client.reply()).startswith("220 ")
        assert (await client.command("EHLO postfix.test")).startswith("250 ")
        assert await client.command("STARTTLS now") == "501 5.5.4 syntax: STARTTLS"
        assert await client.command("STARTTLS") == "220 2.0.0 Ready to start TLS"
    finally:
        client.writer.transport.abort()


# -- item 12: an empty DATA -----------------------------------------------------------------------


@pytest.mark.parametrize(("content", "after_our_header"), [(b"", b""), (b"\r\n", b"\r\n")])
async def test_an_empty_message_is_relayed_as_postfix_relays_it(
    relay: Application, upstream: Any, content: bytes, after_our_header: bytes
) -> None:
    """Postfix accepts an empty DATA and sends on its own Received: field (and, for a
    local client, the header fields it adds) with no header/body separator of its
    own; a client's empty line is kept.  We do the same: our trace field, then the
    client's bytes exactly, never an invented empty line (RFC 5322 §3.5: the body
    and the blank line before it are optional)."""
    async with greeted(relay) as client:
        await open_transaction(client)
        assert (await client.command("DATA")).startswith("354 ")
        assert (await client.command(content + b".")).startswith("250 2.0.0 Ok: queued as UP")
    (delivered,) = await upstream.wait_for_transactions(1)
    header, _, rest = delivered.data.partition(b"; ")
    assert header.startswith(b"Received: from postfix.test ([127.0.0.1])\r\n\tby relay.test ")
    trace_end = rest.index(b"\r\n") + 2  # the date ends our one (folded) field
    assert rest[trace_end:] == after_our_header


@pytest.mark.parametrize("content", [b"", b"\r\n"], ids=["empty", "one-empty-line"])
async def test_without_our_header_an_empty_message_reaches_the_upstream_unchanged(
    relay_factory: Any, upstream: Any, content: bytes
) -> None:
    """With ``add_received_header = false`` there is nothing to add: an empty DATA
    reached the upstream as one empty line (aiosmtplib's data() ends every message
    with CRLF); it is now sent as DATA and the end-of-data line alone."""
    relay = await relay_factory(add_received_header=False)
    async with greeted(relay) as client:
        await open_transaction(client)
        assert (await client.command("DATA")).startswith("354 ")
        assert (await client.command(content + b".")).startswith("250 2.0.0 Ok: queued as UP")
    (delivered,) = await upstream.wait_for_transactions(1)
    assert delivered.data == content
