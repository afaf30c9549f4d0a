"""Named cases of the pixel rewrite: which part, where, how, and what is never touched."""

from __future__ import annotations

import email
import importlib
import logging
from email.policy import compat32

import pytest

import smtp_tracker.mime
from smtp_tracker.mime import RewritePolicy, RewriteResult, rewrite
from smtp_tracker.mime.inject import pixel_tag
from tests.mime.invariants import Change, check
from tests.mime.messages import (
    PIXEL_URL,
    fixture,
    html_message,
    leaf,
    message,
    multipart,
)

rewrite_module = importlib.import_module("smtp_tracker.mime.rewrite")
PIXEL = pixel_tag(PIXEL_URL).encode("ascii")
XHTML_PIXEL = pixel_tag(PIXEL_URL, xhtml=True).encode("ascii")


def tracked(original: bytes, policy: RewritePolicy | None = None, **kwargs: str) -> Change:
    result = rewrite(original, PIXEL_URL, policy or RewritePolicy(), **kwargs)
    assert result.tracked, (result.reason, result.defects)
    change = check(original, result, PIXEL_URL, control_header=_name(policy))
    assert change is not None
    return change


def untouched(
    original: bytes, reason: str, policy: RewritePolicy | None = None, **kwargs: str
) -> RewriteResult:
    result = rewrite(original, PIXEL_URL, policy or RewritePolicy(), **kwargs)
    assert (result.tracked, result.reason) == (False, reason), result.defects
    check(original, result, PIXEL_URL, control_header=_name(policy))
    return result


def _name(policy: RewritePolicy | None) -> str:
    return (policy or RewritePolicy()).control_header


# -- the API -------------------------------------------------------------------------------


def test_exports() -> None:
    assert smtp_tracker.mime.__all__ == ["RewritePolicy", "RewriteResult", "rewrite"]
    assert sorted(smtp_tracker.mime.__all__) == smtp_tracker.mime.__all__


def test_policy_defaults() -> None:
    policy = RewritePolicy()
    assert policy.dkim_policy == "skip"
    assert policy.tracking_requires_opt_in is False
    assert policy.control_header == "X-Track"
    assert (policy.max_depth, policy.max_parts) == (32, 1000)
    assert policy.max_html_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dkim_policy": "sign"},
        {"control_header": "X Track"},
        {"control_header": ""},
        {"max_depth": 0},
        {"max_depth": 201},
        {"max_parts": -1},
        {"max_html_bytes": True},
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RewritePolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        RewritePolicy("track")  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        RewritePolicy().max_depth = 3  # type: ignore[misc]


# -- where the pixel goes ------------------------------------------------------------------


def test_pixel_before_closing_body_everything_else_as_written() -> None:
    html = "<html><body><p>Caf&eacute; &amp; bar&nbsp;&copy; 2024</p></body></html>\r\n"
    change = tracked(html_message(html))
    assert change.new_text == html.replace("</body>", PIXEL.decode() + "</body>").encode()


def test_pixel_shape_is_invisible_without_display_none() -> None:
    assert PIXEL == (
        b'<img src="https://track.example.test/o/AAAAAAAAAAAAAAAAAAAAAA.gif" width="1" '
        b'height="1" alt="" style="position:absolute;top:0px;left:0;border:0;width:1px;height:1px;'
        b'margin:0;padding:0;opacity:0">'
    )
    assert b"display:none" not in PIXEL


def test_pixel_url_is_escaped_and_ascii() -> None:
    url = 'https://t.example/o/x?a=1&b="2"&c=\u00e9 <'
    tag = pixel_tag(url)
    assert tag.isascii()
    assert 'src="https://t.example/o/x?a=1&amp;b=&quot;2&quot;&amp;c=%C3%A9%20&lt;"' in tag
    result = rewrite(html_message("<p>x</p>"), url)
    assert result.tracked
    assert b"&amp;b=&quot;2&quot;" in result.message


def test_uppercase_closing_body_with_space() -> None:
    html = "<HTML><BODY><P>Hi</P></BODY >\r\n</HTML>\r\n"
    change = tracked(html_message(html))
    assert change.new_text == html.replace("</BODY >", PIXEL.decode() + "</BODY >").encode()


def test_fragment_without_body_gets_pixel_at_its_end() -> None:
    html = "<p>Just a fragment</p>\r\n<p>second line</p>\r\n\r\n"
    change = tracked(html_message(html))
    assert change.new_text == b"<p>Just a fragment</p>\r\n<p>second line</p>" + PIXEL + b"\r\n\r\n"


