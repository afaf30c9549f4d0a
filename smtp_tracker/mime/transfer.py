"""Content-Transfer-Encoding: decode a body, and insert octets into it by re-encoding
only the lines around the insertion point.

RFC 2045 §6: ``7bit``, ``8bit`` and ``binary`` are identity encodings;
quoted-printable (§6.7) lines are at most 76 characters, a ``=`` at the end of
a line is a soft line break; base64 (§6.8) lines are at most 76 characters.
Decoding uses the same functions as the :mod:`email` package
(:func:`binascii.a2b_qp`, :func:`base64.b64decode`), base64 strictly.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import AnyStr

__all__ = [
    "TransferEncoding",
    "TransferError",
    "apply_edits",
    "decode",
    "line_ending",
    "parse_transfer_encoding",
    "splice",
    "splice_edits",
]

#: Longest encoded line written, without its line ending (RFC 2045 §6.7 (5), §6.8).
MAX_ENCODED_LINE = 76


class TransferError(ValueError):
    """The body cannot be decoded, or the octets cannot be inserted exactly."""


class TransferEncoding(Enum):
    """How a body is encoded (RFC 2045 §6.1)."""

    IDENTITY = "identity"  # 7bit, 8bit, binary, or none given
    QUOTED_PRINTABLE = "quoted-printable"
    BASE64 = "base64"


_IDENTITY_NAMES = frozenset({"", "7bit", "8bit", "binary"})
#: Misspellings of the identity encodings seen in real mail ("7-bit", "8bits", "7bits", "6bit").
_SLOPPY_IDENTITY = re.compile(r"[0-9]+[ _-]?bits?\Z")
#: Quoted-printable escapes or soft line breaks: an unknown encoding that holds
#: them is probably quoted-printable, so reading it as identity is not plausible.
_QP_LIKE = re.compile(rb"=(?:[0-9A-F]{2}|\r?\n)")
#: A base64 line: the data, then blanks that decoders ignore (RFC 2045 §6.8).
_BASE64_LINE = re.compile(rb"([A-Za-z0-9+/]*={0,2})[ \t]*\Z")
_BLANKS = b" \t\r\n"
#: What is not a base64 character nor padding (RFC 2045 §6.8, Table 1).
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")
_EOL = re.compile(rb"\r\n|\n")


def parse_transfer_encoding(
    value: str | None, body: bytes
) -> tuple[TransferEncoding | None, str | None]:
    """Read a Content-Transfer-Encoding field value.

    Known values are matched case-insensitively, ignoring quotes and anything
    after a ``;``.  An unknown value is read as identity when that is
    plausible (a misspelt ``7bit``/``8bit``, or a body with no
    quoted-printable escapes), as most mail readers do.

    :param value: the field value, or None when the field is absent
        (identity, RFC 2045 §6.1).
    :param body: the encoded body, for the plausibility test.
    :returns: ``(encoding, defect)``: the encoding, or None when the body
        should not be touched; a short defect text for an unknown value.
    """
    if value is None:
        return TransferEncoding.IDENTITY, None
    name = value.split(";", 1)[0].strip().strip("\"'").strip().lower()
    if name in _IDENTITY_NAMES:
        return TransferEncoding.IDENTITY, None
    if name == "quoted-printable":
        return TransferEncoding.QUOTED_PRINTABLE, None
    if name == "base64":
        return TransferEncoding.BASE64, None
    defect = f"unknown-transfer-encoding:{name[:40]}"
    if _SLOPPY_IDENTITY.match(name):
        return TransferEncoding.IDENTITY, defect
    if "uu" in name or _QP_LIKE.search(body) or b"<" not in body:
        return None, defect
    return TransferEncoding.IDENTITY, defect


def decode(body: bytes, encoding: TransferEncoding, defects: list[str] | None = None) -> bytes:
    """Decode a body.

    Base64 (RFC 2045 §6.8) ignores line breaks, spaces and tabs, and, as the
    RFC tells decoders to, any other character outside the base64 alphabet
    (defect ``base64-outside-alphabet``); a single character left over after
    the last whole quantum holds 6 bits, less than an octet, and is dropped
    (``base64-dangling-character``), as mail readers do.  Such a body is not
    spliced line by line: :func:`splice` and :func:`splice_edits` re-encode
    it whole, in canonical lines.

    :param defects: the base64 defects met are appended to it.
    :raises TransferError: when base64 is not valid otherwise (two or three
        characters left over without their padding, padding inside the data):
        evidence of truncation, which a rewrite must not guess around.
    """
    if encoding is TransferEncoding.QUOTED_PRINTABLE:
        return binascii.a2b_qp(body)
    if encoding is TransferEncoding.BASE64:
        stream = body.translate(None, _BLANKS)
        try:
            return base64.b64decode(stream, validate=True)
        except binascii.Error as exc:
            lenient = _lenient_base64(stream, defects)
            if lenient is None:
                raise TransferError(f"invalid base64: {exc}") from exc
            return lenient
    return body


def _lenient_base64(stream: bytes, defects: list[str] | None) -> bytes | None:
    """*stream* decoded as RFC 2045 §6.8 decoders read it, or None when it is truncated."""
    found: list[str] = []
    cleaned = _NOT_BASE64.sub(b"", stream)
    if len(cleaned) != len(stream):
        found.append("base64-outside-alphabet")
    data = cleaned.rstrip(b"=")
    padding = cleaned[len(data) :]
    if b"=" in data:
        return None
    if len(data) % 4 == 1:
        data = data[:-1]
        found.append("base64-dangling-character")
    if padding != b"=" * (-len(data) % 4):
        return None
    try:
        octets = base64.b64decode(data + padding, validate=True)
    except binascii.Error:
        return None
    if defects is not None:
        defects.extend(found)
    return octets


def line_ending(body: bytes, default: bytes = b"\r\n") -> bytes:
    """The line ending the body uses first (``CRLF`` or ``LF``), else ``default``."""
    match = _EOL.search(body)
    return match.group() if match else default


def splice(
    body: bytes,
    encoding: TransferEncoding,
    offset: int,
    insert: bytes,
    *,
    newline: bytes = b"\r\n",
) -> bytes:
    """Insert ``insert`` at ``offset`` of the decoded body; return the new encoded body.

    Identity: the octets go in as they are.  Quoted-printable and base64: only
    the encoded line holding the insertion point is re-encoded (split into
    lines of at most 76 characters, with that line's line ending); every other
    encoded line stays as it was.  Base64 whose lines are not whole 4-character
    quanta is re-encoded whole instead.  The caller checks the result decodes
    as expected.

    :param offset: index into ``decode(body, encoding)``.
    :param insert: for base64, its length must be a multiple of 3, so that the
        base64 quanta after the insertion point stay aligned.
    :param newline: the line ending for new lines when the body has none of its own.
    :raises TransferError: when it cannot be done exactly.
    """
    newline = line_ending(body, newline)
    if encoding is TransferEncoding.QUOTED_PRINTABLE:
        return _splice_qp(body, offset, insert, newline)
    if encoding is TransferEncoding.BASE64:
        return _splice_base64(body, offset, insert, newline)
    if not 0 <= offset <= len(body):
        raise TransferError("offset outside the body")
    return body[:offset] + insert + body[offset:]


#: One edit of the decoded octets: ``decoded[start:end]`` becomes ``insert``.
Edit = tuple[int, int, bytes]


def splice_edits(
    body: bytes,
    encoding: TransferEncoding,
    edits: Sequence[Edit],
    *,
    newline: bytes = b"\r\n",
) -> bytes:
    """Apply several edits to the decoded body at once; return the new encoded body.

    Identity: the octets are replaced as they are.  Quoted-printable: only the
    encoded lines an edit touches are re-encoded (lines an edit spans are
    re-encoded together), every other line stays as it was.  Base64: the
    lines before the one holding the first edit stay, the rest is re-encoded
    with the body's line width and line ending (the whole body when its lines
    are not whole 4-character quanta).  The caller checks the result decodes
    as expected.

    :param edits: ``(start, end, insert)`` with offsets into
        ``decode(body, encoding)``, sorted and not overlapping.
    :param newline: the line ending for new lines when the body has none of its own.
    :raises TransferError: when it cannot be done exactly.
    """
    previous = 0
    for start, end, _insert in edits:
        if not previous <= start <= end:
            raise TransferError("edits overlap or are not sorted")
        previous = end
    if not edits:
        return body
    newline = line_ending(body, newline)
    if encoding is TransferEncoding.QUOTED_PRINTABLE:
        return _edit_qp(body, edits, newline)
    if encoding is TransferEncoding.BASE64:
        return _edit_base64(body, edits, newline)
    if edits[-1][1] > len(body):
        raise TransferError("edit outside the body")
    return apply_edits(body, edits)


def apply_edits(data: AnyStr, edits: Sequence[tuple[int, int, AnyStr]]) -> AnyStr:
    """``data`` with each ``(start, end, insert)``: ``data[start:end]`` replaced by ``insert``.

    :param edits: offsets into ``data`` (octets or characters), sorted and not
        overlapping; not checked.
    """
    pieces: list[AnyStr] = []
    pos = 0
    for start, end, insert in edits:
        pieces.append(data[pos:start])
        pieces.append(insert)
        pos = end
    pieces.append(data[pos:])
    return data[:0].join(pieces)


def _lines(body: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of each physical line, ends after the LF (a2b_qp never reads past one)."""
    spans = []
    pos = 0
    size = len(body)
    while pos < size:
        nl = body.find(b"\n", pos)
        end = size if nl < 0 else nl + 1
        spans.append((pos, end))
        pos = end
    return spans


