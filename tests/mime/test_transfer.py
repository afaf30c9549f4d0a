"""Content-Transfer-Encoding: reading the field, decoding, and re-encoding only around a splice."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_tracker.mime.transfer import (
    TransferEncoding,
    TransferError,
    decode,
    parse_transfer_encoding,
    splice,
)

QP = TransferEncoding.QUOTED_PRINTABLE
B64 = TransferEncoding.BASE64
INSERT = b'<img src="https://t.example/o/x.gif?a=1" alt="">'  # 48 octets: whole base64 quanta


@pytest.mark.parametrize(
    ("value", "body", "expected"),
    [
        (None, b"", TransferEncoding.IDENTITY),
        ("7bit", b"", TransferEncoding.IDENTITY),
        (" 8BIT ", b"", TransferEncoding.IDENTITY),
        ("binary", b"", TransferEncoding.IDENTITY),
        ("Quoted-Printable", b"", QP),
        ("quoted-printable;", b"", QP),
        ('"base64"', b"", B64),
        ("7-bit", b"", TransferEncoding.IDENTITY),
        ("8bits", b"=3D", TransferEncoding.IDENTITY),
        ("text/html", b"<p>x</p>", TransferEncoding.IDENTITY),
        ("x-unknown", b"<p>a=3Db</p>", None),
        ("x-unknown", b"PHA+eDwvcD4=", None),
        ("x-uuencode", b"<p>", None),
    ],
)
def test_parse_transfer_encoding(
    value: str | None, body: bytes, expected: TransferEncoding | None
) -> None:
    encoding, defect = parse_transfer_encoding(value, body)
    assert encoding is expected
    known = value is None or value.strip().strip(";\"'").lower() in (
        "7bit", "8bit", "binary", "quoted-printable", "base64"
    )  # fmt: skip
    assert (defect is None) == known


def test_truncated_base64_is_not_guessed() -> None:
    # characters outside the alphabet are ignored (RFC 2045 §6.8: tests/mime/test_base64_lenient.py)
    assert decode(b"PGh0bWw+!!\r\nPC9odG1sPg==", B64) == b"<html></html>"
    with pytest.raises(TransferError):
        decode(b"PGh0bWw", B64)


def test_qp_splice_keeps_other_lines_and_76_columns() -> None:
    lines = [b"=C3=A9t=C3=A9 line %d with a=3Db and some more words to fill it up=" % i
             for i in range(10)]  # fmt: skip
    body = b"\r\n".join([*lines, b"</body></html>"])
    decoded = decode(body, QP)
    offset = decoded.index(b"</body>")
    new = splice(body, QP, offset, INSERT)
    assert decode(new, QP) == decoded[:offset] + INSERT + decoded[offset:]
    assert new.startswith(b"\r\n".join(lines) + b"\r\n")
    assert all(len(line) <= 76 for line in new.split(b"\r\n"))


def test_qp_splice_after_a_literal_equals_sign() -> None:
    body = b"<p>a=b</p>=</body>"  # "=<" is no escape: a literal "="
    decoded = decode(body, QP)
    assert decoded == body
    offset = decoded.index(b"</body>")
    for insert in (INSERT, INSERT * 2):
        new = splice(body, QP, offset, insert)
        assert decode(new, QP) == decoded[:offset] + insert + decoded[offset:]
    wide = b"x" * 74 + b"=G" + b"y" * 10  # a literal "=" where a soft break would go
    new = splice(wide, QP, 74, b"ab")
    assert decode(new, QP) == b"x" * 74 + b"ab=G" + b"y" * 10
    new = splice(wide, QP, 75, b"<>")
    assert decode(new, QP) == b"x" * 74 + b"=<>G" + b"y" * 10
    assert all(len(line) <= 76 for line in new.split(b"\r\n"))


def test_qp_splice_keeps_lf_line_endings() -> None:
    body = b"<p>one</p>\n<p>two =C3=A9</p>\n</body>"
    new = splice(body, QP, decode(body, QP).index(b"</body>"), INSERT * 3)
    assert b"\r" not in new
    assert b"=\n" in new


@settings(deadline=None, max_examples=400)
@given(
    st.text(alphabet="=AFaf09 \tx<>\r\n", max_size=200).map(lambda s: s.encode()),
    st.data(),
)
def test_qp_splice_on_any_qp_text(body: bytes, data: st.DataObject) -> None:
    """Broken escapes, stray '=', trailing blanks and soft breaks decode as before."""
    decoded = decode(body, QP)
    offset = data.draw(st.integers(0, len(decoded)))
    try:
        new = splice(body, QP, offset, INSERT)
    except TransferError:
        # only after a line's own line ending (the rewrite never asks for that)
        assert decoded[offset - 1 : offset] == b"\n" or decoded[offset - 1 : offset + 1] == b"\r\n"
        return
    assert decode(new, QP) == decoded[:offset] + INSERT + decoded[offset:]
    old_lines = set(body.splitlines())
    assert all(line in old_lines or len(line) <= 76 for line in new.splitlines())


@settings(deadline=None, max_examples=400)
@given(
    st.binary(max_size=600),
    st.sampled_from([76, 64, 4, 72]),
    st.sampled_from([b"\r\n", b"\n"]),
    st.data(),
)
def test_base64_splice_anywhere(raw: bytes, width: int, eol: bytes, data: st.DataObject) -> None:
    encoded = base64.b64encode(raw)
    body = eol.join(encoded[i : i + width] for i in range(0, len(encoded), width))
    if data.draw(st.booleans()):
        body += eol  # a trailing line ending
    if not raw:
        with pytest.raises(TransferError):
            splice(body, B64, 0, INSERT)
        return
    offset = data.draw(st.integers(0, len(raw)))
    new = splice(body, B64, offset, INSERT, newline=eol)
    assert decode(new, B64) == raw[:offset] + INSERT + raw[offset:]
    old_lines = body.split(eol)
    new_lines = new.split(eol)
    assert all(len(line) <= max(width, 76) for line in new_lines)
    # everything but the one line holding the insertion point is kept, in order
    changed = len(new_lines) - len(old_lines)
    index = next(
        (i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=False)) if a != b),
        len(old_lines) - 1,
    )
    assert new_lines[:index] == old_lines[:index]
    assert new_lines[index + changed + 1 :] == old_lines[index + 1 :]
    assert eol == b"\r\n" or b"\r" not in new


def test_base64_irregular_lines_are_reencoded_whole() -> None:
    raw = bytes(range(256)) * 3
    encoded = base64.b64encode(raw)
    for body, insert in (
        (b"\r\n".join(encoded[i : i + 75] for i in range(0, len(encoded), 75)), INSERT),
        (b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)), b"xy"),
        (b"\r\n".join(encoded[i : i + 76] + b"  \t" for i in range(0, len(encoded), 76)), b"xy"),
        (b"\r\n" + encoded[:40] + b" " + encoded[40:] + b"\r\n\r\n", INSERT),
    ):
        new = splice(body, B64, 300, insert)
        assert decode(new, B64) == raw[:300] + insert + raw[300:]
        assert all(len(line) <= 76 for line in new.split(b"\r\n"))
        assert new.startswith(body[: len(body) - len(body.lstrip())])


def test_base64_trailing_blanks_keep_the_other_lines() -> None:
    raw = bytes(range(256)) * 3
    encoded = base64.b64encode(raw)
    lines = [encoded[i : i + 76] + b" " for i in range(0, len(encoded), 76)]
    body = b"\r\n".join(lines)
    new = splice(body, B64, len(raw), INSERT)
    assert decode(new, B64) == raw + INSERT
    assert new.startswith(b"\r\n".join(lines[:-1]))


def test_identity_splice() -> None:
    assert splice(b"<p>x</p>", TransferEncoding.IDENTITY, 3, b"<b>") == b"<p><b>x</p>"
    with pytest.raises(TransferError):
        splice(b"abc", TransferEncoding.IDENTITY, 4, b"x")


def test_qp_decoding_is_the_email_packages() -> None:
    body = b"a=3Db=\r\nc =\r\nd=G1 ==\r\n"
    assert decode(body, QP) == binascii.a2b_qp(body)
