"""RelaySMTP where it differs from aiosmtpd's SMTP."""

import asyncio
import ipaddress

from smtp_tracker.smtp.server import RelaySMTP, client_allowed


def _protocol() -> RelaySMTP:
    return RelaySMTP(
        object(),  # type: ignore[arg-type]
        allowed_clients=[ipaddress.ip_network("127.0.0.0/8")],
        max_message_bytes=1000,
        client_timeout_s=5.0,
        hostname="relay.test",
        tls_context=None,
        keep_transcript=False,
    )


async def test_command_length_allowances_are_per_connection() -> None:
    first = _protocol()
    first.command_size_limits["MAIL"] += 36  # what EHLO adds for SIZE and SMTPUTF8
    second = _protocol()
    assert first.command_size_limits["MAIL"] == 512 + 36
    assert second.command_size_limits["MAIL"] == 512
    assert first.command_size_limits is not second.command_size_limits


def test_client_allowed_matches_networks_and_v4_mapped_v6() -> None:
    loopback = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert client_allowed(("127.0.0.1", 1), loopback)
    assert client_allowed(("::1", 1, 0, 0), loopback)
    assert client_allowed(("::ffff:127.0.0.5", 1, 0, 0), loopback)
    assert not client_allowed(("192.0.2.1", 1), loopback)
    assert not client_allowed(None, loopback)
    assert not client_allowed(("not-an-address", 1), loopback)


async def test_canary_pending_input_reads_asyncio_streamreaders_buffer() -> None:
    """RelaySMTP._pending_input reads StreamReader._buffer (asyncio has no public peek):
    if a Python release renames it, this fails here rather than in the pipelining checks."""
    reader = asyncio.StreamReader()
    reader.feed_data(b"EHLO a\r\nMAIL FROM:<b@c>\r\n")
    assert await reader.readuntil() == b"EHLO a\r\n"
    buffer = reader._buffer  # type: ignore[attr-defined]
    assert isinstance(buffer, bytearray) and bytes(buffer) == b"MAIL FROM:<b@c>\r\n"
