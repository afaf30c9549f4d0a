"""What every rewrite result must satisfy, checked independently of the rewrite's own walker.

The structure is read with the :mod:`email` package (compat32), the control
header is removed with a small line-based scan of the header section, and
the changed part is located by its raw payload, not by the rewrite's offsets.
"""

from __future__ import annotations

import email
import html
import re
from dataclasses import dataclass
from email.message import Message
from email.policy import compat32

from smtp_tracker.mime import RewriteResult
from smtp_tracker.mime.transfer import (
    TransferEncoding,
    TransferError,
    decode,
    parse_transfer_encoding,
)

REASONS = frozenset(
    {
        "no-html-body",
        "html-after-text-in-mixed",
        "multipart-signed",
        "multipart-encrypted",
        "pkcs7-mime",
        "dkim-signed",
        "null-reverse-path",
        "report",
        "auto-submitted",
        "opt-out",
        "no-opt-in",
        "limits-exceeded",
        "html-too-large",
        "rewrite-failed",
    }
)
PIXEL_SHAPE = re.compile(
    rb'<img\s+src="[^"]*"\s+width="1"\s+height="1"\s+alt=""\s+style="[^"]*"\s*/?>\Z'
)
MAX_LINE = 998
#: RFC 5322 field, continuation or mbox line, as email.feedparser tests it.
HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")


def without_control_header(message: bytes, name: str = "X-Track") -> bytes:
    """``message`` with every top-level ``name`` field (and its continuation lines) cut out."""
    lines = message.splitlines(keepends=True)
    out: list[bytes] = []
    skipping = False
    in_header = True
    field = re.compile(rb"\s*" + re.escape(name.encode()) + rb"\s*:", re.IGNORECASE)
    for line in lines:
        if in_header:
            if line in (b"\r\n", b"\n", b"\r") or not HEADER_LINE.match(line):
                in_header = False
            elif line[:1] in (b" ", b"\t"):
                if skipping:
                    continue
            else:
                skipping = bool(field.match(line)) and not line[:1].isspace()
                if skipping:
                    continue
        out.append(line)
    return b"".join(out)


def long_lines(data: bytes) -> int:
    """How many lines are over 998 octets (RFC 5322 §2.1.1), line endings excluded."""
    return sum(1 for line in re.split(rb"\r\n|\n", data) if len(line) > MAX_LINE)


def _raw(part: Message) -> bytes:
    # the payload as parsed (get_payload() would decode 8-bit text with the charset)
    payload = part._payload  # type: ignore[attr-defined]
    assert isinstance(payload, str)
    return payload.encode("ascii", "surrogateescape")


def decoded_payload(part: Message) -> bytes:
    """A leaf's body decoded as the rewrite reads its Content-Transfer-Encoding."""
    raw = _raw(part)
    cte = part.get("Content-Transfer-Encoding")
    encoding, _defect = parse_transfer_encoding(None if cte is None else str(cte), raw)
    try:
        return decode(raw, encoding or TransferEncoding.IDENTITY)
    except TransferError:  # not the rewritten part: read it as leniently as email does
        lenient = part.get_payload(decode=True)
        assert isinstance(lenient, bytes)
        return lenient


@dataclass(frozen=True)
class Change:
    """The one part a tracked rewrite changed."""

    old: Message
    new: Message
    old_text: bytes
    new_text: bytes
    pixel: bytes


def leaves(message: bytes) -> list[Message]:
    """Every part of the parsed message, attached messages included, in order."""
    return list(email.message_from_bytes(message, policy=compat32).walk())


def check(
    original: bytes, result: RewriteResult, url: str, *, control_header: str = "X-Track"
) -> Change | None:
    """Assert the invariants of a rewrite of ``original``; return the change when tracked."""
    out = result.message
    assert isinstance(out, bytes)
    assert isinstance(result.defects, tuple)
    assert all(isinstance(d, str) for d in result.defects)
    if result.reason == "rewrite-failed":
        assert not result.tracked
        assert out == original, "fail-open must relay the original octets"
        return None
    email.message_from_bytes(out, policy=compat32)  # parses (never raises, but walks)
    base = without_control_header(original, control_header)
    if not result.tracked:
        assert result.reason in REASONS, result.reason
        assert out == base, "untouched messages stay byte-identical"
        return None
    assert result.reason is None
    return check_tracked(base, out, url)


def check_tracked(base: bytes, out: bytes, url: str) -> Change:
    """Exactly one HTML part changed, by exactly one pixel; all else byte-identical."""
    old_parts, new_parts = leaves(base), leaves(out)
    assert len(old_parts) == len(new_parts), "the MIME structure changed"
    changed = []
    for old, new in zip(old_parts, new_parts, strict=True):
        assert old.get_content_type() == new.get_content_type()
        assert old.items() == new.items(), "part headers changed"
        if old.is_multipart():
            assert old.preamble == new.preamble and old.epilogue == new.epilogue
            continue
        if _raw(old) != _raw(new):
            changed.append((old, new))
    assert len(changed) == 1, f"{len(changed)} parts changed"
    old, new = changed[0]
    assert new.get_content_type() == "text/html"
    old_text, new_text = decoded_payload(old), decoded_payload(new)
    escaped = html.escape(url, quote=True).encode("ascii")
    pattern = re.compile(rb'<img\s+src="' + re.escape(escaped) + rb'"[^>]*>')
    found = pattern.findall(new_text)
    assert len(found) == 1, f"{len(found)} pixels in the part"
    assert not pattern.search(old_text)
    pixel = found[0]
    assert PIXEL_SHAPE.match(pixel), pixel
    assert b"  " not in pixel, f"two spaces in the pixel: {pixel!r}"
    assert pixel.isascii()
    assert new_text.replace(pixel, b"", 1) == old_text, "decoded text changed beyond the pixel"
    total = sum(decoded_payload(p).count(escaped) for p in new_parts if not p.is_multipart())
    assert total == 1 + sum(
        decoded_payload(p).count(escaped) for p in old_parts if not p.is_multipart()
    )
    # byte level: the octets outside the changed part's payload are untouched
    old_raw, new_raw = _raw(old), _raw(new)
    assert _splices(base, out, old_raw, new_raw), "octets changed outside the rewritten body"
    assert long_lines(out) <= long_lines(base), "a line over 998 octets was introduced"
    cte = str(new.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte in ("quoted-printable", "base64"):
        before = set(old_raw.splitlines())
        for line in new_raw.splitlines():
            assert line in before or len(line) <= 76, f"encoded line of {len(line)} characters"
    if b"\n" in old_raw:
        crlf = old_raw.count(b"\r\n") == old_raw.count(b"\n")
        lf_only = b"\r\n" not in old_raw
        if crlf:
            assert new_raw.count(b"\r\n") == new_raw.count(b"\n"), "bare LF added to a CRLF part"
        if lf_only:
            assert b"\r\n" not in new_raw, "CRLF added to an LF part"
    return Change(old, new, old_text, new_text, pixel)


def _splices(base: bytes, out: bytes, old_raw: bytes, new_raw: bytes) -> bool:
    """Whether ``out == base[:i] + new_raw + base[i + len(old_raw):]`` for some i."""
    if len(out) - len(new_raw) != len(base) - len(old_raw):
        return False
    i = base.find(old_raw)
    while i >= 0:
        if (
            out[:i] == base[:i]
            and out[i : i + len(new_raw)] == new_raw
            and out[i + len(new_raw) :] == base[i + len(old_raw) :]
        ):
            return True
        i = base.find(old_raw, i + 1)
    return False