def test_xhtml_doctype_gets_self_closing_pixel() -> None:
    html = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
        '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\r\n'
        '<html xmlns="http://www.w3.org/1999/xhtml"><body><br /></body></html>\r\n'
    )
    change = tracked(html_message(html))
    assert change.pixel == XHTML_PIXEL
    assert XHTML_PIXEL.endswith(b'" />')


@pytest.mark.parametrize(
    "trap",
    [
        "<!-- </body> -->",
        "<!--[if mso]></body><![endif]-->",
        "<script>var s = '</body>';</script>",
        "<style>/* </body> */</style>",
        "<![CDATA[ </body> ]]>",
        '<a title="</body>">x</a>',
        "<textarea></body></textarea>",
    ],
)
def test_closing_body_inside_markup_that_hides_it_is_not_used(trap: str) -> None:
    html = f"<html><body><p>text</p></body>{trap}</html>\r\n"
    change = tracked(html_message(html))
    assert (
        change.new_text
        == html.replace(
            "<p>text</p></body>", "<p>text</p>" + PIXEL.decode() + "</body>", 1
        ).encode()
    )


def test_pixel_not_inside_downlevel_revealed_conditional() -> None:
    html = (
        "<html><body><p>a</p></body>"
        "<!--[if !mso]><!--><div></body></div><!--<![endif]-->\r\n</html>\r\n"
    )
    change = tracked(html_message(html))
    assert change.new_text.index(PIXEL) < change.new_text.index(b"<!--[if !mso]>")


def test_outlook_conditional_comments_and_vml_untouched() -> None:
    original = fixture("outlook-vml.eml")
    change = tracked(original)
    text = change.new_text
    # the pixel sits before the real </body>, not in the conditional comment after it
    assert text.index(PIXEL) + len(PIXEL) == text.index(b"</body>\r\n<!--[if mso]></body>")
    for piece in (
        b"<!--[if gte mso 9]><v:background",
        b'<v:roundrect xmlns:v="urn:schemas-microsoft-com:vml"',
        b"<!--[if !mso]><!-- -->",
        b"<!--<![endif]-->",
        b"<!--[if mso]></body></html><![endif]-->",
        b"&amp; friends,&nbsp;welcome.",
        b"&copy; 2024",
    ):
        assert text.count(piece) == change.old_text.count(piece) == 1, piece
    # the control header went, nothing else in the header section moved
    assert b"X-Track" not in rewrite(original, PIXEL_URL).message


def test_no_closing_body_but_closing_html() -> None:
    html = "<html><body><p>x</p>\r\n</html>\r\n"
    change = tracked(html_message(html))
    assert change.new_text == html.replace("</html>", PIXEL.decode() + "</html>").encode()


def test_unterminated_attribute_has_no_safe_place() -> None:
    result = untouched(html_message('<html><body><a href="http://x</body></html>'), "no-html-body")
    assert "no-insertion-point" in result.defects


# -- transfer encodings and charsets -------------------------------------------------------


@pytest.mark.parametrize("cte", [None, "7bit", "8bit", "binary", "quoted-printable", "base64"])
def test_each_transfer_encoding(cte: str | None) -> None:
    html = "<html><body>\r\n<p>caf\u00e9 =3D &amp;</p>\r\n</body></html>\r\n"
    change = tracked(html_message(html, cte=cte))
    assert change.new_text == html.replace("</body>", PIXEL.decode() + "</body>").encode()


def test_quoted_printable_only_the_insertion_line_reencoded() -> None:
    lines = [f"<p>line {i} with caf=C3=A9 and =3D signs</p>" for i in range(40)]
    encoded = "\r\n".join(["<html><body>", *lines, "</body></html>"]).encode()
    original = message(
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    )
    change = tracked(original)
    out = rewrite(original, PIXEL_URL).message
    assert out.startswith(original[: original.index(b"</body></html>")])
    assert out.endswith(b"</body></html>")
    assert all(len(line) <= 76 for line in out[len(original) - 14 :].split(b"\r\n"))
    assert change.new_text.endswith(PIXEL + b"</body></html>")


def test_quoted_printable_soft_line_breaks_inside_attributes() -> None:
    encoded = (
        b'<html><body><a href=3D"https://example.org/a/very/long/path/that/is/split/=\r\n'
        b'across/lines?with=3Dparams&amp;more=3D1" title=3D"soft =\r\n'
        b'break">link</a><img src=3D"cid:logo" alt=3D"lo=\r\n'
        b'go"></body></html>'
    )
    original = message(
        b"Content-Type: text/html; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded + b"\r\n"
    )
    change = tracked(original)
    assert change.new_text.count(PIXEL) == 1
    assert change.new_text.index(PIXEL) + len(PIXEL) == change.new_text.index(b"</body>")
    assert b'href="https://example.org/a/very/long/path/that/is/split/across' in change.new_text


