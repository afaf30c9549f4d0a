"""One message as a milter sees it, and the milter actions that turn it into the rewrite's output.

Plain classes, no sockets and no libmilter: :class:`MilterMessage` collects
what the MTA sends (envelope, header fields, body chunks) and rebuilds the
message octets the rewrite reads; :func:`edits_for` compares the rewrite's
output with them and says what to ask the MTA for (Sendmail milter protocol,
``SMFIR_CHGHEADER``, ``SMFIR_INSHEADER``, ``SMFIR_REPLBODY``).

Header values are collected with their leading white space
(``SMFIP_HDR_LEADSPC`` negotiated) so that ``name ":" value`` is the field as
written (RFC 5322 §2.2); continuation lines come from the MTA with LF or CRLF
and are rebuilt with CRLF, as the body is (RFC 5322 §2.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["HeaderChange", "MilterEdits", "MilterMessage", "edits_for", "split_fields"]

_NEWLINE = re.compile(rb"\r?\n")


@dataclass(slots=True)
class MilterMessage:
    """What one milter transaction has collected so far.

    :ivar sender: the MAIL FROM address without angle brackets (``""`` for ``<>``).
    :ivar recipients: the RCPT TO addresses the MTA accepted, in order.
    :ivar fields: the header fields as ``(name, value)`` octets, value with its
        leading white space and CRLF line breaks, in order.
    :ivar size_bytes: octets collected (header section and body).
    :ivar oversized: set once ``size_bytes`` passed the limit; the content is then dropped.
    :ivar auth_authen: the SASL login name (``{auth_authen}``), if the client authenticated.
    :ivar incomplete: set when something the MTA sent could not be kept: the
        message is then passed on unchanged, never rewritten from a partial view.
    """

    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    size_bytes: int = 0
    oversized: bool = False
    auth_authen: str | None = None
    incomplete: bool = False

    def add_field(self, name: bytes, value: bytes, *, max_bytes: int) -> None:
        """Keep one header field (``value`` as the MTA sent it) unless over ``max_bytes``."""
        value = _NEWLINE.sub(b"\r\n", value)
        self._grow(len(name) + 1 + len(value) + 2, max_bytes)
        if not self.oversized:
            self.fields.append((name, value))

    def add_body(self, chunk: bytes, *, max_bytes: int) -> None:
        """Keep one body chunk unless the message is then over ``max_bytes``."""
        self._grow(len(chunk), max_bytes)
        if not self.oversized:
            self.body += chunk

    def _grow(self, size: int, max_bytes: int) -> None:
        self.size_bytes += size
        if self.size_bytes > max_bytes and not self.oversized:
            self.oversized = True
            self.fields.clear()
            self.body = bytearray()

    def header_section(self) -> bytes:
        """The header section with its empty line (RFC 5322 §2.1)."""
        return b"".join(name + b":" + value + b"\r\n" for name, value in self.fields) + b"\r\n"

    def octets(self) -> bytes:
        """The whole message: header section, empty line, body."""
        return self.header_section() + bytes(self.body)


@dataclass(frozen=True, slots=True)
class HeaderChange:
    """One header action: ``index`` counts fields of this name from 1 (``smfi_chgheader``);
    ``value`` None removes the field; for an insertion, ``index`` is the position among
    all fields, from 0 (``smfi_insheader``)."""

    name: str
    index: int
    value: str | None


@dataclass(frozen=True, slots=True)
class MilterEdits:
    """What to ask the MTA for so that it holds the rewritten message.

    :ivar removals: fields to remove, in an order in which each index stays valid.
    :ivar insertions: fields to insert, in order.
    :ivar body: the new body, or None when the body is unchanged.
    """

    removals: tuple[HeaderChange, ...]
    insertions: tuple[HeaderChange, ...]
    body: bytes | None


def split_fields(header_section: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of a header section, as ``(name, value)`` with continuation lines kept.

    :param header_section: header lines (CRLF or LF), the empty line optional.
    :raises ValueError: when a line is neither a field nor a continuation.
    """
    fields: list[tuple[bytes, bytes]] = []
    for line in _NEWLINE.split(header_section):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise ValueError("continuation line before the first field")
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError("header line without a colon")
        fields.append((name, value))
    return fields


def _split_message(message: bytes) -> tuple[bytes, bytes]:
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = message.find(separator)
        if end >= 0:
            return message[:end], message[end + len(separator) :]
    return message, b""


def edits_for(original: MilterMessage, rewritten: bytes) -> MilterEdits:
    """The header removals and insertions and the body that turn ``original`` into ``rewritten``.

    The rewrite only removes fields (the control header) and prepends some (the
    disclosure); a field it left in place is kept as it is.  Fields are matched
    in order (a longest common subsequence of the field lists).

    :param original: the message as collected.
    :param rewritten: the rewrite's output for ``original.octets()``.
    :raises ValueError: when ``rewritten`` has no header section that can be split.
    """
    import difflib

    head, body = _split_message(rewritten)
    new_fields = split_fields(head)
    old = [(n.lower(), v) for n, v in original.fields]
    new = [(n.lower(), v) for n, v in new_fields]
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    removals: list[HeaderChange] = []
    insertions: list[HeaderChange] = []
    occurrence: dict[bytes, int] = {}
    numbered = []
    for name, _ in original.fields:
        occurrence[name.lower()] = occurrence.get(name.lower(), 0) + 1
        numbered.append(occurrence[name.lower()])
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            for i in range(i1, i2):
                removed = original.fields[i][0].decode("ascii", "surrogateescape")
                removals.append(HeaderChange(removed, numbered[i], None))
        if tag in ("insert", "replace"):
            for j in range(j1, j2):
                name, value = new_fields[j]
                insertions.append(
                    HeaderChange(
                        name.decode("ascii", "surrogateescape"),
                        j,
                        value.decode("utf-8", "surrogateescape"),
                    )
                )
    # the last occurrence of a name first: removing it leaves earlier indexes as they were
    removals.sort(key=lambda change: (change.name.lower(), -change.index))
    return MilterEdits(
        removals=tuple(removals),
        insertions=tuple(insertions),
        body=None if body == bytes(original.body) else body,
    )
