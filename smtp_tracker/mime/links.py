"""Click tracking: which links of a message are wrapped, and where their ``href`` values lie.

HTML (:func:`find_html_links`): the start tags are found with the standard
library's :class:`html.parser.HTMLParser`, which reports where each tag
starts (:meth:`~html.parser.HTMLParser.getpos`) and its source text; the
attribute value spans inside that text are read with the parser's own
attribute pattern, checked against the attributes the parser reported.  Two
lxml parses then validate the result: the spans' values, decoded by lxml
(libxml2's HTML5 tokenizer: ``&amp;``, ``&#x26;``, and ``&copy=2`` left as
written in an attribute, HTML §13.2.5.73), must be exactly the ``href``
values lxml reads, in the same order, for every ``<a>`` and ``<area>`` of the
document.  Any disagreement (markup the two parsers read differently) means
no link of that part is wrapped.  Links in comments, including Outlook
conditional comments (``<!--[if mso]>...<![endif]-->``), in ``<script>``,
``<style>``, ``<title>``, ``<textarea>`` and other raw-text elements are not
links to either parser; VML (``<v:roundrect href>``) is never an ``<a>``,
and an ``<a>`` inside a VML element is skipped.

Plain text (:func:`find_text_links`): ``http``/``https`` URLs found with a
pattern, without trailing punctuation (RFC 3986 Appendix C).

Which links are wrapped (:class:`LinkRules`): ``http`` and ``https`` URLs
with a host only; never our own tracking host, URLs named in the
``List-Unsubscribe`` header (RFC 2369 §3.2, RFC 8058), URLs matching an
exclusion pattern, nor links whose tag carries the sender's marker attribute.
"""

from __future__ import annotations

import functools
import html.parser
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from html import unescape

from lxml import etree

from smtp_tracker.mime import deadline

__all__ = [
    "DEFAULT_CLICK_EXCLUDE_PATTERNS",
    "DEFAULT_NOTRACK_ATTRIBUTE",
    "Href",
    "LinkRules",
    "destination",
    "find_html_links",
    "find_text_links",
    "list_unsubscribe_urls",
]

#: Links never wrapped by default: unsubscribe, opt-out and preference pages.
DEFAULT_CLICK_EXCLUDE_PATTERNS: tuple[str, ...] = (
    r"unsubscri",
    r"\bunsub\b",
    r"opt[-_.]?out",
    r"preference",
)
#: The attribute a sender puts on a link that must not be wrapped.
DEFAULT_NOTRACK_ATTRIBUTE = "data-notrack"

#: Elements whose content is text, not markup (HTML §13.1.2), besides script
#: and style which :class:`html.parser.HTMLParser` knows already.
_RAW_TEXT = frozenset({"textarea", "title", "xmp", "iframe", "noembed", "noframes"})
_LINK_TAGS = frozenset({"a", "area"})
#: WHATWG URL parsing, basic URL parser steps 1 and 3: leading and trailing C0
#: controls and spaces are stripped, ASCII tab and newline removed.
_C0_OR_SPACE = "".join(chr(c) for c in range(0x21))
_TAB_OR_NEWLINE = str.maketrans("", "", "\t\n\r")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A URL in plain text: scheme, "//", then anything up to a space, a quote or
#: an angle bracket (RFC 3986 Appendix C: ``<...>`` and quotes delimit URLs).
_TEXT_URL = re.compile(r"(?<![A-Za-z0-9+.-])https?://[^\s<>\"']+", re.IGNORECASE)
#: Punctuation that ends a sentence rather than the URL.
_TRAILING = ".,;:!?*'\""
_BRACKETS = {")": "(", "]": "[", "}": "{"}
_ANGLE_URI = re.compile(r"<([^<>]*)>")
_WHITESPACE = re.compile(r"\s+")
#: HTML attribute names: no space, quote, "/", ">" or "=" (HTML §13.1.2.3).
_ATTRIBUTE_NAME = re.compile(r"[^\s\"'/>=\x00]+\Z")
#: Characters fed to lxml at a time.
_CHUNK = 1 << 20
#: html.parser gets the text in at most this many pieces of at least _MIN_FEED characters.
_FEEDS = 8
_MIN_FEED = 1 << 18
#: Characters html.parser may hold unread at the end and still be closed (close() is
#: quadratic in them).
_MAX_UNREAD_AT_CLOSE = 1024


