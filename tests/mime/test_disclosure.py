"""The disclosure footer (spliced with the pixel) and header (prepended as octets)."""

from __future__ import annotations

import base64
import binascii
import email
import re
from email.header import decode_header, make_header
from email.policy import compat32
from pathlib import Path

import pytest

from smtp_tracker.mime import RewritePolicy, rewrite
from smtp_tracker.mime.disclosure import (
    MAX_FOOTER_BYTES,
    Disclosure,
    footer_for_part,
    read_footer,
)
from smtp_tracker.mime.inject import pixel_tag
from tests.corpus import corpus_root, eml_paths, skip_reason
from tests.mime.invariants import decoded_payload, leaves, long_lines

URL = "https://track.example.test/o/AAAAAAAAAAAAAAAAAAAAAA.gif"
FOOTER = (
    '<p style="font-size:11px">We count opens of this message. '
    '<a href="https://example.org/privacy">Privacy</a> \u20ac</p>\n<p>Second line</p>'
)
MARK = "We count opens of this message."


def html_message(
    html: bytes, *, cte: str = "8bit", charset: str = "utf-8", eol: bytes = b"\r\n"
) -> bytes:
    """A multipart/alternative message whose HTML part is encoded with ``cte``."""
    html = html.replace(b"\r\n", b"\n").replace(b"\n", eol)
    if cte == "quoted-printable":
        body = binascii.b2a_qp(html, istext=True).replace(b"\n", eol)
    elif cte == "base64":
        encoded = base64.b64encode(html)
        body = eol.join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    else:
        body = html
    head = eol.join(
        [
            b"From: Sender <sender@example.org>",
            b"To: reader@example.net",
            b"Subject: hello",
            b"MIME-Version: 1.0",
            b'Content-Type: multipart/alternative; boundary="b1"',
            b"",
            b"--b1",
            b"Content-Type: text/plain; charset=us-ascii",
            b"",
            b"plain " + MARK.encode() + b" text",
            b"--b1",
            b"Content-Type: text/html; charset=" + charset.encode(),
            b"Content-Transfer-Encoding: " + cte.encode(),
            b"",
            b"",
        ]
    )
    return head + body + eol + b"--b1--" + eol


HTML = "<html><head><title>t</title></head><body>\n<p>Hello caf\u00e9</p>\n</body></html>\n"


def html_part(message: bytes) -> email.message.Message:
    (part,) = [p for p in leaves(message) if p.get_content_type() == "text/html"]
    return part


@pytest.mark.parametrize(
    ("cte", "charset", "eol"),
    [
        ("8bit", "utf-8", b"\r\n"),
        ("8bit", "utf-8", b"\n"),
        ("quoted-printable", "utf-8", b"\r\n"),
        ("base64", "utf-8", b"\r\n"),
        ("quoted-printable", "iso-8859-1", b"\r\n"),  # no euro sign: a character reference
        ("8bit", "iso-8859-1", b"\n"),
    ],
)
def test_footer_goes_once_right_before_the_pixel_before_body_end(
    cte: str, charset: str, eol: bytes
) -> None:
    original = html_message(HTML.encode(charset), cte=cte, charset=charset, eol=eol)
    result = rewrite(original, URL, extra_html=FOOTER)
    assert result.tracked, (result.reason, result.defects)

    old_text = decoded_payload(html_part(original)).decode(charset)
    new_text = decoded_payload(html_part(result.message)).decode(charset)
    newline = " " if cte == "quoted-printable" else eol.decode()
    footer = footer_for_part(FOOTER, charset.replace("-", "_"), newline)
    assert new_text.count(MARK) == 1
    index = old_text.rindex("</body>")
    expected = old_text[:index] + footer + pixel_tag(URL) + old_text[index:]
    assert new_text == expected
    if charset == "iso-8859-1":
        assert "&#8364;" in new_text and "\u20ac" not in new_text
    else:
        assert "\u20ac" in new_text
    # only the HTML body changed: every part's headers, the text part, the structure
    old_parts, new_parts = leaves(original), leaves(result.message)
    assert [p.items() for p in old_parts] == [p.items() for p in new_parts]
    assert decoded_payload(old_parts[1]) == decoded_payload(new_parts[1])
    head = original[: original.index(b"Content-Transfer-Encoding")]
    assert result.message.startswith(head)
    assert result.message.endswith(eol + b"--b1--" + eol)
    assert long_lines(result.message) == 0
    if eol == b"\n":
        assert b"\r" not in result.message


