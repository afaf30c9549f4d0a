"""What every click-tracking rewrite must satisfy, checked beside the pixel-only rewrite.

The same message is rewritten twice, without and with ``track_clicks``; the
pixel is the same in both, so the two results may differ only in the values
the click rewrite spliced.  Checked independently of the rewrite's own code:
the structure with the :mod:`email` package, the ``href`` values with lxml.
"""

from __future__ import annotations

import email
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from email.policy import compat32

from lxml import etree

from smtp_tracker.mime import RewriteResult
from smtp_tracker.mime.charset import decode_text
from smtp_tracker.tokens import is_well_formed_token
from tests.mime.invariants import _raw, decoded_payload, leaves, long_lines

#: The default exclusions, written out again (not read from the package).
DEFAULT_EXCLUDES = (r"unsubscri", r"\bunsub\b", r"opt[-_.]?out", r"preference")
_C0_OR_SPACE = "".join(chr(c) for c in range(0x21))


def destination(value: str) -> str:
    """WHATWG URL parser steps 1-3: trim C0 controls and spaces, drop tabs and newlines."""
    return value.strip(_C0_OR_SPACE).replace("\t", "").replace("\n", "").replace("\r", "")


def click_pattern(base_url: str) -> re.Pattern[bytes]:
    return re.compile(re.escape(base_url.encode()) + rb"/c/([A-Za-z0-9_-]{23})")


@dataclass(frozen=True)
class Anchor:
    """An ``<a>``/``<area>`` as lxml reads it."""

    tag: str
    href: str | None
    attributes: frozenset[str]
    in_vml: bool


def anchors(text: str) -> list[Anchor]:
    """Every ``<a>`` and ``<area>`` of an HTML document, in document order (lxml)."""
    root = etree.fromstring(
        text.encode("utf-8", "replace"),
        etree.HTMLParser(encoding="utf-8", huge_tree=True, no_network=True),
    )
    if root is None:
        return []
    found = []
    for element in root.iter("a", "area"):
        found.append(
            Anchor(
                str(element.tag),
                element.get("href"),
                frozenset(str(k).lower() for k in element.attrib),
                any(
                    isinstance(a.tag, str) and a.tag.lower().startswith("v:")
                    for a in element.iterancestors()
                ),
            )
        )
    return found


def unsubscribe_urls(message: bytes) -> set[str]:
    headers = email.message_from_bytes(message, policy=compat32)
    urls = set()
    for value in headers.get_all("List-Unsubscribe", []):
        urls.update(re.sub(r"\s+", "", u) for u in re.findall(r"<([^<>]*)>", str(value)))
    return urls


def excluded(
    url: str,
    *,
    attributes: Iterable[str] = (),
    in_vml: bool = False,
    unsubscribe: set[str] | frozenset[str] = frozenset(),
    own_host: str = "",
    patterns: Sequence[str] = DEFAULT_EXCLUDES,
) -> str | None:
    """Why a link must not be wrapped (the issue's list), or None."""
    if in_vml:
        return "vml"
    if "data-notrack" in attributes:
        return "notrack"
    parts = urllib.parse.urlsplit(url) if re.match(r"(?i)https?://", url) else None
    if parts is None:
        return "not-http"
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - a bad port is malformed
    except ValueError:
        return "malformed"
    if not host or re.search(r"[\x00-\x1f\x7f]", url):
        return "malformed"
    if own_host and host == own_host:
        return "own-host"
    if url in unsubscribe:
        return "list-unsubscribe"
    if any(re.search(p, url, re.IGNORECASE) for p in patterns):
        return "excluded"
    return None


@dataclass(frozen=True)
class Wrapped:
    """One spliced value: the click token, and the value it replaced (octets as decoded)."""

    token: str
    old_value: bytes
    ctype: str


