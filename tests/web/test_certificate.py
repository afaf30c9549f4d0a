"""Self-signed certificates and loading the server context."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smtp_tracker.errors import StartupError
from smtp_tracker.tls import load_server_context, write_self_signed


def test_generated_pair_loads_and_names_its_hosts(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key, hostnames=["track.example.com", "127.0.0.1", "::1"], days=30)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert isinstance(load_server_context(cert, key), ssl.SSLContext)
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["track.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    lifetime = parsed.not_valid_after_utc - parsed.not_valid_before_utc
    assert 30 <= lifetime.days <= 31
    assert list(tmp_path.iterdir()) != [] and not list(tmp_path.glob(".*"))  # no temp files


async def test_a_client_trusting_the_certificate_can_connect(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key, hostnames=["localhost", "127.0.0.1"])
    server_context = load_server_context(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
        )
        assert await reader.read() == b"hello"
        writer.close()
        await writer.wait_closed()


def test_mismatched_key_is_a_one_line_startup_error(tmp_path: Path) -> None:
    write_self_signed(tmp_path / "a.pem", tmp_path / "a.key", hostnames=["a.example"])
    write_self_signed(tmp_path / "b.pem", tmp_path / "b.key", hostnames=["b.example"])
    with pytest.raises(StartupError, match="does not match") as caught:
        load_server_context(tmp_path / "a.pem", tmp_path / "b.key")
    assert "\n" not in str(caught.value)


def test_missing_and_garbage_files_are_startup_errors(tmp_path: Path) -> None:
    write_self_signed(tmp_path / "a.pem", tmp_path / "a.key", hostnames=["a.example"])
    with pytest.raises(StartupError, match="cannot read") as caught:
        load_server_context(tmp_path / "missing.pem", tmp_path / "a.key")
    assert "\n" not in str(caught.value)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(StartupError, match="not valid PEM") as caught:
        load_server_context(tmp_path / "junk.pem", tmp_path / "a.key")
    assert "\n" not in str(caught.value)


def test_unwritable_destination_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="cannot write"):
        write_self_signed(tmp_path / "no" / "c.pem", tmp_path / "no" / "k.pem", hostnames=["x"])


def test_arguments_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="host name"):
        write_self_signed(tmp_path / "c", tmp_path / "k", hostnames=[" "])
    with pytest.raises(ValueError, match="days"):
        write_self_signed(tmp_path / "c", tmp_path / "k", hostnames=["x"], days=0)


def test_encrypted_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key, hostnames=["a.example"])
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(StartupError, match="is encrypted") as caught:
        load_server_context(cert, encrypted)
    assert "\n" not in str(caught.value)