# quoted-printable ---------------------------------------------------------------

_HEX = frozenset(b"0123456789ABCDEFabcdef")


#: A quoted-printable token: its characters, the octets it decodes to, and
#: whether a soft line break must not follow it (a literal "=", which would
#: read "==" as an escape).
_Token = tuple[bytes, int, bool]


def _qp_tokens(line: bytes) -> tuple[list[_Token], bytes]:
    """Cut one encoded line into unbreakable tokens, as :func:`binascii.a2b_qp` reads it.

    :returns: ``(tokens, terminal)``: the tokens; ``terminal`` is the line's
        soft line break (``=`` up to and including the LF) or hard line
        ending, or empty.
    """
    tokens: list[_Token] = []
    i = 0
    size = len(line)
    if line.endswith(b"\r\n"):
        hard, size = b"\r\n", size - 2
    elif line.endswith(b"\n"):
        hard, size = b"\n", size - 1
    else:
        hard = b""
    while i < size:
        c = line[i]
        if c != 0x3D:  # "="
            tokens.append((line[i : i + 1], 1, False))
            i += 1
            continue
        if i + 1 >= len(line):  # "=" at the very end of the data decodes to nothing
            tokens.append((line[i:], 0, False))
            break
        d = line[i + 1]
        if d in (0x0A, 0x0D):  # soft line break: "=" up to the LF
            return tokens, line[i:]
        if d == 0x3D:  # "==" decodes to one "="
            tokens.append((line[i : i + 2], 1, False))
            i += 2
        elif d in _HEX and i + 2 < size and line[i + 2] in _HEX:
            tokens.append((line[i : i + 3], 1, False))
            i += 3
        else:  # not an escape: a literal "="
            tokens.append((line[i : i + 1], 1, True))
            i += 1
    return tokens, hard


