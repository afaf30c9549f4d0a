"""The HTML splice: the pixel ``<img>`` and where in the decoded text it goes.

lxml is used only to decide *where*: each candidate place (just before the
last ``</body>``, else the last ``</html>``, else the end of the fragment) is
tried by parsing the document with a probe ``<img>`` spliced in there.  The
candidate is taken when the probe comes out as a real ``img`` element in the
body, which rules out ``</body>`` inside comments, Outlook conditional
comments, ``<script>``/``<style>``, ``<title>``/``<textarea>``, CDATA
sections and attribute values, whatever the quirks of the markup.  The tree
is then thrown away: the caller splices the pixel into the original text, so
every other character stays as written.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator

from lxml import etree

from smtp_tracker.mime import deadline
from smtp_tracker.tokens import to_ascii_url

__all__ = [
    "PIXEL_STYLE",
    "InjectError",
    "find_insertion",
    "find_start_insertion",
    "is_xhtml",
    "pixel_tag",
    "renders_at",
]

#: Inline style of the pixel.  Not ``display:none``: several mail clients and
#: image proxies do not fetch images hidden that way (and spam filters score
#: hidden images), so the open would never be seen.  It takes no room
#: (issue 19, item 5): an inline 1x1 image after a block (``</table>``,
#: ``</center>``) opened a line box of its own, one line taller (18 px), and
#: at the end of a body with no margin it added 1 px.  Taken out of the flow
#: (``position:absolute``) it opens no line box, and at the containing block's
#: top left corner (``top:0;left:0``; its static position at the bottom would
#: stretch the page by its 1 px) it overflows nothing: in Chromium every
#: corpus template renders with the same height and pixels with it as
#: without, and it is still fetched (tests/e2e/test_pixel_render.py).  Clients
#: that ignore ``position`` (Outlook's Word engine, see docs/counting.md) show
#: the transparent 1x1 image where it was spliced, as before.  The style ends
#: with ``opacity:0`` (the base64 padding of :func:`pixel_tag` relies on it).
PIXEL_STYLE = (
    "position:absolute;top:0px;left:0;border:0;width:1px;height:1px;margin:0;padding:0;opacity:0"
)
#: The same style 0, 1 and 2 characters longer (``pixel_tag(pad=...)``): a trailing
#: ";" is an empty declaration (CSS Syntax §5.4.5), 0.0 is 0.
_PADDED_STYLES = (PIXEL_STYLE, PIXEL_STYLE + ";", PIXEL_STYLE.removesuffix(":0") + ":0.0")

_XHTML_DOCTYPE = re.compile(r"<!DOCTYPE\s+html\s+PUBLIC\s+\"-//W3C//DTD\s+XHTML", re.IGNORECASE)
_BODY_END = re.compile(r"</body[\t\n\f\r />]", re.IGNORECASE)
_HTML_END = re.compile(r"</html[\t\n\f\r />]", re.IGNORECASE)
#: An opening body tag, attributes and all (quoted values may hold ">").
_BODY_START = re.compile(r"<body(?=[\t\n\f\r />])(?:[^>\"']|\"[^\"]*\"|'[^']*')*>", re.IGNORECASE)
#: Opening body tags tried by :func:`find_start_insertion`.
_MAX_START_PROBES = 2
_TRAILING_SPACE = " \t\r\n\f"
#: Where a real img must not end up: outside the rendered body.
_NOT_RENDERED = frozenset(
    {
        "head",
        "title",
        "template",
        "select",
        "option",
        "optgroup",
        "datalist",
        "noembed",
        "noframes",
        "iframe",
        "textarea",
        "svg",
        "math",
    }
)
#: Characters fed to the parser at a time.
_CHUNK = 1 << 20
#: Probe parses per part: each is a full parse of the document.
_MAX_PROBES = 6
_MAX_PROBES_LARGE = 3
_LARGE_TEXT = 8 * 1024 * 1024


class InjectError(ValueError):
    """The HTML could not be parsed within libxml2's resource limits (depth, size)."""