def test_base64_html_other_lines_untouched() -> None:
    html = "<html><body>" + "".join(f"<p>row {i}</p>\r\n" for i in range(200)) + "</body></html>"
    original = html_message(html, cte="base64")
    change = tracked(original)
    out = rewrite(original, PIXEL_URL).message
    old_lines = original.split(b"\r\n")
    new_lines = out.split(b"\r\n")
    assert new_lines[: len(old_lines) - 3] == old_lines[: len(old_lines) - 3]
    assert all(len(line) <= 76 for line in new_lines)
    assert change.new_text.endswith(change.pixel + b"</body></html>")
    assert change.pixel.startswith(PIXEL[:-1])  # maybe spaces before ">", for whole quanta


@pytest.mark.parametrize(
    ("charset", "words"),
    [
        ("windows-1252", "Caf\u00e9 \u20ac 5 \u2013 na\u00efve"),
        ("iso-8859-1", "Gr\u00fc\u00dfe aus K\u00f6ln"),
        ("koi8-r", "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440"),
        ("utf-8", "\u65e5\u672c\u8a9e \u2603 \U0001f600"),
        ("iso-2022-jp", "\u3053\u3093\u306b\u3061\u306f\u3001\u4e16\u754c"),
    ],
)
@pytest.mark.parametrize("cte", ["8bit", "quoted-printable", "base64"])
def test_charsets(charset: str, words: str, cte: str) -> None:
    html = f"<html><body><p>{words}</p>\r\n<p>{words}</p></body></html>\r\n"
    change = tracked(html_message(html, charset=charset, cte=cte))
    assert change.new_text.decode(charset) == html.replace("</body>", PIXEL.decode() + "</body>")


def test_charset_from_meta_when_mime_has_none() -> None:
    greeting = "\u041f\u0440\u0438\u0432\u0435\u0442"
    html = f'<html><head><meta charset="koi8-r"></head><body><p>{greeting}</p></body></html>'
    change = tracked(message(leaf(html.encode("koi8-r"), charset=None, cte="8bit")))
    assert change.new_text == html.encode("koi8-r").replace(b"</body>", PIXEL + b"</body>")


def test_iso_2022_jp_fixture() -> None:
    original = fixture("iso-2022-jp.eml")
    change = tracked(original)
    assert change.new_text.decode("iso-2022-jp") == change.old_text.decode("iso-2022-jp").replace(
        "</body>", PIXEL.decode() + "</body>"
    )


def test_undecodable_charset_octets_kept_exactly() -> None:
    body = b"<html><body><p>caf\xe9 \x81\x8d \xff</p></body></html>"
    change = tracked(message(leaf(body, charset="utf-8", cte="8bit")))
    assert change.new_text == body.replace(b"</body>", PIXEL + b"</body>")


def test_unknown_charset_octets_kept_exactly() -> None:
    body = b"<html><body><p>\xe9\xe8</p></body></html>"
    result = rewrite(message(leaf(body, charset="x-no-such-charset", cte="8bit")), PIXEL_URL)
    assert result.tracked
    assert "unknown-charset:x-no-such-charset" in result.defects


# -- which part ----------------------------------------------------------------------------


def test_last_html_alternative_is_chosen() -> None:
    first = leaf("<html><body>first</body></html>")
    last = leaf("<html><body>last</body></html>")
    original = message(multipart("alternative", leaf("plain", ctype="text/plain"), first, last))
    change = tracked(original)
    assert b"last" in change.new_text


def test_related_root_by_start_parameter_with_cid_images() -> None:
    image = leaf(
        b"GIF89a",
        ctype="image/gif",
        charset=None,
        cte="base64",
        extra="Content-ID: <logo@example>\r\nContent-Disposition: inline\r\n",
    )
    decoy = leaf("<html><body>decoy</body></html>", extra="Content-ID: <decoy@example>\r\n")
    root = leaf(
        '<html><body><img src="cid:logo@example"></body></html>',
        extra="Content-ID: <root@example>\r\n",
    )
    related = multipart(
        "related",
        image,
        decoy,
        root,
        boundary="rel",
        params='; type="text/html"; start="<root@example>"',
    )
    change = tracked(message(related))
    assert b'src="cid:logo@example"' in change.new_text