def _qp_encode(text: bytes) -> list[_Token]:
    """Quoted-printable tokens for octets (RFC 2045 §6.7 rules 1, 2: all but printable ASCII
    and space as ``=XX``; the inserted text never ends a line, so spaces stay as they are)."""
    tokens: list[_Token] = []
    for octet in text:
        if octet == 0x3D or not 0x20 <= octet <= 0x7E:
            tokens.append((b"=%02X" % octet, 1, False))
        else:
            tokens.append((bytes((octet,)), 1, False))
    return tokens


def _splice_qp(body: bytes, offset: int, insert: bytes, newline: bytes) -> bytes:
    spans = _lines(body)
    # Find the line holding the insertion point, walking back from the end
    # (the point is usually near the end: before </body>).
    remaining = len(binascii.a2b_qp(body)) - offset
    if remaining < 0 or offset < 0:
        raise TransferError("offset outside the body")
    index = len(spans) - 1
    local = 0
    while index >= 0:
        start, end = spans[index]
        decoded = len(binascii.a2b_qp(body[start:end]))
        if remaining <= decoded:
            local = decoded - remaining
            break
        remaining -= decoded
        index -= 1
    if index < 0:
        if spans:
            raise TransferError("offset not found")
        spans, index, local = [(0, 0)], 0, 0
    start, end = spans[index]
    line = body[start:end]
    tokens, terminal = _qp_tokens(line)
    count = 0
    cut = None
    for position, (_token, width, _sticky) in enumerate(tokens):
        if count == local:
            cut = position
            break
        count += width
    else:
        if count == local:
            cut = len(tokens)
    if cut is None:
        raise TransferError("insertion point inside an escape")
    eol = terminal[-2:] if terminal.endswith(b"\r\n") else terminal[-1:]
    if eol not in (b"\r\n", b"\n"):
        eol = newline
    pieces = tokens[:cut] + _qp_encode(insert) + tokens[cut:]
    lines, rest = _fill_qp_lines(((t, w, s, False) for t, w, s in pieces), eol)
    return body[:start] + b"".join(lines) + rest + terminal + body[end:]


