"""Small builders for hand-made test messages (octets, exactly as written)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

PIXEL_URL = "https://track.example.test/o/AAAAAAAAAAAAAAAAAAAAAA.gif"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mime"

TOP = (
    "From: Sender <sender@example.org>\r\n"
    "To: reader@example.net\r\n"
    "Subject: test\r\n"
    "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    "Message-ID: <test@example.org>\r\n"
    "MIME-Version: 1.0\r\n"
)


def encode(body: bytes, cte: str) -> bytes:
    """``body`` encoded with ``cte`` (quoted-printable/base64 lines of 76 characters, CRLF)."""
    if cte == "quoted-printable":
        return binascii.b2a_qp(body, istext=True)
    if cte == "base64":
        encoded = base64.b64encode(body)
        return b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    return body


def leaf(
    body: bytes | str,
    *,
    ctype: str = "text/html",
    charset: str | None = "utf-8",
    cte: str | None = None,
    extra: str = "",
) -> bytes:
    """A body part: its header fields, a blank line and the (encoded) body; CRLF."""
    if isinstance(body, str):
        body = body.encode(charset or "utf-8")
    params = f"; charset={charset}" if charset else ""
    head = f"Content-Type: {ctype}{params}\r\n"
    if cte:
        head += f"Content-Transfer-Encoding: {cte}\r\n"
    head += extra
    return head.encode("ascii") + b"\r\n" + encode(body, cte or "8bit")


def multipart(subtype: str, *parts: bytes, boundary: str = "b1", params: str = "") -> bytes:
    """A multipart entity (header fields and body) holding ``parts``."""
    head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"{params}\r\n\r\n'
    body = b"preamble\r\n"
    for part in parts:
        body += f"--{boundary}\r\n".encode() + part + b"\r\n"
    body += f"--{boundary}--\r\nepilogue\r\n".encode()
    return head.encode("ascii") + body


def message(entity: bytes, *, headers: str = "") -> bytes:
    """A whole message: the usual top-level fields, ``headers``, then ``entity``."""
    return (TOP + headers).encode("ascii") + entity


def html_message(html: str | bytes, **kwargs: str | None) -> bytes:
    """A single-part text/html message (see :func:`leaf` for the keywords)."""
    headers = kwargs.pop("headers", None) or ""
    return message(leaf(html, **kwargs), headers=headers)  # type: ignore[arg-type]


def fixture(name: str) -> bytes:
    """The octets of ``tests/fixtures/mime/<name>``."""
    return (FIXTURES / name).read_bytes()