def pixel_tag(
    url: str, *, xhtml: bool = False, newline: str = "", pad: int = 0, extra_html: str = ""
) -> str:
    """The pixel element, ASCII only, after ``extra_html`` (the disclosure footer) if given.

    ``<img src="URL" width="1" height="1" alt="" style="...">``, or ending
    ``" />"`` for XHTML.  The URL is made ASCII (other characters
    percent-encoded as UTF-8) and escaped with ``html.escape(url, quote=True)``.

    :param newline: when given (``"\\r\\n"`` or ``"\\n"``), it separates the
        attributes instead of spaces, to keep long lines under 998 octets
        (RFC 5322 §2.1.1) without adding text outside the tag.
    :param pad: 0, 1 or 2 characters more, to make the length a multiple of 3
        for base64, written inside the style so that it means the same:
        ``opacity:0;`` (an empty declaration after it) or ``opacity:0.0``
        (rather than spaces before ``>``, which left ``opacity:0"  >``).
    :param extra_html: HTML placed right before the element, as given; with
        ``newline``, on lines of its own.
    """
    safe_url = to_ascii_url(url)
    parts = [
        "<img",
        f'src="{html.escape(safe_url, quote=True)}"',
        'width="1"',
        'height="1"',
        'alt=""',
        f'style="{_PADDED_STYLES[pad]}"',
    ]
    close = "/>" if xhtml else ">"
    if newline:
        before = newline + extra_html + newline if extra_html else ""
        return before + newline.join(parts) + newline + close
    return extra_html + " ".join(parts) + (" " + close if xhtml else close)


def is_xhtml(text: str) -> bool:
    """Whether the document declares XHTML (doctype or XML declaration) near its start."""
    head = text[:4096]
    return bool(_XHTML_DOCTYPE.search(head)) or head.lstrip("\ufeff \t\r\n").startswith("<?xml")


def find_insertion(text: str, probe: Callable[[str], str]) -> int | None:
    """Where the pixel goes in ``text``: an index, or None when there is no safe place.

    Candidates in order: before the last ``</body>`` (``</BODY >`` too),
    earlier ``</body>`` tags, the last ``</html>``, then the end of the
    fragment (before trailing whitespace).  Each is accepted only if a probe
    element spliced there parses as an ``img`` inside the rendered body and
    outside an unclosed conditional comment (``<!--[if !mso]><!-->``,
    ``<![if ...]>``).

    :param probe: builds the probe element for a URL (the same shape as the
        pixel, so it parses the same way).
    :raises InjectError: when libxml2 stops on a resource limit (nesting over
        2048 levels).
    """
    budget = _MAX_PROBES_LARGE if len(text) > _LARGE_TEXT else _MAX_PROBES
    url = _probe_url(text)
    tag = probe(url)
    # the last few </body>, then the last </html>, then the end: always some of each kind
    candidates = [m.start() for m in _BODY_END.finditer(text)][::-1][: max(budget - 2, 1)]
    candidates += [m.start() for m in _HTML_END.finditer(text)][-1:]
    candidates.append(len(text.rstrip(_TRAILING_SPACE)))
    for index in dict.fromkeys(candidates):
        if budget == 0:
            break
        budget -= 1
        if _accepts(text, index, tag, url):
            return index
    return None


def find_start_insertion(text: str, probe: Callable[[str], str]) -> int | None:
    """Where a pixel goes at the start of the body: right after the opening ``<body>`` tag.

    For ``pixel_position = "start"`` or ``"both"``: Gmail clips a message whose
    HTML is over about 102 KB and hides the rest, a pixel at the end included;
    one at the start is still fetched.  The first two ``<body ...>`` tags are
    tried, each accepted only as :func:`find_insertion` accepts a place (the
    probe parses as a rendered ``img`` in the body, outside conditional
    comments), so a ``<body>`` in a comment, a script or an attribute value is
    passed over.  A fragment without an opening ``<body>`` has no start place.

    :returns: the index just after the tag, or None.
    :raises InjectError: as :func:`find_insertion`.
    """
    url = _probe_url(text)
    tag = probe(url)
    for number, match in enumerate(_BODY_START.finditer(text)):
        if number == _MAX_START_PROBES:
            break
        if _accepts(text, match.end(), tag, url):
            return match.end()
    return None