def _edit_qp(body: bytes, edits: Sequence[Edit], newline: bytes) -> bytes:
    """Quoted-printable edits: re-encode the groups of lines the edits touch."""
    spans = _lines(body) or [(0, 0)]
    sizes = [len(binascii.a2b_qp(body[start:end])) for start, end in spans]
    firsts = []  # decoded offset of each line's first octet
    total = 0
    for size in sizes:
        firsts.append(total)
        total += size
    if edits[-1][1] > total:
        raise TransferError("edit outside the body")

    def line_at(offset: int) -> int:
        """The line holding decoded ``offset`` (the last line for the very end)."""
        return max(bisect.bisect_right(firsts, offset) - 1, 0)

    groups: list[tuple[int, int, list[Edit]]] = []  # first line, last line, edits
    for start, end, insert in edits:
        first = line_at(start)
        last = line_at(end - 1) if end > start else first
        if end > start and end == firsts[last] + sizes[last] and last < len(spans) - 1:
            last += 1  # the edit reaches the line's end: keep the next line's start with it
        if groups and first <= groups[-1][1]:
            group = groups[-1]
            groups[-1] = (group[0], max(group[1], last), [*group[2], (start, end, insert)])
        else:
            groups.append((first, last, [(start, end, insert)]))
    out: list[bytes] = []
    pos = 0
    for first, last, mine in groups:
        out.append(body[pos : spans[first][0]])
        out.append(_reencode_qp_lines(body, spans[first : last + 1], firsts[first], mine, newline))
        pos = spans[last][1]
    out.append(body[pos:])
    return b"".join(out)


