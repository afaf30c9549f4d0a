"""``pixel_position`` start, both and auto (issue 19, item 4) over the corpus, with the
rewrite's invariants: one HTML part changed, by exactly its pixels (one, or two with the
same URL), every other octet byte-identical, no line over 998 octets, encoded lines at
most 76 characters, line endings kept; the start pixel right after the opening ``<body>``.
"""

from __future__ import annotations

import html
import re
from email.message import Message

import pytest

from smtp_tracker.mime import RewritePolicy, RewriteResult, rewrite
from smtp_tracker.mime.inject import pixel_tag
from smtp_tracker.mime.policy import AUTO_BOTH_HTML_BYTES
from tests.corpus import corpus_root, eml_paths, html_as_message, html_paths, skip_reason
from tests.mime.invariants import (
    PIXEL_SHAPE,
    _raw,
    _splices,
    check,
    decoded_payload,
    leaves,
    long_lines,
    without_control_header,
)
from tests.mime.messages import PIXEL_URL, html_message

URL = "https://track.example.test/o/AAAAAAAAAAAAAAAAAAAAAA.gif?m=1&r=2"
VARIANTS = [("utf-8", "quoted-printable"), ("utf-8", "base64"), (None, "8bit")]
BODY_START = re.compile(rb"<body(?=[\t\n\f\r />])(?:[^>\"']|\"[^\"]*\"|'[^']*')*>\Z", re.I)

corpus = pytest.mark.skipif(corpus_root() is None, reason=skip_reason())