def check_clicks(
    original: bytes,
    pixel_only: RewriteResult,
    clicked: RewriteResult,
    base_url: str,
    *,
    html_links_expected: bool = True,
) -> list[Wrapped]:
    """Assert the invariants; return the spliced values in order of the message."""
    assert clicked.tracked == pixel_only.tracked
    assert clicked.reason == pixel_only.reason
    if not clicked.tracked:
        assert clicked.links == ()
        assert clicked.message == pixel_only.message
        return []
    pattern = click_pattern(base_url)
    old_parts, new_parts = leaves(pixel_only.message), leaves(clicked.message)
    assert len(old_parts) == len(new_parts), "the MIME structure changed"
    wrapped: list[Wrapped] = []
    out = clicked.message
    for old, new in zip(old_parts, new_parts, strict=True):
        assert old.items() == new.items(), "part headers changed"
        if old.is_multipart() or _raw(old) == _raw(new):
            continue
        assert new.get_content_type() in ("text/html", "text/plain")
        urls = {link.token: link.url for link in clicked.links}
        wrapped.extend(_spliced_values(old, new, pattern, urls))
        _check_encoded_lines(old, new)
        out = out.replace(_raw(new), _raw(old), 1)
    assert out == pixel_only.message, "octets changed outside the spliced values"
    assert long_lines(clicked.message) <= long_lines(pixel_only.message)
    tokens = [w.token for w in wrapped]
    assert len(set(tokens)) == len(tokens), "a token used twice"
    assert all(is_well_formed_token(t) and not t.startswith("-") for t in tokens)
    by_token = {link.token: link for link in clicked.links}
    assert sorted(by_token) == sorted(tokens), "links recorded and spliced differ"
    assert sorted(link.position for link in clicked.links) == list(range(len(tokens)))
    html_tokens = [w.token for w in wrapped if w.ctype == "text/html"]
    assert [by_token[t].position for t in html_tokens] == list(range(len(html_tokens)))
    if not html_links_expected:
        assert not html_tokens
    return wrapped


def _spliced_values(
    old: Message, new: Message, pattern: re.Pattern[bytes], urls: dict[str, str]
) -> list[Wrapped]:
    """Walk both decoded texts: equal but where the new one holds a click URL."""
    old_text, new_text = decoded_payload(old), decoded_payload(new)
    pieces = pattern.split(new_text)  # text, token, text, token, ..., text
    segments, tokens = pieces[0::2], pieces[1::2]
    assert tokens, "a part changed without a click URL"
    assert old_text.startswith(segments[0])
    pos = len(segments[0])
    html = new.get_content_type() == "text/html"
    found = []
    for token, segment in zip(tokens, segments[1:], strict=True):
        if html:
            # the value ends where the rest begins: at a quote, a space or ">",
            # none of which the value holds, so the first match is the end
            end = old_text.find(segment, pos) if segment else len(old_text)
            assert end >= pos, "the text after a click URL is not in the original"
        else:  # a plain-text URL is the stored URL as written
            url = urls[token.decode("ascii")].encode(old.get_content_charset() or "utf-8")
            assert old_text.startswith(url, pos), (old_text[pos : pos + len(url)], url)
            end = pos + len(url)
            assert old_text.startswith(segment, end)
        value = old_text[pos:end]
        assert pattern.search(value) is None
        found.append(Wrapped(token.decode("ascii"), value, new.get_content_type()))
        pos = end + len(segment)
    assert pos == len(old_text), "the texts end differently"
    return found


def _check_encoded_lines(old: Message, new: Message) -> None:
    old_raw, new_raw = _raw(old), _raw(new)
    cte = str(new.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte in ("quoted-printable", "base64"):
        before = set(old_raw.splitlines())
        for line in new_raw.splitlines():
            assert line in before or len(line) <= 76, f"encoded line of {len(line)} characters"
    if b"\n" in old_raw and b"\r\n" not in old_raw:
        assert b"\r\n" not in new_raw, "CRLF added to an LF part"
    if old_raw.count(b"\r\n") == old_raw.count(b"\n"):
        assert new_raw.count(b"\r\n") == new_raw.count(b"\n"), "bare LF added to a CRLF part"


def html_text(message: bytes) -> str | None:
    """The decoded text of the HTML part the click rewrite changed, else None."""
    for part in leaves(message):
        if part.get_content_type() == "text/html" and not part.is_multipart():
            octets = decoded_payload(part)
            return decode_text(octets, part.get_content_charset()).text
    return None


def changed_html(pixel_only: bytes, clicked: bytes) -> tuple[str, str] | None:
    """The decoded texts (pixel only, clicked) of the HTML part that differs, or None."""
    for old, new in zip(leaves(pixel_only), leaves(clicked), strict=True):
        if old.get_content_type() == "text/html" and not old.is_multipart():
            if _raw(old) == _raw(new):
                continue
            charset = old.get_content_charset()
            return (
                decode_text(decoded_payload(old), charset).text,
                decode_text(decoded_payload(new), charset).text,
            )
    return None