def _reencode_qp_lines(
    body: bytes, spans: Sequence[tuple[int, int]], first: int, edits: Sequence[Edit], newline: bytes
) -> bytes:
    """Lines ``spans`` of a quoted-printable body with ``edits`` applied, wrapped at 76.

    Tokens and hard line breaks outside the edits are kept as written; soft
    line breaks are laid out again.

    :param first: the decoded offset of the first line.
    :raises TransferError: when an edit does not fall on token boundaries.
    """
    units: list[tuple[bytes, int, bool, bool]] = []  # token, width, sticky, hard line break
    final = b""
    for index, (start, end) in enumerate(spans):
        tokens, terminal = _qp_tokens(body[start:end])
        units.extend((token, width, sticky, False) for token, width, sticky in tokens)
        if terminal.startswith(b"="):  # a soft line break: laid out again, but the last
            final = terminal if index == len(spans) - 1 else b""
        elif terminal:
            units.append((terminal, len(terminal), False, True))
    eol = final[-2:] if final.endswith(b"\r\n") else final[-1:]
    if eol not in (b"\r\n", b"\n"):
        eol = newline
    pieces: list[tuple[bytes, int, bool, bool]] = []
    offset = first
    following = 0  # the next edit
    skip_until = first  # the end of the edit being applied

    def begin_edits() -> None:
        nonlocal following, skip_until
        while following < len(edits) and edits[following][0] == offset >= skip_until:
            pieces.extend((t, w, s, False) for t, w, s in _qp_encode(edits[following][2]))
            skip_until = edits[following][1]
            following += 1

    for unit in units:
        begin_edits()
        if offset >= skip_until:
            pieces.append(unit)
        elif offset + unit[1] > skip_until:
            raise TransferError("edit ends inside a line ending")
        offset += unit[1]
    begin_edits()
    if following != len(edits) or skip_until > offset:
        raise TransferError("edit not on token boundaries")
    lines, rest = _fill_qp_lines(pieces, eol)
    if rest or final:
        lines.append(rest + final)
    return b"".join(lines)


def _fill_qp_lines(
    pieces: Iterable[tuple[bytes, int, bool, bool]], eol: bytes
) -> tuple[list[bytes], bytes]:
    """Quoted-printable tokens laid out in lines of at most 76 characters (RFC 2045 §6.7 (5)).

    :param pieces: ``(token, width, sticky, hard)``; a hard piece is a line
        ending, kept as it is; elsewhere a soft line break (``=`` and ``eol``)
        ends a line that is full.
    :returns: the finished lines (each with its line ending), and the rest of
        the last line, without one.
    """
    lines: list[bytes] = []
    current = bytearray()
    sticky = False
    for token, _width, token_sticky, hard in pieces:
        if hard:
            lines.append(bytes(current) + token)
            current = bytearray()
            sticky = False
            continue
        if current and len(current) + len(token) > MAX_ENCODED_LINE - 1:
            carry = current[-1:] if sticky else b""  # a literal "=" moves to the next line
            lines.append(bytes(current[: len(current) - len(carry)]) + b"=" + eol)
            current = bytearray(carry)
        current += token
        sticky = token_sticky
    return lines, bytes(current)


# base64 -------------------------------------------------------------------------


def _edit_base64(body: bytes, edits: Sequence[Edit], newline: bytes) -> bytes:
    decoded = decode(body, TransferEncoding.BASE64)
    if edits[-1][1] > len(decoded):
        raise TransferError("edit outside the body")
    new = apply_edits(decoded, edits)
    try:
        lines = _base64_lines(body)
    except _IrregularBase64:
        lines = []
    if not lines:
        return _encode_base64_whole(body, new, newline)
    width = lines[0][1] - lines[0][0]
    if len(lines) == 1 or width > MAX_ENCODED_LINE:
        width = MAX_ENCODED_LINE
    # keep the lines whose octets all come before the first edit
    keep = 0
    kept_octets = 0
    for start, data_end, _eol in lines[:-1]:
        size = (data_end - start) // 4 * 3
        if kept_octets + size > edits[0][0]:
            break
        kept_octets += size
        keep += 1
    first_start = lines[keep][0]
    last_end = lines[-1][1]
    eol = lines[keep][2] or lines[0][2] or newline
    encoded = base64.b64encode(new[kept_octets:])
    chunks = [encoded[i : i + width] for i in range(0, len(encoded), width)]
    return body[:first_start] + eol.join(chunks) + body[last_end:]