def check_pixels(original: bytes, result: RewriteResult, url: str) -> tuple[bytes, bytes]:
    """The invariants of a tracked rewrite with ``result.pixels`` pixels; (old, new) text."""
    assert result.tracked and result.reason is None
    base = without_control_header(original)
    out = result.message
    old_parts, new_parts = leaves(base), leaves(out)
    assert len(old_parts) == len(new_parts), "the MIME structure changed"
    changed: list[tuple[Message, Message]] = []
    for old, new in zip(old_parts, new_parts, strict=True):
        assert old.items() == new.items(), "part headers changed"
        if old.is_multipart():
            assert old.preamble == new.preamble and old.epilogue == new.epilogue
        elif _raw(old) != _raw(new):
            changed.append((old, new))
    assert len(changed) == 1, f"{len(changed)} parts changed"
    old, new = changed[0]
    assert new.get_content_type() == "text/html"
    old_text, new_text = decoded_payload(old), decoded_payload(new)
    escaped = html.escape(url, quote=True).encode("ascii")
    pattern = re.compile(rb'<img\s+src="' + re.escape(escaped) + rb'"[^>]*>')
    found = pattern.findall(new_text)
    assert len(found) == result.pixels, f"{len(found)} pixels, result says {result.pixels}"
    assert not pattern.search(old_text)
    for pixel in found:
        assert PIXEL_SHAPE.match(pixel) and b"  " not in pixel and pixel.isascii(), pixel
    assert pattern.sub(b"", new_text) == old_text, "decoded text changed beyond the pixels"
    old_raw, new_raw = _raw(old), _raw(new)
    assert _splices(base, out, old_raw, new_raw), "octets changed outside the rewritten body"
    assert long_lines(out) <= long_lines(base), "a line over 998 octets was introduced"
    cte = str(new.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte in ("quoted-printable", "base64"):
        before = set(old_raw.splitlines())
        assert all(line in before or len(line) <= 76 for line in new_raw.splitlines())
    if b"\n" in old_raw and b"\r\n" not in old_raw:
        assert b"\r\n" not in new_raw, "CRLF added to an LF part"
    if b"\n" in old_raw and old_raw.count(b"\r\n") == old_raw.count(b"\n"):
        assert new_raw.count(b"\r\n") == new_raw.count(b"\n"), "bare LF added to a CRLF part"
    return old_text, new_text


def assert_starts_after_body(new_text: bytes, url: str) -> None:
    pixel = re.compile(rb'<img\s+src="' + re.escape(html.escape(url, quote=True).encode()))
    match = pixel.search(new_text)
    assert match is not None
    first = match.start()
    tag_start = new_text.rfind(b"<", 0, first)
    assert BODY_START.match(new_text[tag_start:first]), new_text[max(0, first - 80) : first]


@corpus
@pytest.mark.parametrize("position", ["start", "both"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[1]}-{v[0] or 'no-charset'}")
@pytest.mark.parametrize("path", html_paths(), ids=lambda p: p.name)
def test_templates(path: object, variant: tuple[str | None, str], position: str) -> None:
    charset, cte = variant
    original = html_as_message(path.read_bytes(), charset=charset, cte=cte)  # type: ignore[attr-defined,arg-type]
    policy = RewritePolicy(pixel_position=position)  # type: ignore[arg-type]
    result = rewrite(original, URL, policy)
    assert result.tracked, (result.reason, result.defects)
    old_text, new_text = check_pixels(original, result, URL)
    if not re.search(rb"<body[\t\n\f\r />]", old_text, re.I):  # an Inky source: no <body>
        assert result.pixels == 1 and "pixel-start-not-placeable" in result.defects
        return
    assert result.pixels == (2 if position == "both" else 1), result.defects
    assert_starts_after_body(new_text, URL)


@corpus
@pytest.mark.parametrize("position", ["start", "both"])
def test_messages_are_tracked_as_with_the_end_position(position: str) -> None:
    """Every corpus message: the same decision as "end"; two pixels or a defect saying why not."""
    policy = RewritePolicy(pixel_position=position)  # type: ignore[arg-type]
    tracked = placed = 0
    for path in eml_paths():
        original = path.read_bytes()
        end = rewrite(original, URL)
        result = rewrite(original, URL, policy)
        assert (result.tracked, result.reason) == (end.tracked, end.reason), path
        if not result.tracked:
            check(original, result, URL)
            continue
        tracked += 1
        _, new_text = check_pixels(original, result, URL)
        if "pixel-start-not-placeable" in result.defects:
            assert result.pixels == 1
            assert new_text == decoded_payload_of(end)  # the end pixel alone, as "end" puts it
        else:
            placed += 1
            assert result.pixels == (2 if position == "both" else 1)
            assert_starts_after_body(new_text, URL)
    assert tracked >= 100 and placed >= 50, (tracked, placed)


def decoded_payload_of(result: RewriteResult) -> bytes:
    changed = [p for p in leaves(result.message) if p.get_content_type() == "text/html"]
    texts = [decoded_payload(p) for p in changed if b"track.example.test" in decoded_payload(p)]
    assert len(texts) == 1
    return texts[0]


@pytest.mark.parametrize("cte", ["8bit", "quoted-printable", "base64"])
def test_auto_is_both_over_90_kb(cte: str) -> None:
    small = "<html><body><p>hello</p></body></html>\r\n"
    large = (
        "<html><body>"
        + "<p>news of the week</p>\r\n" * (AUTO_BOTH_HTML_BYTES // 24)
        + ("</body></html>\r\n")
    )
    assert len(large) > AUTO_BOTH_HTML_BYTES
    policy = RewritePolicy(pixel_position="auto")
    for text, pixels in ((small, 1), (large, 2)):
        original = html_message(text, cte=cte)
        result = rewrite(original, PIXEL_URL, policy)
        assert result.pixels == pixels, result.defects
        check_pixels(original, result, PIXEL_URL)


def test_both_with_links_and_footer() -> None:
    """Clicks wrapped in the same pass; the disclosure footer stays before the end pixel."""
    text = (
        '<html><body style="margin:0"><p><a href="https://shop.example/a">a</a></p>'
        '<p><a href="https://shop.example/b">b</a></p></body></html>\r\n'
    )
    policy = RewritePolicy(pixel_position="both", track_clicks=True)
    for cte in ("8bit", "quoted-printable", "base64"):
        original = html_message(text, cte=cte)
        result = rewrite(
            original,
            PIXEL_URL,
            policy,
            extra_html="<p>FOOTER</p>",
            click_base_url="https://track.example.test",
        )
        assert (result.tracked, result.pixels, len(result.links)) == (True, 2, 2), result.defects
        new_text = decoded_payload_of(result).decode()
        tag = pixel_tag(PIXEL_URL)
        assert new_text.startswith('<html><body style="margin:0">' + tag + "<p><a href=")
        assert new_text.endswith("<p>FOOTER</p>" + tag + "</body></html>\r\n")
        assert "https://shop.example/" not in new_text


def test_start_alone_keeps_the_footer_at_the_end() -> None:
    original = html_message("<html><body><p>x</p></body></html>\r\n", cte="quoted-printable")
    result = rewrite(
        original, PIXEL_URL, RewritePolicy(pixel_position="start"), extra_html="<p>F</p>"
    )
    assert result.pixels == 1
    tag = pixel_tag(PIXEL_URL)
    assert decoded_payload_of(result) == (
        f"<html><body>{tag}<p>x</p><p>F</p></body></html>\r\n".encode()
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a <body> in a comment or an attribute is passed over; an unquoted ">" is not in a tag
        ('<!-- <body> --><html><body title="a>b"><p>x</p></body></html>', '<body title="a>b">'),
        ("<html><BODY\nclass=x><p>x</p></BODY></html>", "<BODY\nclass=x>"),
    ],
)
def test_the_start_place_is_the_real_body_tag(text: str, expected: str) -> None:
    result = rewrite(html_message(text), PIXEL_URL, RewritePolicy(pixel_position="both"))
    new_text = decoded_payload_of(result).decode()
    assert result.pixels == 2
    assert new_text.startswith(text[: text.index(expected) + len(expected)] + pixel_tag(PIXEL_URL))


def test_no_body_tag_means_the_end_alone() -> None:
    result = rewrite(
        html_message("<p>a fragment</p>"), PIXEL_URL, RewritePolicy(pixel_position="both")
    )
    assert (result.tracked, result.pixels) == (True, 1)
    assert "pixel-start-not-placeable" in result.defects
    assert decoded_payload_of(result) == f"<p>a fragment</p>{pixel_tag(PIXEL_URL)}".encode()


def test_a_bad_position_is_refused() -> None:
    with pytest.raises(ValueError, match="pixel_position"):
        RewritePolicy(pixel_position="middle")  # type: ignore[arg-type]


def test_the_configuration_key_reaches_the_rewrite() -> None:
    from smtp_tracker.app import rewrite_policy
    from smtp_tracker.config import ConfigError, build_config

    for position in ("end", "start", "both", "auto"):
        config = build_config({"pixel_position": position}, {}, environ={})
        assert rewrite_policy(config).pixel_position == position
    assert build_config({}, {}, environ={}).pixel_position == "end"
    with pytest.raises(ConfigError, match="pixel_position: expected one of end, start, both"):
        build_config({"pixel_position": "middle"}, {}, environ={})


@pytest.mark.parametrize("cte", ["8bit", "quoted-printable", "base64"])
@pytest.mark.parametrize(
    ("charset", "words"),
    [
        ("utf-8", "\u65e5\u672c\u8a9e \u2603"),
        ("iso-2022-jp", "\u3053\u3093\u306b\u3061\u306f"),
        ("koi8-r", "\u041f\u0440\u0438\u0432\u0435\u0442"),
        ("windows-1252", "Caf\u00e9 \u20ac"),
    ],
)
def test_both_in_each_charset_and_encoding(charset: str, words: str, cte: str) -> None:
    text = f"<html><body>{words}<p>{words}</p></body></html>\r\n"
    original = html_message(text.encode(charset), charset=charset, cte=cte)
    result = rewrite(original, PIXEL_URL, RewritePolicy(pixel_position="both"))
    assert result.pixels == 2, (result.reason, result.defects)
    _, new_text = check_pixels(original, result, PIXEL_URL)
    tag = re.search(rb"<img [^>]*>", new_text)
    assert tag is not None
    assert new_text.decode(charset) == text.replace(
        "<body>", "<body>" + tag.group().decode()
    ).replace("</body>", tag.group().decode() + "</body>")