def renders_at(text: str, index: int, probe: Callable[[str], str]) -> bool:
    """Whether the element ``probe`` builds, spliced at ``index``, parses as a rendered ``img``.

    The check :func:`find_insertion` makes of each candidate, for one place
    (the disclosure footer before the pixel, at the place found for the pixel).

    :raises InjectError: as :func:`find_insertion`.
    """
    url = _probe_url(text)
    return _accepts(text, index, probe(url), url)


def _probe_url(text: str) -> str:
    """A URL for the probe element that ``text`` does not hold (so the probe is told apart)."""
    url = "urn:x-smtp-tracker:probe"
    while url in text:
        url += "-"
    return url


def _accepts(text: str, index: int, tag: str, url: str) -> bool:
    """Whether the probe ``tag`` spliced at ``index`` parses as a rendered ``img`` element.

    The document is parsed as a stream and every finished element is dropped
    at once, so memory stays small whatever the size; the parse stops as soon
    as the probe is seen (what follows cannot change how it was read).

    :raises InjectError: when libxml2 stopped before the end of the document.
    """
    parser = etree.HTMLPullParser(
        events=("end", "comment"),
        encoding="utf-8",
        huge_tree=True,
        no_network=True,
        remove_comments=False,
        remove_pis=False,
    )
    scan = _Scan(url)
    for chunk in _chunks(text, index, tag):
        deadline.check()
        parser.feed(chunk)
        if scan.read(parser) is not None:
            return scan.found is True
    try:
        root = parser.close()
    except etree.XMLSyntaxError:  # nothing but comments or whitespace
        return False
    if scan.read(parser) is not None:
        return scan.found is True
    if root is not None and not scan.root_closed:
        # libxml2 stopped early without a word: its nesting limit (2048 levels)
        raise InjectError("HTML nesting too deep to parse")
    return False


class _Scan:
    """Follows the parse events until the probe shows up."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.marker: str | None = None  # the last conditional-comment marker seen
        self.root_closed = False
        self.found: bool | None = None  # None until the probe is seen

    def read(self, parser: etree.HTMLPullParser) -> bool | None:
        for event, element in parser.read_events():
            if not isinstance(element, etree._Element):
                continue
            if event == "comment":
                content = element.text or ""
                if content.lstrip().startswith("[if") or "[endif]" in content:
                    self.marker = content
                continue
            if element.tag == "img" and element.get("src") == self.url:
                self.found = _rendered(element, self.marker)
                return self.found
            if element.getparent() is None:
                self.root_closed = True
            _drop(element)
        return None


def _chunks(text: str, index: int, tag: str) -> Iterator[bytes]:
    """The document with the probe, as UTF-8, in pieces of about :data:`_CHUNK` characters."""
    for start in range(0, index, _CHUNK):
        yield text[start : min(start + _CHUNK, index)].encode("utf-8", "replace")
    yield tag.encode("utf-8", "replace")  # the footer before the probe may be non-ASCII
    for start in range(index, len(text), _CHUNK):
        yield text[start : start + _CHUNK].encode("utf-8", "replace")


def _rendered(element: etree._Element, marker: str | None) -> bool:
    if any(ancestor.tag in _NOT_RENDERED for ancestor in element.iterancestors()):
        return False
    # inside <!--[if !mso]><!--> ... <!--<![endif]--> or <![if ...]> ... <![endif]>
    return marker is None or "[endif]" in marker


def _drop(element: etree._Element) -> None:
    """Forget a finished element and its earlier siblings (keeps memory flat)."""
    element.clear()
    parent = element.getparent()
    if parent is not None:
        while element.getprevious() is not None:
            del parent[0]
