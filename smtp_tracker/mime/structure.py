"""Byte-level MIME structure: where each part's header and body lie in the original octets.

The walker reads the message the way CPython's ``email.feedparser`` does
(same header-line test, same boundary-line test, outer boundaries end inner
parts, one line ending before a boundary belongs to the boundary: RFC 2046
§5.1.1), but it records byte offsets into the original message instead of
building a tree of decoded strings, so that a rewrite can replace one body and
leave every other octet as it was.  Header fields are read with the
:mod:`email` package's own compat32 field parser.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.policy import compat32

__all__ = ["Field", "Part", "eol_before", "iter_children", "read_part"]

#: A line ending as the email package sees one.
_LINE_END = re.compile(rb"\r\n|\r|\n")
#: ``email.feedparser.headerRE``: a header line, a continuation line, or an mbox ``From `` line.
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")


@dataclass(frozen=True, slots=True)
class Field:
    """One header field as written: ``data[start:end]`` is its first line,
    its continuation lines and the line ending of the last one.

    :param name: the field name (ASCII, surrogate-escaped octets), stripped.
    :param value: the unfolded value as compat32 reads it.
    """

    name: str
    value: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Part:
    """A MIME entity in the original message octets.

    ``data[start:body_start]`` is the header section with its blank separator
    line; ``data[body_start:end]`` is the body (without the line ending that
    belongs to the next boundary, RFC 2046 §5.1.1).

    :param headers: the header fields parsed with the compat32 policy, for
        ``get_content_type()``, ``get_param()`` and friends.
    :param fields: the same fields with their byte ranges.
    :param defects: names of what was wrong (email defect class names).
    """

    start: int
    body_start: int
    end: int
    headers: Message
    fields: tuple[Field, ...]
    defects: tuple[str, ...]


def read_part(data: bytes, start: int, end: int, *, default_type: str = "text/plain") -> Part:
    """Read the header section of the entity ``data[start:end]``.

    The header section ends at the first empty line (RFC 5322 §2.1), or, as in
    ``email.feedparser``, at the first line that is neither a field nor a
    continuation line (that line starts the body: a
    ``MissingHeaderBodySeparatorDefect``).

    :param default_type: the content type when there is no valid
        Content-Type field (``message/rfc822`` inside ``multipart/digest``,
        RFC 2046 §5.1.5).
    :returns: the part; never raises for malformed input.
    """
    defects: list[str] = []
    fields: list[Field] = []
    headers = Message()
    headers.set_default_type(default_type)
    # first line start, source lines and end of the field being read
    current: tuple[int, list[str]] | None = None
    current_end = start
    pos = start
    body_start = end
    first_line = True
    while pos < end:
        match = _LINE_END.search(data, pos, end)
        line_end = match.end() if match else end
        content_end = match.start() if match else end
        if content_end == pos and match is not None:  # the empty separator line
            body_start = line_end
            break
        if not _HEADER_LINE.match(data, pos, content_end):
            defects.append("MissingHeaderBodySeparatorDefect")
            body_start = pos
            break
        line = data[pos:line_end].decode("ascii", "surrogateescape")
        if line[0] in " \t":
            if current is None:
                defects.append("FirstHeaderLineIsContinuationDefect")
            else:
                current[1].append(line)
                current_end = line_end
        else:
            if current is not None:
                fields.append(_field(headers, current, current_end))
                current = None
            if line.startswith("From "):
                if first_line:
                    headers.set_unixfrom(line.rstrip("\r\n"))
                else:
                    defects.append("MisplacedEnvelopeHeaderDefect")
            elif line.startswith(":"):
                defects.append("InvalidHeaderDefect")
            else:
                current = (pos, [line])
                current_end = line_end
        first_line = False
        pos = line_end
    if current is not None:
        fields.append(_field(headers, current, current_end))
    return Part(
        start=start,
        body_start=body_start,
        end=end,
        headers=headers,
        fields=tuple(fields),
        defects=tuple(defects),
    )


def _field(headers: Message, current: tuple[int, list[str]], end: int) -> Field:
    start, lines = current
    name, value = compat32.header_source_parse(lines)
    headers.set_raw(name, value)
    return Field(name=name.strip(), value=value, start=start, end=end)


def eol_before(data: bytes, pos: int, floor: int = 0) -> int:
    """Length (0, 1 or 2) of the line ending that ends just before ``data[pos]``."""
    if pos - 2 >= floor and data[pos - 2 : pos] == b"\r\n":
        return 2
    if pos - 1 >= floor and data[pos - 1] in (0x0A, 0x0D):
        return 1
    return 0


@dataclass(frozen=True, slots=True)
class _Delimiter:
    start: int  # first octet of the "--boundary" line
    end: int  # past its line ending
    close: bool  # "--boundary--"


def _delimiters(data: bytes, part: Part, boundary: bytes) -> Iterator[_Delimiter]:
    # RFC 2046 §5.1.1: a boundary line, optional "--", transport padding, CRLF;
    # email.feedparser accepts CR, LF or CRLF and a line at the end of input.
    pattern = re.compile(
        rb"(?<![^\r\n])--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r\n|\r|\n|\Z)"
    )
    pos = part.body_start
    while True:
        match = pattern.search(data, pos, part.end)
        if match is None:
            return
        if match.start() == part.body_start or eol_before(data, match.start()):
            yield _Delimiter(match.start(), match.end(), match.group(1) is not None)
        pos = max(match.end(), match.start() + 1)


def iter_children(data: bytes, part: Part, defects: list[str]) -> Iterator[Part]:
    """The body parts of the multipart entity ``part``, in order, lazily.

    Follows ``email.feedparser``: the preamble before the first delimiter and
    the epilogue after the close delimiter are skipped; repeated delimiter
    lines make no empty parts; a missing close delimiter ends the last part at
    the end of ``part`` (``CloseBoundaryNotFoundDefect``); no delimiter at all
    means no parts (``StartBoundaryNotFoundDefect``); no boundary parameter
    means no parts (``NoBoundaryInMultipartDefect``).

    :param defects: list the defects met are appended to.
    """
    boundary = part.headers.get_boundary()
    if boundary is None:
        defects.append("NoBoundaryInMultipartDefect")
        return
    default_type = (
        "message/rfc822" if part.headers.get_content_type() == "multipart/digest" else "text/plain"
    )
    try:
        boundary_octets = boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # RFC 2046 §5.1.1: boundaries are 7bit; RFC 2231 values may not be
        defects.append("InvalidBoundaryDefect")
        return
    delimiters = _delimiters(data, part, boundary_octets)
    first = next(delimiters, None)
    if first is None or first.close:
        defects.append("StartBoundaryNotFoundDefect")
        return
    pos = first.end
    following = next(delimiters, None)
    while True:
        while following is not None and following.start == pos:  # repeated delimiter lines
            pos = following.end
            following = next(delimiters, None)
        if following is None:
            defects.append("CloseBoundaryNotFoundDefect")
            end = part.end
            if end == len(data):  # the message's own end: one line ending is not content
                end -= eol_before(data, end, pos)
            yield read_part(data, pos, max(end, pos), default_type=default_type)
            return
        end = following.start - eol_before(data, following.start, pos)
        yield read_part(data, pos, max(end, pos), default_type=default_type)
        if following.close:
            return
        pos = following.end
        following = next(delimiters, None)
