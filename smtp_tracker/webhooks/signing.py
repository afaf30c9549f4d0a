"""Standard Webhooks signatures (https://www.standardwebhooks.com, "Signature scheme").

A secret is ``whsec_`` followed by the base64 of 24 to 64 random bytes.  Each
delivery carries three headers:

* ``webhook-id``: the event's id (the same on every retry);
* ``webhook-timestamp``: the attempt's time, integer seconds since the epoch;
* ``webhook-signature``: ``v1,`` and the base64 of HMAC-SHA256, keyed with the
  secret's bytes, of ``{id}.{timestamp}.{body}``.

Receivers verify with the ``standardwebhooks`` package (or these few lines)
and refuse a timestamp older than their tolerance (5 minutes by default).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
from pathlib import Path

__all__ = [
    "SECRET_PREFIX",
    "new_secret",
    "read_secret",
    "secret_key",
    "signature_headers",
    "signed_content_signature",
    "write_secret",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def new_secret() -> str:
    """A new secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret.

    :raises ValueError: when *secret* is not ``whsec_`` and base64 of 24 to 64 bytes.
    """
    text = secret.strip()
    if not text.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_ (smtp-tracker webhooks new-secret)")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook secret holds 24 to 64 bytes, this one {len(key)}")
    return key


def read_secret(path: Path) -> bytes:
    """The HMAC key in the secret file *path* (one line, ``whsec_...``).

    :raises ValueError: when the file cannot be read or holds no valid secret
        (the message names the file, never the secret).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ValueError(f"cannot read {path} ({reason})") from None
    try:
        return secret_key(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_secret(path: Path) -> str:
    """Write a new secret to *path* (created mode 0600, never overwritten); return it.

    :raises FileExistsError: when *path* exists.
    :raises OSError: when it cannot be written.
    """
    secret = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secret + "\n")
    return secret


def signed_content_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,`` and base64(HMAC-SHA256(key, ``{msg_id}.{timestamp}.{body}``))."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three ``webhook-*`` headers of one delivery attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signed_content_signature(key, msg_id, timestamp, body),
    }
