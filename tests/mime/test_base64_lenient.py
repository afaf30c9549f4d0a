"""The two rewrite gaps found over the corpus (issue 19, item 6).

1. Base64 that RFC 2045 §6.8 decoders read although it is not canonical:
   characters outside the alphabet are ignored, and a single character left
   over after the last quantum (6 bits, no octet) is dropped.  Such an HTML
   part is tracked, its base64 re-encoded whole in 76-character lines, with a
   defect naming what was met; truncated base64 still fails open.
   ``enmime/parts_extra-base64-character.eml`` is of the second kind (each part
   is 4n+1 characters long), not the first as the issue guessed.
2. An HTML part after a first part that is not HTML in ``multipart/mixed`` is
   left untracked with its own reason, ``html-after-text-in-mixed`` (why: the
   docstring of :mod:`smtp_tracker.mime.selection`).
"""

from __future__ import annotations

import base64

import pytest

from smtp_tracker.mime import rewrite
from smtp_tracker.mime.transfer import TransferEncoding, TransferError, decode
from tests.corpus import corpus_root, skip_reason
from tests.mime.invariants import check, decoded_payload, leaves
from tests.mime.messages import PIXEL_URL, html_message, leaf, message, multipart

B64 = TransferEncoding.BASE64
HTML = (
    b"<html><body><p>caf\xc3\xa9 and a long enough line of text to need two lines</p></body></html>"
)


def lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


@pytest.mark.parametrize(
    ("body", "defect"),
    [
        (lines(HTML)[:40] + b"!*" + lines(HTML)[40:], "base64-outside-alphabet"),
        (lines(HTML).replace(b"\r\n", b"\r\n.", 1), "base64-outside-alphabet"),
        (base64.b64encode(HTML[:60]) + b"Q", "base64-dangling-character"),
    ],
    ids=["punctuation-inside", "dot-at-line-start", "dangling"],
)
def test_non_canonical_base64_is_tracked_and_reencoded(body: bytes, defect: str) -> None:
    original = message(
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + body
        + b"\r\n"
    )
    defects: list[str] = []
    old = decode(body, B64, defects)
    assert defects == [defect]
    result = rewrite(original, PIXEL_URL)
    assert result.tracked, (result.reason, result.defects)
    assert defect in result.defects
    change = check(original, result, PIXEL_URL)  # the old text and the pixel, nothing else
    assert change is not None and change.old_text == old
    assert change.new_text.replace(change.pixel, b"", 1) == old
    (part,) = [p for p in leaves(result.message) if p.get_content_type() == "text/html"]
    raw = part.get_payload().encode("ascii")
    assert all(len(line) <= 76 for line in raw.splitlines())
    assert base64.b64decode(raw, validate=False) == decoded_payload(part)  # canonical now


@pytest.mark.parametrize(
    "body",
    [b"PGh0bWw", b"PGh0bWw+PGJvZHk=PC9ib2R5Pg==", b"PGh0bWw+P===", b"PGh0bWw+PA=\r\n"],
    ids=["missing-padding", "padding-inside", "too-much-padding", "short-padding"],
)
def test_truncated_base64_still_fails_open(body: bytes) -> None:
    with pytest.raises(TransferError):
        decode(body, B64)
    original = message(
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body + b"\r\n"
    )
    result = rewrite(original, PIXEL_URL)
    assert (result.tracked, result.reason, result.message) == (False, "rewrite-failed", original)


@pytest.mark.skipif(corpus_root() is None, reason=skip_reason())
def test_the_corpus_message_with_an_extra_base64_character() -> None:
    root = corpus_root()
    assert root is not None
    original = (root / "eml/enmime/parts_extra-base64-character.eml").read_bytes()
    result = rewrite(original, PIXEL_URL)
    assert result.tracked, (result.reason, result.defects)
    assert "base64-dangling-character" in result.defects
    change = check(original, result, PIXEL_URL)
    assert change is not None
    assert change.new_text == b"<p>Hello World</p>" + change.pixel
    assert b"SGVsbG8gV29ybGQhA\n" in result.message  # the text/plain part, untouched


def test_html_after_text_in_mixed_has_its_own_reason() -> None:
    text_then_html = message(
        multipart("mixed", leaf("hello", ctype="text/plain"), leaf("<html><body>x</body></html>"))
    )
    result = rewrite(text_then_html, PIXEL_URL)
    assert (result.tracked, result.reason) == (False, "html-after-text-in-mixed")
    check(text_then_html, result, PIXEL_URL)
    # the same with the HTML in a later alternative; an HTML attachment is no body at all
    later_alternative = message(
        multipart(
            "mixed",
            leaf("hello", ctype="text/plain"),
            multipart(
                "alternative",
                leaf("x", ctype="text/plain"),
                leaf("<html><body>x</body></html>"),
                boundary="b2",
            ),
        )
    )
    assert rewrite(later_alternative, PIXEL_URL).reason == "html-after-text-in-mixed"
    attached = message(
        multipart(
            "mixed",
            leaf("hello", ctype="text/plain"),
            leaf("<p>x</p>", extra='Content-Disposition: attachment; filename="a.html"\r\n'),
        )
    )
    assert rewrite(attached, PIXEL_URL).reason == "no-html-body"
    # HTML first in mixed: the body, tracked as before
    html_first = message(
        multipart("mixed", leaf("<html><body>x</body></html>"), leaf("bye", ctype="text/plain"))
    )
    assert rewrite(html_first, PIXEL_URL).tracked
    assert rewrite(html_message("<p>x</p>"), PIXEL_URL).tracked


@pytest.mark.skipif(corpus_root() is None, reason=skip_reason())
@pytest.mark.parametrize(
    "name",
    ["cpython/msg_08.eml", "cpython/msg_09.eml", "cpython/msg_10.eml", "cpython/msg_47.eml"],
)
def test_corpus_messages_with_html_after_text(name: str) -> None:
    root = corpus_root()
    assert root is not None
    original = (root / "eml" / name).read_bytes()
    result = rewrite(original, PIXEL_URL)
    assert (result.tracked, result.reason) == (False, "html-after-text-in-mixed")
    check(original, result, PIXEL_URL)