@dataclass(frozen=True, slots=True)
class Href:
    """One link found in a text: ``text[start:end]`` is what is replaced.

    :param start: index of the first character of the ``href`` value (inside
        its quotes), or of the URL in plain text.
    :param end: index just past it.
    :param url: the destination: the value with character references decoded
        (as an HTML5 parser reads an attribute value), then trimmed by
        :func:`destination`.
    :param tag: ``"a"`` or ``"area"``; ``""`` for a URL in plain text.
    :param attributes: the tag's attribute names, lower-cased.
    :param in_vml: whether the tag is inside a VML element (``v:*``).
    """

    start: int
    end: int
    url: str
    tag: str = ""
    attributes: frozenset[str] = frozenset()
    in_vml: bool = False


def destination(value: str) -> str:
    """Where a browser goes for an ``href`` value whose references are decoded.

    WHATWG URL Standard, basic URL parser: leading and trailing C0 controls and
    spaces are dropped, ASCII tabs and newlines removed anywhere.
    """
    return value.strip(_C0_OR_SPACE).translate(_TAB_OR_NEWLINE)


def list_unsubscribe_urls(headers: Message) -> frozenset[str]:
    """The URIs in the message's ``List-Unsubscribe`` fields (RFC 2369 §3.2).

    Each is written in angle brackets, comma-separated; white space inside the
    brackets is ignored (RFC 2369 §2).
    """
    urls: set[str] = set()
    for value in headers.get_all("List-Unsubscribe", []):
        for uri in _ANGLE_URI.findall(str(value)):
            urls.add(_WHITESPACE.sub("", uri))
    return frozenset(urls)


