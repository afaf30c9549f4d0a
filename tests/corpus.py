"""The shared corpus of real messages and HTML e-mail templates (../shared/corpus).

The corpus is found through the ``SMTP_TRACKER_CORPUS`` environment variable
(its ``eml/`` and ``html/`` trees, see its ``SOURCES.md``); tests that need it
are marked ``corpus`` and skipped with a reason when the variable is unset.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Literal

__all__ = [
    "CORPUS_ENV",
    "corpus_root",
    "eml_paths",
    "html_as_message",
    "html_paths",
    "skip_reason",
]

CORPUS_ENV = "SMTP_TRACKER_CORPUS"

Cte = Literal["quoted-printable", "base64", "8bit"]


def corpus_root() -> Path | None:
    """The corpus directory named by ``$SMTP_TRACKER_CORPUS``, or None when unset or missing."""
    value = os.environ.get(CORPUS_ENV)
    if not value:
        return None
    path = Path(value)
    return path if (path / "eml").is_dir() or (path / "html").is_dir() else None


def skip_reason() -> str:
    """Why corpus tests are skipped (for ``pytest.mark.skipif``)."""
    value = os.environ.get(CORPUS_ENV)
    if not value:
        return f"{CORPUS_ENV} is not set (point it at the shared corpus directory)"
    return f"{CORPUS_ENV}={value!r} has no eml/ or html/ directory"


def _files(sub: str) -> list[Path]:
    root = corpus_root()
    if root is None or not (root / sub).is_dir():
        return []
    return sorted(p for p in (root / sub).rglob("*") if p.is_file())


def eml_paths() -> list[Path]:
    """Every message file under ``eml/``, sorted; empty without a corpus."""
    return _files("eml")


def html_paths() -> list[Path]:
    """Every template under ``html/``, sorted; empty without a corpus."""
    return _files("html")


def html_as_message(html_bytes: bytes, *, charset: str | None, cte: Cte) -> bytes:
    """Wrap an HTML document in a ``multipart/alternative`` message with a text/plain part.

    The message uses CRLF line endings; the HTML's line endings are made CRLF
    too, then encoded with ``cte`` (quoted-printable and base64 lines of at most
    76 characters, RFC 2045 §6.7, §6.8).

    :param charset: the ``charset`` parameter of the HTML part, or None for none
        (the rewrite then looks at ``<meta>``).
    """
    html = html_bytes.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if cte == "quoted-printable":
        body = binascii.b2a_qp(html, istext=True)
    elif cte == "base64":
        encoded = base64.b64encode(html)
        body = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    else:
        body = html
    param = f"; charset={charset}" if charset else ""
    head = (
        "From: Corpus Sender <sender@example.org>\r\n"
        "To: reader@example.net\r\n"
        "Subject: corpus template\r\n"
        "Message-ID: <corpus@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="=_corpus_boundary"\r\n'
        "\r\n"
        "This is a multi-part message in MIME format.\r\n"
        "--=_corpus_boundary\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "The plain text alternative.\r\n"
        "--=_corpus_boundary\r\n"
        f"Content-Type: text/html{param}\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n"
        "\r\n"
    ).encode("ascii")
    return head + body + b"\r\n--=_corpus_boundary--\r\n"
