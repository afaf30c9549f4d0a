"""The disclosure added to tracked messages: an HTML footer and a header field.

The footer is an HTML fragment the admin writes in a file; the rewrite splices
it just before the pixel, in the same pass (see
:func:`smtp_tracker.mime.rewrite`).  The header field (``X-Tracking-Notice:
...`` by default) is prepended, as octets, to the header section of a message
that was tracked; the rest of the message is not serialised again, so it
stays byte for byte as it was.

With ``disclosure_optout_link`` the footer of each tracked message also gets
a link to the message's objection page (:meth:`Disclosure.footer_for`,
issue 20): the URL holds a random token only, never an address.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from email.header import Header
from pathlib import Path

from smtp_tracker.mime.inject import find_insertion, pixel_tag

__all__ = [
    "DEFAULT_HEADER_NAME",
    "DEFAULT_OPTOUT_TEXT",
    "MAX_FOOTER_BYTES",
    "MAX_FOOTER_LINE_BYTES",
    "Disclosure",
    "footer_for_part",
    "header_value_problem",
    "read_footer",
]

#: The field name of the disclosure header unless configured otherwise.
DEFAULT_HEADER_NAME = "X-Tracking-Notice"
#: The text of the objection link unless configured otherwise.
DEFAULT_OPTOUT_TEXT = "Do not tell the sender when I open their messages"
#: Largest footer file accepted, in octets.
MAX_FOOTER_BYTES = 64 * 1024
#: Longest footer line accepted, in UTF-8 octets: well inside the 998 of
#: RFC 5322 §2.1.1, so a footer spliced into a 7bit/8bit part adds no
#: over-long line.
MAX_FOOTER_LINE_BYTES = 900
#: RFC 5322 §2.2.3: lines SHOULD be at most 78 characters.
_FOLD_AT = 78
#: RFC 5322 §3.6.8: a field name is printable US-ASCII except ":".
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NEWLINES = re.compile(r"\r\n|\r|\n")
#: The objection link's text, at most (its line stays within MAX_FOOTER_LINE_BYTES).
_MAX_OPTOUT_TEXT_BYTES = 150


def header_value_problem(value: str) -> str | None:
    """What is wrong with ``value`` as a disclosure header value, or None.

    CR and LF would end the field early (header injection), so they, and the
    other control characters but TAB, are refused.  Non-ASCII text is allowed:
    it is sent as RFC 2047 encoded-words.
    """
    if not value.strip():
        return "must not be empty"
    if _CONTROL.search(value):
        return "must be one line without control characters (no CR or LF)"
    return None


def read_footer(path: Path) -> str:
    """Read and check a disclosure footer file: an HTML fragment in UTF-8.

    The text is returned without a byte order mark and without leading and
    trailing white space, with its line endings as written (the rewrite
    gives them the part's own).

    :raises ValueError: when the file cannot be read, is not UTF-8, is empty,
        is over :data:`MAX_FOOTER_BYTES`, holds a NUL or a line over
        :data:`MAX_FOOTER_LINE_BYTES` octets, or leaves the HTML in a state in
        which the pixel after it would not be rendered (an unclosed comment,
        ``<script>``, ``<style>``, ``<title>``...).
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FOOTER_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror or exc})") from None
    if len(data) > MAX_FOOTER_BYTES:
        raise ValueError(f"{path} is larger than {MAX_FOOTER_BYTES} bytes")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 (byte {exc.start})") from None
    if not text:
        raise ValueError(f"{path} is empty")
    if "\x00" in text:
        raise ValueError(f"{path} holds a NUL character")
    for number, line in enumerate(_NEWLINES.split(text), 1):
        if len(line.encode("utf-8")) > MAX_FOOTER_LINE_BYTES:
            raise ValueError(
                f"{path}: line {number} is longer than {MAX_FOOTER_LINE_BYTES} bytes; break it"
            )
    document = "<html><body><p>text</p></body></html>"
    where = find_insertion(document, lambda url: pixel_tag(url, extra_html=text))
    if where != document.index("</body>"):
        raise ValueError(
            f"{path}: an image after this HTML would not be shown "
            "(an unclosed comment, <script>, <style> or <title>?)"
        )
    return text