def test_related_root_is_first_part_without_start() -> None:
    root = leaf('<html><body><img src="cid:logo@example"></body></html>')
    image = leaf(
        b"GIF89a",
        ctype="image/gif",
        charset=None,
        cte="base64",
        extra="Content-ID: <logo@example>\r\n",
    )
    alternative = multipart(
        "alternative",
        leaf("plain", ctype="text/plain"),
        multipart("related", root, image, boundary="rel"),
        boundary="alt",
    )
    mixed = multipart(
        "mixed",
        alternative,
        leaf(
            b"%PDF",
            ctype="application/pdf",
            charset=None,
            cte="base64",
            extra='Content-Disposition: attachment; filename="a.pdf"\r\n',
        ),
        boundary="mix",
    )
    change = tracked(message(mixed))
    assert change.new_text.endswith(PIXEL + b"</body></html>")


def test_mixed_first_part_only() -> None:
    original = message(
        multipart(
            "mixed", leaf("text", ctype="text/plain"), leaf("<html><body>second</body></html>")
        )
    )
    untouched(original, "html-after-text-in-mixed")


def test_html_attachment_is_never_used() -> None:
    attached = leaf(
        "<html><body>attached</body></html>",
        extra='Content-Disposition: attachment; filename="page.html"\r\n',
    )
    untouched(message(attached), "no-html-body")
    untouched(
        message(multipart("alternative", leaf("x", ctype="text/plain"), attached)), "no-html-body"
    )


def test_attached_message_html_not_touched() -> None:
    original = fixture("forwarded-rfc822.eml")
    change = tracked(original)
    assert b"See the attached message." in change.new_text
    out = rewrite(original, PIXEL_URL).message
    attached = out[out.index(b"Content-Type: message/rfc822") :]
    assert PIXEL_URL.encode() not in attached
    only_attached = message(
        multipart(
            "mixed",
            leaf("see attached", ctype="text/plain"),
            b"Content-Type: message/rfc822\r\n\r\n"
            + html_message("<html><body>inner</body></html>"),
        )
    )
    untouched(only_attached, "no-html-body")


# -- never touched -------------------------------------------------------------------------


def test_smime_signed_untouched() -> None:
    untouched(fixture("smime-signed.eml"), "multipart-signed")


def test_smime_signed_inside_mixed_untouched() -> None:
    inner = fixture("smime-signed.eml")
    signed = inner[inner.index(b"Content-Type: multipart/signed") :]
    untouched(message(multipart("mixed", signed, boundary="wrap")), "multipart-signed")


@pytest.mark.parametrize("ctype", ["application/pkcs7-mime", "application/x-pkcs7-mime"])
def test_pkcs7_mime_untouched(ctype: str) -> None:
    opaque = leaf(
        b"0\x82\x01\x00",
        ctype=ctype,
        charset=None,
        cte="base64",
        extra='Content-Disposition: attachment; filename="smime.p7m"\r\n',
    )
    untouched(
        message(opaque.replace(ctype.encode(), ctype.encode() + b"; smime-type=enveloped-data")),
        "pkcs7-mime",
    )


def test_pgp_encrypted_untouched() -> None:
    untouched(fixture("pgp-encrypted.eml"), "multipart-encrypted")


DKIM = (
    "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=sel;\r\n"
    " h=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
    " b=AAAA\r\n"
)


def test_dkim_signed_untouched_by_default() -> None:
    untouched(html_message("<p>x</p>", headers=DKIM), "dkim-signed")


def test_dkim_signed_tracked_when_policy_says_track() -> None:
    tracked(html_message("<p>x</p>", headers=DKIM), RewritePolicy(dkim_policy="track"))


def test_null_reverse_path_untouched() -> None:
    untouched(html_message("<p>x</p>"), "null-reverse-path", reverse_path="")
    tracked(html_message("<p>x</p>"), reverse_path="sender@example.org")


def test_multipart_report_untouched() -> None:
    report = multipart(
        "report",
        leaf("<html><body>bounce</body></html>"),
        leaf(
            "Reporting-MTA: dns; mx.example.org\r\n", ctype="message/delivery-status", charset=None
        ),
        params="; report-type=delivery-status",
    )
    untouched(message(report), "report")


@pytest.mark.parametrize("value", ["auto-replied", "auto-generated", "Auto-Notified (x)", ""])
def test_auto_submitted_untouched(value: str) -> None:
    untouched(html_message("<p>x</p>", headers=f"Auto-Submitted: {value}\r\n"), "auto-submitted")


def test_auto_submitted_no_is_tracked() -> None:
    tracked(html_message("<p>x</p>", headers="Auto-Submitted: No\r\n"))