def _base64_lines(body: bytes) -> list[tuple[int, int, bytes]]:
    """``(start, data end, line ending)`` of each data line (none: an empty body).

    :raises _IrregularBase64: when they are not all whole 4-character quanta
        (only the last may end with padding), or a line has blanks inside.
    """
    data_lines: list[tuple[int, int, bytes]] = []
    for start, end in _lines(body):
        eol = body[end - 2 : end] if body[start:end].endswith(b"\r\n") else body[end - 1 : end]
        if eol not in (b"\r\n", b"\n"):
            eol = b""
        match = _BASE64_LINE.match(body, start, end - len(eol))
        if match is None:
            raise _IrregularBase64("blanks inside a base64 line")
        if match.end(1) > start:
            data_lines.append((start, match.end(1), eol))
    if not data_lines:
        return data_lines
    for start, data_end, _eol in data_lines[:-1]:
        if (data_end - start) % 4 or body[data_end - 1] == 0x3D:
            raise _IrregularBase64("base64 lines are not whole quanta")
    if (data_lines[-1][1] - data_lines[-1][0]) % 4:
        raise _IrregularBase64("base64 lines are not whole quanta")
    return data_lines


def _encode_base64_whole(body: bytes, octets: bytes, newline: bytes) -> bytes:
    """``octets`` in base64 lines of 76 characters, with ``body``'s leading and trailing blanks."""
    encoded = base64.b64encode(octets)
    lines = [encoded[i : i + MAX_ENCODED_LINE] for i in range(0, len(encoded), MAX_ENCODED_LINE)]
    lead = body[: len(body) - len(body.lstrip(_BLANKS))]
    tail = body[len(body.rstrip(_BLANKS)) :]
    return lead + newline.join(lines) + tail


def _splice_base64(body: bytes, offset: int, insert: bytes, newline: bytes) -> bytes:
    try:
        return _splice_base64_line(body, offset, insert, newline)
    except _IrregularBase64:
        return _reencode_base64(body, offset, insert, newline)


class _IrregularBase64(TransferError):
    """Lines that are not whole base64 quanta: the line holding the offset cannot be found."""


def _splice_base64_line(body: bytes, offset: int, insert: bytes, newline: bytes) -> bytes:
    """Re-encode only the base64 line holding ``offset`` (every line whole quanta)."""
    if len(insert) % 3:
        raise _IrregularBase64("base64 insert length is not a multiple of 3")
    data_lines = _base64_lines(body)
    if not data_lines:
        raise TransferError("empty base64 body")
    width = data_lines[0][1] - data_lines[0][0]
    if width % 4 or width > MAX_ENCODED_LINE or len(data_lines) == 1:
        width = MAX_ENCODED_LINE
    # The 3-octet group holding the offset, and the line it is in.
    group = offset // 3
    chars = 4 * group
    for start, data_end, eol in data_lines:
        size = data_end - start
        if chars < size or (chars == size and (start, data_end, eol) == data_lines[-1]):
            break
        chars -= size
    else:
        raise TransferError("offset outside the body")
    quantum = body[start + chars : min(start + chars + 4, data_end)]
    old = base64.b64decode(quantum, validate=True) if quantum else b""
    inner = offset - 3 * group
    if inner > len(old):
        raise TransferError("offset outside the body")
    new = base64.b64encode(old[:inner] + insert + old[inner:])
    text = body[start : start + chars] + new + body[start + chars + len(quantum) : data_end]
    lines = [text[i : i + width] for i in range(0, len(text), width)]
    return body[:start] + (eol or newline).join(lines) + body[data_end:]


def _reencode_base64(body: bytes, offset: int, insert: bytes, newline: bytes) -> bytes:
    """Re-encode the whole body in 76-character lines, keeping its leading and trailing blanks."""
    decoded = decode(body, TransferEncoding.BASE64)
    if not 0 <= offset <= len(decoded):
        raise TransferError("offset outside the body")
    return _encode_base64_whole(body, decoded[:offset] + insert + decoded[offset:], newline)