def footer_for_part(footer: str, codec: str, newline: str) -> str:
    """``footer`` made fit for a part: its line endings, characters its charset lacks as references.

    :param codec: the Python codec of the part's charset.
    :param newline: the part's line ending (``"\\r\\n"`` or ``"\\n"``), or ``" "``
        to put the footer on one line.
    """
    text = _NEWLINES.sub(newline, footer)
    return text.encode(codec, "xmlcharrefreplace").decode(codec)


@dataclass(frozen=True, kw_only=True, slots=True)
class Disclosure:
    """What tracked messages carry to say so.

    :param footer_html: HTML fragment spliced just before the pixel (``""``:
        none); from :func:`read_footer`.
    :param header_name: the field name of the disclosure header.
    :param header_value: its value (None: no header).
    :param optout_link: add a link to the message's objection page to the
        footer (:meth:`footer_for`).
    :param optout_text: the link's text (plain text, escaped).
    :raises ValueError: when the name is not an RFC 5322 field name or the
        value has a line break or control character.
    """

    footer_html: str = ""
    header_name: str = DEFAULT_HEADER_NAME
    header_value: str | None = None
    optout_link: bool = False
    optout_text: str = DEFAULT_OPTOUT_TEXT

    def __post_init__(self) -> None:
        if not _FIELD_NAME.match(self.header_name):
            raise ValueError(f"{self.header_name!r} is not a header field name")
        if self.header_value is not None:
            problem = header_value_problem(self.header_value)
            if problem is not None:
                raise ValueError(f"the disclosure header value {problem}")
        if not self.optout_text.strip() or _CONTROL.search(self.optout_text):
            raise ValueError("must be one line of text without control characters")
        if len(self.optout_text.encode("utf-8")) > _MAX_OPTOUT_TEXT_BYTES:
            raise ValueError(f"must be at most {_MAX_OPTOUT_TEXT_BYTES} bytes")

    def footer_for(self, optout_url: str | None) -> str:
        """The footer of one message: :attr:`footer_html` and, given *optout_url*, the
        objection link after it (its lines within :data:`MAX_FOOTER_LINE_BYTES`:
        the text is at most 150 bytes)."""
        if optout_url is None or not self.optout_link:
            return self.footer_html
        link = (
            '<p style="font-size:12px;color:#666666;margin:8px 0">\n'
            f'<a href="{html.escape(optout_url)}" style="color:#666666">\n'
            f"{html.escape(self.optout_text)}</a>\n</p>"
        )
        return f"{self.footer_html}\n{link}" if self.footer_html else link

    def header_field(self, newline: bytes = b"\r\n") -> bytes:
        """The whole field with its line ending, folded at 78 characters (RFC 5322 §2.2.3).

        ASCII text is folded at spaces (a word longer than a line is kept
        whole); other text is sent as RFC 2047 encoded-words in UTF-8.
        ``b""`` when no header is configured.
        """
        if self.header_value is None:
            return b""
        value = self.header_value.strip()
        charset = "us-ascii" if value.isascii() else "utf-8"
        folded = Header(
            value, charset=charset, header_name=self.header_name, continuation_ws=" "
        ).encode(splitchars=" ", maxlinelen=_FOLD_AT, linesep=newline.decode("ascii"))
        return f"{self.header_name}: {folded}".encode("ascii") + newline

    def add_header(self, message: bytes) -> bytes:
        """``message`` with the disclosure field prepended; the octets after it unchanged.

        The field takes the line ending of the message's first line.
        """
        if self.header_value is None:
            return message
        first = message.find(b"\n")
        newline = b"\r\n" if first > 0 and message[first - 1 : first] == b"\r" else b"\n"
        if first < 0:
            newline = b"\r\n"
        return self.header_field(newline) + message
