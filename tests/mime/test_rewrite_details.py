"""Small rewrite details (issue 12, item 12): UTF-7 markup in base64, and the pixel's padding.

* An HTML part in UTF-7 whose tags another encoder wrote in base64 (``+ADw-``
  for ``<``, RFC 2152) did not re-encode to the same octets with Python's
  encoder, so it was read as ISO-8859-1: no markup was seen, and the pixel
  went at the end of the fragment, after the encoded ``</html>``.
* The pixel was padded for base64 with spaces before ``>``: ``opacity:0"  >``.
"""

from __future__ import annotations

import email
import re
from email.policy import compat32

import pytest

from smtp_tracker.mime import RewritePolicy, rewrite
from smtp_tracker.mime.inject import PIXEL_STYLE, pixel_tag
from tests.mime.invariants import check, decoded_payload
from tests.mime.messages import PIXEL_URL, html_message

#: Every "<" and ">" in base64, those side by side in one run, as some encoders write it.
ALL_ENCODED = (
    "+ADw-html+AD4APA-head+AD4APA-title+AD4-Caf+AOk-+ADw-/title+AD4APA-/head+AD4-\r\n"
    "+ADw-body+AD4APA-p+AD4-Hello+ADw-/p+AD4APA-/body+AD4APA-/html+AD4-\r\n"
)
#: The same, but "</body>" after text written directly.
ENCODED_BODY_AFTER_TEXT = (
    "+ADw-html+AD4APA-body+AD4-Hello, reader.\r\n+ADw-/body+AD4APA-/html+AD4-\r\n"
)
PIXEL = pixel_tag(PIXEL_URL)


def _html_text(out: bytes) -> str:
    (part,) = [p for p in email.message_from_bytes(out, policy=compat32).walk()]
    return decoded_payload(part).decode("utf-7")


@pytest.mark.parametrize("cte", [None, "quoted-printable", "base64"])
@pytest.mark.parametrize("body", [ALL_ENCODED, ENCODED_BODY_AFTER_TEXT], ids=["runs", "direct"])
def test_utf7_with_encoded_tags_gets_the_pixel_before_body_end(body: str, cte: str | None) -> None:
    original = html_message(body.encode("ascii"), charset="utf-7", cte=cte)
    before = _html_text(original)
    assert "</body>" in before and body.encode() not in before.encode()  # it decodes
    result = rewrite(original, PIXEL_URL)
    assert (result.tracked, result.reason) == (True, None), result.defects
    after = _html_text(result.message)
    at = before.index("</body>")
    tags = re.findall(r"<img [^>]*>", after)
    assert len(tags) == 1 and after == before[:at] + tags[0] + before[at:]
    assert after.index(tags[0]) < after.index("</html>")  # not after </html> any more
    assert "not-decodable-as:utf-7" not in result.defects


def test_utf7_pixel_between_directly_written_characters_changes_no_other_octet() -> None:
    original = html_message(ENCODED_BODY_AFTER_TEXT.encode("ascii"), charset="utf-7")
    result = rewrite(original, PIXEL_URL)
    check(original, result, PIXEL_URL)  # byte level: the pixel alone was added
    assert result.message == original.replace(b"reader.\r\n", b"reader.\r\n" + PIXEL.encode(), 1)


def test_utf7_pixel_inside_a_base64_run_splits_that_run_only() -> None:
    original = html_message(ALL_ENCODED.encode("ascii"), charset="utf-7")
    result = rewrite(original, PIXEL_URL)
    head, _, tail = original.partition(b"Hello+ADw-/p+AD4APA-/body")
    new_head, _, new_tail = result.message.partition(b"Hello+ADw-/p>" + PIXEL.encode() + b"</body")
    assert (new_head, new_tail) == (head, tail)  # "+AD4APA-" (">" "<") written again around it


def test_python_own_utf7_is_still_canonical() -> None:
    html = "<html><body><p>Caf\u00e9</p></body></html>\r\n"
    original = html_message(html.encode("utf-7"), charset="utf-7")
    result = rewrite(original, PIXEL_URL)
    check(original, result, PIXEL_URL)
    assert result.tracked


@pytest.mark.parametrize("extra", range(6))
def test_the_base64_padding_is_inside_the_style_never_spaces_before_the_end(extra: int) -> None:
    url = PIXEL_URL.replace(".gif", "x" * extra + ".gif")
    original = html_message("<html><body><p>x</p></body></html>\r\n", cte="base64")
    result = rewrite(original, url, RewritePolicy())
    change = check(original, result, url)
    assert change is not None
    pixel = change.pixel
    assert b"  " not in pixel and pixel.endswith(b'">'), pixel
    style = re.search(rb'style="([^"]*)"', pixel)
    assert style is not None
    assert style.group(1).decode() in (PIXEL_STYLE, PIXEL_STYLE + ";", PIXEL_STYLE + ".0")


def test_pixel_tag_padding_lengths() -> None:
    lengths = [len(pixel_tag(PIXEL_URL, pad=pad)) for pad in (0, 1, 2)]
    assert lengths == [lengths[0], lengths[0] + 1, lengths[0] + 2]
    assert all("  " not in pixel_tag(PIXEL_URL, pad=pad) for pad in (0, 1, 2))
    assert pixel_tag(PIXEL_URL, xhtml=True, pad=2).endswith('opacity:0.0" />')