def test_footer_line_endings_follow_the_part() -> None:
    original = html_message(HTML.encode(), eol=b"\r\n")
    result = rewrite(original, URL, extra_html="<p>a</p>\n<p>b</p>\r<p>c</p>")
    assert b"<p>a</p>\r\n<p>b</p>\r\n<p>c</p><img" in result.message


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (html_message(HTML.encode()).replace(b"Subject:", b"X-Track: no\r\nSubject:"), "opt-out"),
        (b"From: a@example.org\r\nSubject: plain\r\n\r\njust text\r\n", "no-html-body"),
        (
            html_message(HTML.encode()).replace(
                b"Subject:", b"DKIM-Signature: v=1; d=example.org\r\nSubject:"
            ),
            "dkim-signed",
        ),
    ],
)
def test_no_footer_in_messages_not_tracked(message: bytes, reason: str) -> None:
    result = rewrite(message, URL, extra_html=FOOTER)
    assert (result.tracked, result.reason) == (False, reason)
    assert MARK.encode() not in result.message.replace(b"plain " + MARK.encode(), b"")


def test_a_reason_decided_on_the_envelope_leaves_the_message_untracked() -> None:
    original = html_message(HTML.encode()).replace(b"Subject:", b"X-Track: yes\r\nSubject:")
    result = rewrite(
        original,
        URL,
        RewritePolicy(tracking_requires_opt_in=True),
        reverse_path="a@example.org",
        extra_html=FOOTER,
        not_tracked="recipient-domain-excluded",
    )
    assert (result.tracked, result.reason) == (False, "recipient-domain-excluded")
    # the control header is removed as for any decision; nothing else changes
    assert result.message == original.replace(b"X-Track: yes\r\n", b"")
    # the earlier rules keep their reasons
    assert rewrite(original, URL, reverse_path="", not_tracked="x").reason == "null-reverse-path"
    opted_out = original.replace(b"X-Track: yes", b"X-Track: no")
    assert rewrite(opted_out, URL, not_tracked="x").reason == "opt-out"


@pytest.mark.corpus
@pytest.mark.skipif(corpus_root() is None, reason=skip_reason())
def test_footer_over_the_corpus_changes_no_decision_and_appears_once() -> None:
    tracked = 0
    unplaceable = []
    for path in eml_paths():
        original = path.read_bytes()
        plain = rewrite(original, URL)
        with_footer = rewrite(original, URL, extra_html=FOOTER)
        if with_footer.reason == "footer-not-placeable":
            assert plain.tracked, path
            unplaceable.append(path.name)
            continue
        assert (with_footer.tracked, with_footer.reason) == (plain.tracked, plain.reason), path
        if not plain.tracked:
            assert with_footer.message == plain.message, path
            continue
        tracked += 1
        parsed = email.message_from_bytes(with_footer.message, policy=compat32)
        texts = [decoded_payload(p) for p in parsed.walk() if p.get_content_type() == "text/html"]
        hits = [t for t in texts if re.search(rb"We count opens of this message\.", t)]
        assert len(hits) == 1, path
        assert long_lines(with_footer.message) <= long_lines(original), path
    assert tracked >= 50
    assert len(unplaceable) <= 2, unplaceable


