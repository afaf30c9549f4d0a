"""``splice_edits``: several replacements in one encoded body, checked by decoding again."""

from __future__ import annotations

import base64
import binascii
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_tracker.mime.transfer import TransferEncoding, TransferError, decode, splice_edits

OCTETS = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\t", b"=", b".", b"<", b'"', b"\xe9", b"\r\n", b"\n"]),
    max_size=400,
).map(b"".join)
INSERTS = st.lists(st.sampled_from([b"x", b"=", b"&", b" ", b"\xe9", b"/"]), max_size=90).map(
    b"".join
)


def encode(octets: bytes, encoding: TransferEncoding) -> bytes:
    if encoding is TransferEncoding.QUOTED_PRINTABLE:
        return binascii.b2a_qp(octets, istext=True)
    if encoding is TransferEncoding.BASE64:
        encoded = base64.b64encode(octets)
        return b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    return octets


def applied(octets: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    out, pos = b"", 0
    for start, end, insert in edits:
        out += octets[pos:start] + insert
        pos = end
    return out + octets[pos:]


@st.composite
def cases(draw: st.DrawFn) -> tuple[TransferEncoding, bytes, list[tuple[int, int, bytes]]]:
    encoding = draw(st.sampled_from(list(TransferEncoding)))
    body = encode(draw(OCTETS), encoding)
    octets = decode(body, encoding)
    # offsets never between the CR and LF of a line ending (an HTML value never ends there)
    places = [
        p
        for p in range(len(octets) + 1)
        if not 0 < p < len(octets) or octets[p - 1 : p + 1] != b"\r\n"
    ]
    points = sorted(draw(st.lists(st.sampled_from(places), max_size=8)))
    if len(points) % 2:
        points.pop()
    edits = [(points[i], points[i + 1], draw(INSERTS)) for i in range(0, len(points), 2)]
    return encoding, body, edits


@settings(max_examples=400, deadline=None)
@given(cases())
def test_edits_decode_to_the_edited_octets_and_lines_stay_short(
    case: tuple[TransferEncoding, bytes, list[tuple[int, int, bytes]]],
) -> None:
    encoding, body, edits = case
    out = splice_edits(body, encoding, edits)
    assert decode(out, encoding) == applied(decode(body, encoding), edits)
    if encoding is not TransferEncoding.IDENTITY:
        before = set(re.split(rb"\r?\n", body))
        for line in re.split(rb"\r?\n", out):
            assert line in before or len(line) <= 76, line


def test_quoted_printable_lines_away_from_the_edits_stay_as_written() -> None:
    lines = [b"<p>line %d with caf=E9 and =3D signs</p>" % n for n in range(20)]
    body = b"\r\n".join(lines) + b"\r\n"
    octets = decode(body, TransferEncoding.QUOTED_PRINTABLE)
    start = octets.index(b"line 5") + 5
    out = splice_edits(body, TransferEncoding.QUOTED_PRINTABLE, [(start, start + 1, b"five=")])
    new_lines = out.split(b"\r\n")
    assert new_lines[5] == b"<p>line five=3D with caf=E9 and =3D signs</p>"
    assert new_lines[:5] == lines[:5] and new_lines[6:-1] == lines[6:]


def test_base64_lines_before_the_first_edit_stay_as_written() -> None:
    octets = bytes(range(256)) * 4
    body = encode(octets, TransferEncoding.BASE64)
    out = splice_edits(body, TransferEncoding.BASE64, [(600, 610, b"new"), (700, 700, b"more")])
    assert out.split(b"\r\n")[:10] == body.split(b"\r\n")[:10]  # 10 lines = 570 octets
    assert decode(out, TransferEncoding.BASE64) == applied(
        octets, [(600, 610, b"new"), (700, 700, b"more")]
    )


@pytest.mark.parametrize(
    "edits",
    [[(5, 3, b"x")], [(2, 6, b"x"), (4, 8, b"y")], [(0, 999, b"x")]],
    ids=["backwards", "overlapping", "past-the-end"],
)
@pytest.mark.parametrize("encoding", list(TransferEncoding))
def test_bad_edits_are_refused(
    edits: list[tuple[int, int, bytes]], encoding: TransferEncoding
) -> None:
    body = encode(b"0123456789" * 3, encoding)
    with pytest.raises(TransferError):
        splice_edits(body, encoding, edits)