@functools.lru_cache(maxsize=32)
def _compile(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


def _hostname(url: str) -> str | None:
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return None
    return host.rstrip(".") if host else None


@dataclass(frozen=True, kw_only=True)
class LinkRules:
    """Which links are wrapped.

    :param exclude_patterns: regular expressions, searched case-insensitively
        in the destination URL; a match is never wrapped.
    :param notrack_attribute: a link whose tag carries this attribute (any
        value, any case) is never wrapped; the attribute stays.
    :param own_host: the tracking host (of the click base URL): links to it are
        never wrapped (they are ours already, or our pixel).
    :param unsubscribe_urls: URLs of the message's ``List-Unsubscribe`` field.
    :raises ValueError: when a pattern is not a valid regular expression or
        the attribute is not an attribute name.
    """

    exclude_patterns: tuple[str, ...] = DEFAULT_CLICK_EXCLUDE_PATTERNS
    notrack_attribute: str = DEFAULT_NOTRACK_ATTRIBUTE
    own_host: str | None = None
    unsubscribe_urls: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        try:
            _compile(tuple(self.exclude_patterns))
        except re.error as exc:
            raise ValueError(f"click_exclude_patterns: not a regular expression: {exc}") from None
        if not isinstance(self.notrack_attribute, str) or not _ATTRIBUTE_NAME.match(
            self.notrack_attribute
        ):
            raise ValueError(
                f"click_notrack_attribute: not an attribute name: {self.notrack_attribute!r}"
            )

    def skip_reason(self, link: Href) -> str | None:
        """Why ``link`` is not wrapped (kebab-case), or None when it is.

        ``"vml"``, ``"notrack"``, ``"not-http"`` (``mailto:``, ``tel:``,
        ``#...``, ``cid:``, ``data:``, ``javascript:``, relative URLs...),
        ``"malformed"`` (no host, a bad port, control characters),
        ``"own-host"``, ``"list-unsubscribe"`` or ``"excluded"``.
        """
        if link.in_vml:
            return "vml"
        if self.notrack_attribute.lower() in link.attributes:
            return "notrack"
        url = link.url
        scheme, sep, rest = url.partition(":")
        if not sep or scheme.lower() not in ("http", "https") or not rest.startswith("//"):
            return "not-http"
        host = _hostname(url)
        if not host or _CONTROL.search(url):
            return "malformed"
        if self.own_host is not None and host == self.own_host.lower().rstrip("."):
            return "own-host"
        if url in self.unsubscribe_urls:
            return "list-unsubscribe"
        if any(p.search(url) for p in _compile(tuple(self.exclude_patterns))):
            return "excluded"
        return None


# -- HTML ---------------------------------------------------------------------------------


class _StartTags(html.parser.HTMLParser):
    """Collects the ``<a>`` and ``<area>`` start tags with their offsets."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self._lines = [0, *(m.end() for m in re.finditer("\n", text))]
        #: (offset of "<", source text, attributes as the parser read them)
        self.tags: list[tuple[int, str, list[tuple[str, str | None]]]] = []

    def scan(self, text: str) -> bool:
        """Feed all of ``text``; False when the end could not be read in linear time.

        :class:`html.parser.HTMLParser` waits at a construct it cannot finish
        (a ``<`` with no ``>`` after it, an unclosed comment) and scans again
        from there at each :meth:`feed`; at :meth:`close` it steps over such
        a construct two characters at a time, scanning to the end each time:
        quadratic (``"<a" * 131072`` took 93 s).  So the text goes in at most
        :data:`_FEEDS` pieces (each rescan is linear, their number bounded),
        the deadline is checked between them, and :meth:`close` runs only
        when what is left unread is short: else the tags there are not
        reported, which lxml's reading then shows (no link is wrapped).
        """
        size = max(_MIN_FEED, -(-len(text) // _FEEDS))
        for start in range(0, len(text), size):
            deadline.check()
            self.feed(text[start : start + size])
        deadline.check()
        if len(self.rawdata) > _MAX_UNREAD_AT_CLOSE:
            return False
        self.close()
        return True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _RAW_TEXT:
            self.set_cdata_mode(tag)  # what follows up to </tag> is text
        if tag in _LINK_TAGS:
            line, column = self.getpos()
            source = self.get_starttag_text() or ""
            self.tags.append((self._lines[line - 1] + column, source, attrs))


#: html.parser's own patterns for a start tag's name and attributes (what
#: ``HTMLParser.parse_starttag`` matches); each use is checked against the
#: attributes the parser reported.
_TAG_NAME: re.Pattern[str] = html.parser.tagfind_tolerant  # type: ignore[attr-defined]
_ATTRIBUTE: re.Pattern[str] = html.parser.attrfind_tolerant  # type: ignore[attr-defined]


def _href_span(source: str, attrs: list[tuple[str, str | None]]) -> tuple[int, int] | None:
    """Where the first ``href`` value lies in a start tag's source text.

    :returns: ``(start, end)`` inside ``source``, quotes excluded; None when
        the tag has no ``href`` with a value.
    :raises _Disagreement: when the attributes read here differ from the parser's.
    """
    found: list[tuple[str, str | None]] = []
    span: tuple[int, int] | None = None
    match = _TAG_NAME.match(source, 1)
    if match is None:
        raise _Disagreement("start tag")
    k = match.end()
    while k < len(source):
        m = _ATTRIBUTE.match(source, k)
        if m is None:
            break
        name, rest, value = m.group(1, 2, 3)
        start, end = m.span(3)
        if not rest:
            value = None
        elif value[:1] == "'" == value[-1:] or value[:1] == '"' == value[-1:]:
            value = value[1:-1]
            start, end = start + 1, end - 1
        found.append((name.lower(), unescape(value) if value else value))
        if span is None and name.lower() == "href" and value is not None:
            span = (start, end)
        k = m.end()
    if found != attrs:
        raise _Disagreement("attributes")
    return span


class _Disagreement(Exception):
    """html.parser and lxml do not read the links the same way."""


@dataclass(frozen=True, slots=True)
class _Element:
    tag: str
    href: str | None
    attributes: frozenset[str]
    in_vml: bool


def _lxml_links(text: str) -> list[_Element]:
    """Every ``<a>``/``<area>`` lxml reads in ``text``, in source order (streamed)."""
    parser = etree.HTMLPullParser(
        events=("start", "end"), encoding="utf-8", huge_tree=True, no_network=True
    )
    found: list[_Element] = []
    vml = [0]  # open VML elements (counted, not looked up: deep nesting stays linear)

    def read() -> None:
        for event, element in parser.read_events():
            if not isinstance(element, etree._Element) or not isinstance(element.tag, str):
                continue
            is_vml = element.tag.lower().startswith("v:")
            if event == "start":
                if element.tag in _LINK_TAGS:
                    found.append(
                        _Element(
                            element.tag,
                            element.get("href"),
                            frozenset(str(k).lower() for k in element.keys()),  # noqa: SIM118
                            vml[0] > 0,
                        )
                    )
                vml[0] += is_vml
                continue
            vml[0] -= is_vml
            element.clear()
            parent = element.getparent()
            if parent is not None:
                while element.getprevious() is not None:
                    del parent[0]

    for start in range(0, len(text), _CHUNK):
        deadline.check()
        parser.feed(text[start : start + _CHUNK].encode("utf-8", "replace"))
        read()
    deadline.check()
    try:
        parser.close()
    except etree.XMLSyntaxError:  # nothing but comments or white space
        return found
    read()
    return found


def _decode_values(values: Sequence[str]) -> list[str | None] | None:
    """The raw attribute values as lxml decodes them (one parse for all), or None."""
    pieces = ["<body>"]
    for value in values:
        if '"' not in value:
            pieces.append(f'<a href="{value}"></a>')
        elif "'" not in value:
            pieces.append(f"<a href='{value}'></a>")
        else:  # an unquoted value (html.parser's reading: no space, no ">")
            pieces.append(f"<a href={value} ></a>")
    root = etree.fromstring(
        "".join(pieces).encode("utf-8", "replace"),
        etree.HTMLParser(encoding="utf-8", no_network=True),
    )
    decoded: list[str | None] = [a.get("href") for a in root.iter("a")]
    return decoded if len(decoded) == len(values) else None


def find_html_links(text: str) -> tuple[list[Href], str | None]:
    """The ``href`` values of the ``<a>`` and ``<area>`` elements of an HTML document.

    :param text: the decoded HTML.
    :returns: ``(links, defect)``: the links in document order with their
        spans in ``text``; when the two parsers disagree, no links and a short
        defect text (``"links-not-aligned"``); when the markup ends inside a
        construct html.parser could only finish in quadratic time (over 1,024
        characters left unread), no links and ``"links-markup-unfinished"``.
        Linear in ``len(text)``.
    :raises ~smtp_tracker.mime.deadline.TimeLimitExceeded: when the rewrite's
        deadline passes (checked between pieces of 256 Ki characters or more).
    """
    scanner = _StartTags(text)
    if not scanner.scan(text):
        return [], "links-markup-unfinished"
    spans: list[tuple[int, int] | None] = []
    try:
        for offset, source, attrs in scanner.tags:
            if not text.startswith(source, offset):
                raise _Disagreement("offset")
            span = _href_span(source, attrs)
            spans.append(None if span is None else (offset + span[0], offset + span[1]))
    except _Disagreement:
        return [], "links-not-aligned"
    elements = _lxml_links(text)
    raw = [text[s[0] : s[1]] for s in spans if s is not None]
    decoded = _decode_values(raw) if raw else []
    if decoded is None or len(elements) != len(spans):
        return [], "links-not-aligned"
    links: list[Href] = []
    values = iter(decoded)
    for span, element, (_offset, source, _attrs) in zip(spans, elements, scanner.tags, strict=True):
        tag = _TAG_NAME.match(source, 1)
        if tag is None or tag.group(1).lower() != element.tag:
            return [], "links-not-aligned"
        if span is None:
            if element.href not in (None, ""):
                return [], "links-not-aligned"
            continue
        value = next(values)
        if value != element.href or value is None:
            return [], "links-not-aligned"
        links.append(
            Href(
                span[0],
                span[1],
                destination(value),
                element.tag,
                element.attributes,
                element.in_vml,
            )
        )
    return links, None


# -- plain text ---------------------------------------------------------------------------


def find_text_links(text: str) -> list[Href]:
    """The ``http``/``https`` URLs in plain text, in order.

    A URL ends at white space, a quote or an angle bracket (``<URL>``, RFC 3986
    Appendix C); trailing sentence punctuation and unbalanced closing brackets
    are not part of it.
    """
    links: list[Href] = []
    for match in _TEXT_URL.finditer(text):
        url = _trim(match.group())
        if url:
            links.append(Href(match.start(), match.start() + len(url), url))
    return links


def _trim(url: str) -> str:
    while url:
        last = url[-1]
        unbalanced = last in _BRACKETS and url.count(last) > url.count(_BRACKETS[last])
        if last not in _TRAILING and not unbalanced:
            break
        url = url[:-1]
    return url