def test_never_a_pixel_without_its_footer() -> None:
    """A footer that would not render where the pixel goes: the message is not tracked."""
    original = html_message(HTML.encode())
    result = rewrite(original, URL, extra_html="<p>notice</p><!-- unclosed")
    assert (result.tracked, result.reason) == (False, "footer-not-placeable")
    assert result.message == original


# -- the footer file -------------------------------------------------------------------------


def test_read_footer_strips_a_byte_order_mark_and_outer_blanks(tmp_path: Path) -> None:
    path = tmp_path / "footer.html"
    path.write_bytes(b"\xef\xbb\xbf\n  <p>caf\xc3\xa9</p>\n\n")
    assert read_footer(path) == "<p>caf\u00e9</p>"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"<p>caf\xe9</p>", "is not UTF-8"),
        (b"  \n\n", "is empty"),
        (b"<p>a\x00b</p>", "NUL"),
        (b"<p>" + b"x" * 1000 + b"</p>", "line 1 is longer than 900 bytes"),
        (b"<p>ok</p>\n<!-- unclosed", "would not be shown"),
        (b"<script>var x = 1;", "would not be shown"),
        (b"<style>p {}", "would not be shown"),
        (b"x" * (MAX_FOOTER_BYTES + 1), "larger than"),
    ],
)
def test_read_footer_refuses(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "footer.html"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem):
        read_footer(path)


def test_read_footer_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read .*missing\.html \(No such file"):
        read_footer(tmp_path / "missing.html")


# -- the header field ----------------------------------------------------------------------


def unfold(field: bytes) -> tuple[str, str]:
    name, _, value = field.decode("ascii").partition(":")
    return name, str(make_header(decode_header(re.sub(r"\r?\n[ \t]", " ", value).strip())))


def test_header_field_short() -> None:
    notice = Disclosure(header_value="tracked; see https://example.org/privacy")
    assert notice.header_field() == (
        b"X-Tracking-Notice: tracked; see https://example.org/privacy\r\n"
    )
    assert notice.header_field(b"\n").endswith(b"privacy\n")


def test_a_long_header_is_folded_at_78_characters_and_unfolds_to_the_value() -> None:
    value = (
        "This message contains an image that tells the sender when it was opened; "
        "see https://example.org/privacy for what is kept and how to opt out of it"
    )
    field = Disclosure(header_name="X-Notice", header_value=value).header_field()
    lines = field.split(b"\r\n")
    assert lines[-1] == b""
    assert len(lines) > 2
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:-1])
    assert unfold(field) == ("X-Notice", value)


def test_a_word_longer_than_a_line_is_kept_whole() -> None:
    url = "https://example.org/" + "p" * 100
    field = Disclosure(header_value=f"see {url} please").header_field()
    assert url.encode() in field
    assert unfold(field)[1] == f"see {url} please"


def test_non_ascii_header_values_are_encoded_words() -> None:
    value = "Ce message contient une image de suivi; voir la politique de confidentialit\u00e9"
    field = Disclosure(header_value=value).header_field()
    assert field.isascii()
    assert b"=?utf-8?" in field
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    assert unfold(field) == ("X-Tracking-Notice", value)


@pytest.mark.parametrize(
    "value", ["one\r\nBcc: victim@example.net", "one\nline", "one\rline", "bell\x07", "  "]
)
def test_header_values_with_line_breaks_or_controls_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="disclosure header value"):
        Disclosure(header_value=value)


@pytest.mark.parametrize("name", ["X Notice", "X-Notice:", "", "X-Not\u00efce"])
def test_bad_header_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a header field name"):
        Disclosure(header_name=name, header_value="x")


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_add_header_prepends_and_leaves_every_other_octet(eol: bytes) -> None:
    message = html_message(HTML.encode(), eol=eol)
    out = Disclosure(header_value="tracked").add_header(message)
    assert out == b"X-Tracking-Notice: tracked" + eol + message
    assert email.message_from_bytes(out, policy=compat32)["X-Tracking-Notice"] == "tracked"
    assert Disclosure().add_header(message) is message