def test_no_html_body() -> None:
    untouched(message(leaf("plain", ctype="text/plain")), "no-html-body")
    untouched(message(b"\r\nno content type\r\n"), "no-html-body")
    untouched(html_message("   \r\n"), "no-html-body")


# -- opt-in, opt-out, the control header ---------------------------------------------------


def test_control_header_removed_when_tracked() -> None:
    original = html_message("<p>x</p>", headers="X-Track: yes\r\n")
    tracked(original)
    out = rewrite(original, PIXEL_URL).message
    assert b"X-Track" not in out
    assert out.startswith(original[: original.index(b"X-Track")])


def test_opt_out_untouched_and_control_header_removed() -> None:
    original = html_message("<p>x</p>", headers="x-track: NO\r\n")
    result = untouched(original, "opt-out")
    assert result.message == original.replace(b"x-track: NO\r\n", b"")


def test_folded_control_header_removed() -> None:
    original = html_message(
        "<p>x</p>", headers="X-Track:\r\n  no\r\n\t(user asked)\r\nX-Other: 1\r\n"
    )
    result = untouched(original, "opt-out")
    assert result.message == original.replace(b"X-Track:\r\n  no\r\n\t(user asked)\r\n", b"")


def test_opt_in_required() -> None:
    policy = RewritePolicy(tracking_requires_opt_in=True)
    untouched(html_message("<p>x</p>"), "no-opt-in", policy)
    tracked(html_message("<p>x</p>", headers="X-Track: Yes\r\n"), policy)


def test_control_header_removed_whatever_the_decision() -> None:
    original = html_message("<p>x</p>", headers="X-Track: yes\r\n" + DKIM)
    result = untouched(original, "dkim-signed")
    assert b"X-Track" not in result.message


def test_custom_control_header() -> None:
    policy = RewritePolicy(control_header="X-Pixel")
    original = html_message("<p>x</p>", headers="X-Pixel: no\r\nX-Track: no\r\n")
    result = untouched(original, "opt-out", policy)
    assert b"X-Pixel" not in result.message
    assert b"X-Track: no\r\n" in result.message


def test_control_header_only_top_level() -> None:
    part = leaf("<html><body>x</body></html>", extra="X-Track: no\r\n")
    original = message(multipart("alternative", leaf("x", ctype="text/plain"), part))
    tracked(original)
    assert b"X-Track: no" in rewrite(original, PIXEL_URL).message


# -- line endings and lengths --------------------------------------------------------------


def test_lf_only_message() -> None:
    original = html_message("<html><body><p>x</p></body></html>\n").replace(b"\r\n", b"\n")
    change = tracked(original)
    out = rewrite(original, PIXEL_URL).message
    assert b"\r" not in out
    assert change.new_text == b"<html><body><p>x</p>" + PIXEL + b"</body></html>\n"


def test_lf_only_quoted_printable_keeps_lf() -> None:
    body = "<html><body>" + "x" * 70 + "\u00e9</body></html>\n"
    original = html_message(body, cte="quoted-printable").replace(b"\r\n", b"\n")
    tracked(original)
    assert b"\r" not in rewrite(original, PIXEL_URL).message


def test_long_line_gets_a_folded_pixel_never_over_998() -> None:
    html = "<html><body><p>" + "x" * 900 + "</p></body></html>\r\n"
    original = html_message(html)
    change = tracked(original)
    out = rewrite(original, PIXEL_URL).message
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    assert b"\r\n" in change.pixel  # attributes on their own lines, inside the tag


def test_no_line_over_998_added_to_an_already_long_line_check() -> None:
    html = "<html><body><p>" + "x" * 1200 + "</p></body></html>\r\n"
    tracked(html_message(html))


# -- failing open --------------------------------------------------------------------------


def test_never_raises_and_logs_without_content(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret body text <p>x</p>")

    monkeypatch.setattr(rewrite_module, "read_part", boom)
    original = html_message("<p>secret body text</p>", headers="X-Track: yes\r\n")
    with caplog.at_level(logging.WARNING, logger="smtp_tracker.mime"):
        result = rewrite(original, PIXEL_URL)
    assert result == RewriteResult(
        message=original, tracked=False, reason="rewrite-failed", defects=("RuntimeError",)
    )
    assert len(caplog.records) == 1
    assert caplog.records[0].name == "smtp_tracker.mime"
    assert "secret" not in caplog.text


def test_output_parses_with_email() -> None:
    out = rewrite(fixture("outlook-vml.eml"), PIXEL_URL).message
    parsed = email.message_from_bytes(out, policy=compat32)
    assert [p.get_content_type() for p in parsed.walk()] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]
