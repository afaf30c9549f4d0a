"""Click tracking in the rewrite: which links are wrapped, how the values are spliced."""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any

import pytest

from smtp_tracker.app import rewrite_policy
from smtp_tracker.config import Config
from smtp_tracker.mime import RewritePolicy, RewriteResult, rewrite
from smtp_tracker.mime.links import (
    DEFAULT_CLICK_EXCLUDE_PATTERNS,
    Href,
    LinkRules,
    find_html_links,
    find_text_links,
    list_unsubscribe_urls,
)
from smtp_tracker.mime.structure import read_part
from smtp_tracker.tokens import click_url
from tests.mime.link_invariants import (
    DEFAULT_EXCLUDES,
    Wrapped,
    changed_html,
    check_clicks,
)
from tests.mime.messages import PIXEL_URL, html_message, leaf, message, multipart

rewrite_module = importlib.import_module("smtp_tracker.mime.rewrite")

BASE = "https://track.example.test:8443"
CLICKS = RewritePolicy(track_clicks=True)
CLICK = re.compile(re.escape(BASE) + r"/c/[A-Za-z0-9_-]{23}")
SHOP = "https://shop.example.com/sale"


def clicked(
    original: bytes, policy: RewritePolicy = CLICKS, **kwargs: Any
) -> tuple[RewriteResult, list[Wrapped]]:
    """Rewrite with and without clicks; check the invariants; the click result and values."""
    pixel_only = rewrite(
        original, PIXEL_URL, dataclasses.replace(policy, track_clicks=False), **kwargs
    )
    result = rewrite(original, PIXEL_URL, policy, click_base_url=BASE, **kwargs)
    wrapped = check_clicks(original, pixel_only, result, BASE)
    return result, wrapped


def urls(result: RewriteResult) -> list[str]:
    return [link.url for link in sorted(result.links, key=lambda link: link.position)]


def page(body: str) -> str:
    head = "<!DOCTYPE html>\r\n<html><head><title>t</title></head><body>\r\n"
    return f"{head}{body}\r\n</body></html>\r\n"


# -- entities, quoting, case -------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "destination"),
    [
        ("https://x.example/?a=1&amp;b=2", "https://x.example/?a=1&b=2"),
        ("https://x.example/?a=1&#x26;b=2&#38;c=3", "https://x.example/?a=1&b=2&c=3"),
        ("https://x.example/?a=1&AMP;b=2", "https://x.example/?a=1&b=2"),
        # HTML §13.2.5.73: a legacy entity without ";" before "=" stays as written
        ("https://x.example/?a=1&copy=2&reg=3", "https://x.example/?a=1&copy=2&reg=3"),
        ("https://x.example/?a=1&amp&b", "https://x.example/?a=1&&b"),
        ("https://x.example/p%20q?r=%41#frag", "https://x.example/p%20q?r=%41#frag"),
        ("&#104;ttps://x.example/", "https://x.example/"),
        ("  https://x.example/a\r\n/b\t ", "https://x.example/a/b"),  # WHATWG URL trimming
        ("https://x.example/caf&eacute;", "https://x.example/café"),
    ],
)
def test_entities_in_urls_are_decoded_in_the_stored_destination(
    written: str, destination: str
) -> None:
    html = page(f'<a href="{written}">x</a>')
    result, wrapped = clicked(html_message(html, cte="quoted-printable"))
    assert urls(result) == [destination]
    assert [w.old_value for w in wrapped] == [written.encode("utf-8")]
    # 7bit/8bit: a value holding a line break is not wrapped (the lines would join)
    result, wrapped = clicked(html_message(html, cte="8bit"))
    assert urls(result) == ([] if "\n" in written else [destination])


def test_quote_styles_and_the_case_of_names_are_kept() -> None:
    html = page(
        f'<A HREF="{SHOP}?q=1">double</A>\r\n'
        f"<a Href='{SHOP}?q=2'>single</a>\r\n"
        f"<a href={SHOP}?q=3>bare</a>\r\n"
        f'<map name=m><AREA SHAPE=rect COORDS="0,0,1,1" HREF = "{SHOP}?q=4"></map>\r\n'
        f'<a\r\n  class="btn"  href =\r\n "{SHOP}?q=5"\r\n  target=_blank>spaced</a>'
    )
    result, _wrapped = clicked(html_message(html))
    assert urls(result) == [f"{SHOP}?q={n}" for n in range(1, 6)]
    texts = changed_html(rewrite(html_message(html), PIXEL_URL).message, result.message)
    assert texts is not None
    new = texts[1]
    assert re.search(r'<A HREF="' + CLICK.pattern + r'">double</A>', new)
    assert re.search(r"<a Href='" + CLICK.pattern + r"'>single</a>", new)
    assert re.search(r"<a href=" + CLICK.pattern + r">bare</a>", new)
    assert re.search(r'HREF = "' + CLICK.pattern + r'"></map>', new)
    assert re.search(r'href =\r\n "' + CLICK.pattern + r'"\r\n  target=_blank>', new)


def test_markup_outside_the_href_values_is_byte_identical() -> None:
    html = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN">\r\n'
        "<html><head><style>a[href^='https://'] { color: red }</style>\r\n"
        "<script>var s = '<a href=\"https://script.example/\">';</script></head>\r\n"
        '<body class=x>  <!-- <a href="https://comment.example/"> -->\r\n'
        f'<p title=\'&amp; &lt;\'>caf\u00e9 &copy; <a id=a1 href="{SHOP}" style="x:y">one</a>'
        f'<img src="https://img.example/i.png" alt=\'<a href="{SHOP}">\'>\r\n'
        f'<textarea><a href="https://textarea.example/"></textarea><b>&nbsp;</b>\r\n'
        f'<a href="{SHOP}#two"/>two</a>\r\n'
        "</body></html>\r\n"
    )
    result, wrapped = clicked(html_message(html))
    assert urls(result) == [SHOP, f"{SHOP}#two"]
    assert [w.old_value for w in wrapped] == [SHOP.encode(), f"{SHOP}#two".encode()]
    assert "links-not-aligned" not in result.defects


@pytest.mark.parametrize("cte", ["quoted-printable", "base64", "8bit", "7bit", None])
def test_every_transfer_encoding(cte: str | None) -> None:
    long_query = "&amp;".join(f"param{n}=value{n}" for n in range(30))
    html = page(
        f'<p>{"word " * 40}<a href="{SHOP}?{long_query}">long</a> {"more " * 30}\r\n'
        f'<a href="https://x.example/\u00e9t\u00e9">accents</a> caf\u00e9\r\n'
        + "".join(f'<a href="{SHOP}/{n}">{n}</a>\r\n' for n in range(20))
    )
    result, wrapped = clicked(html_message(html, cte=cte, charset="utf-8"))
    assert len(wrapped) == 22
    assert urls(result)[0] == SHOP + "?" + long_query.replace("&amp;", "&")
    assert urls(result)[1] == "https://x.example/\u00e9t\u00e9"


def test_a_quoted_printable_value_across_soft_line_breaks() -> None:
    body = (
        b'<html><body><p>Text =E9 <a href=3D"https://shop.example.com/a-very-long-path=\r\n'
        b"/that/goes/on?x=3D1&amp;y=3D=\r\n"
        b'2">go</a> and =3D more</p>\r\n'
        b"<p>untouched line</p>\r\n"
        b"</body></html>\r\n"
    )
    original = message(
        b"Content-Type: text/html; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body
    )
    result, wrapped = clicked(original)
    assert urls(result) == ["https://shop.example.com/a-very-long-path/that/goes/on?x=1&y=2"]
    assert (
        wrapped[0].old_value
        == b"https://shop.example.com/a-very-long-path/that/goes/on?x=1&amp;y=2"
    )
    assert b"<p>untouched line</p>\r\n" in result.message


def test_each_occurrence_gets_its_own_unguessable_token() -> None:
    html = page("".join(f'<a href="{SHOP}">{n}</a>\r\n' for n in range(3)))
    result, wrapped = clicked(html_message(html))
    assert urls(result) == [SHOP] * 3
    assert len({w.token for w in wrapped}) == 3
    assert [link.position for link in result.links] == [0, 1, 2]
    for link in result.links:
        assert len(link.token) == 23 and not link.token.startswith("-")
        assert "reader" not in link.token and "example" not in link.token


# -- what is never wrapped ----------------------------------------------------------------

NEVER = {
    "mailto": '<a href="mailto:help@example.org?subject=hi">m</a>',
    "tel": '<a href="tel:+15555550100">t</a>',
    "fragment": '<a href="#top">f</a>',
    "cid": '<a href="cid:part1@example.org">c</a>',
    "data": '<a href="data:text/html,hello">d</a>',
    "javascript": '<a href="javascript:alert(1)">j</a>',
    "relative path": '<a href="/account">r</a>',
    "relative file": '<a href="page.html?x=https://x.example/">r</a>',
    "protocol-relative": '<a href="//cdn.example.com/x">p</a>',
    "ftp": '<a href="ftp://files.example.com/x">f</a>',
    "no host": '<a href="https:///path">h</a>',
    "own host": '<a href="https://track.example.test/c/AAAAAAAAAAAAAAAAAAAAAAA">o</a>',
    "own host other port": '<a href="https://TRACK.example.test:9999/x">o</a>',
    "unsubscribe": '<a href="https://lists.example.org/Unsubscribe?u=1">u</a>',
    "unsub": '<a href="https://lists.example.org/unsub/1">u</a>',
    "opt-out": '<a href="https://x.example/opt-out?u=1">o</a>',
    "optout": '<a href="https://x.example/OptOut">o</a>',
    "preferences": '<a href="https://x.example/email-preferences">p</a>',
    "list-unsubscribe": '<a href="https://x.example/l/8f7e?a=1&amp;b=2">l</a>',
    "notrack": '<a data-notrack href="https://x.example/private">n</a>',
    "notrack valued": "<a href='https://x.example/private' DATA-NOTRACK='yes'>n</a>",
    "mso conditional": '<!--[if mso]><a href="https://x.example/mso">o</a><![endif]-->',
    "vml": (
        '<!--[if mso]><v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" '
        'href="https://x.example/vml"><v:textbox>Go</v:textbox></v:roundrect><![endif]-->'
    ),
    "a inside vml": (
        '<v:roundrect href="https://x.example/vml"><v:textbox>'
        '<a href="https://x.example/inside-vml">go</a></v:textbox></v:roundrect>'
    ),
    "in a comment": '<!-- <a href="https://x.example/commented">c</a> -->',
    "in script": "<script>document.write('<a href=\"https://x.example/s\">')</script>",
    "in textarea": '<textarea><a href="https://x.example/t"></textarea>',
    "in title": '<title><a href="https://x.example/t"></title>',
    "in an attribute": '<img alt=\'<a href="https://x.example/alt">\' src="cid:i">',
    "control character": '<a href="https://x.example/a&#1;b">c</a>',
    "bad port": '<a href="https://x.example:99999/">p</a>',
}
LIST_UNSUBSCRIBE = (
    "List-Unsubscribe: <mailto:u@example.org>,\r\n <https://x.example/l/8f7e?a=1&b=2>\r\n"
)


@pytest.mark.parametrize("snippet", NEVER.values(), ids=NEVER.keys())
def test_never_wrapped(snippet: str) -> None:
    html = page(f'{snippet}\r\n<a href="{SHOP}">wrapped</a>')
    original = html_message(html, headers=LIST_UNSUBSCRIBE)
    result, wrapped = clicked(original)
    assert urls(result) == [SHOP], result.defects
    assert [w.old_value for w in wrapped] == [SHOP.encode()]
    assert not result.defects


def test_downlevel_revealed_conditional_content_is_wrapped() -> None:
    html = page(f'<!--[if !mso]><!--><a href="{SHOP}">button</a><!--<![endif]-->')
    result, _ = clicked(html_message(html))
    assert urls(result) == [SHOP]


def test_configured_exclusions_and_marker_attribute() -> None:
    policy = RewritePolicy(
        track_clicks=True,
        click_exclude_patterns=(r"^https://internal\.", r"[?&]utm_campaign=secret"),
        click_notrack_attribute="x-skip",
    )
    html = page(
        '<a href="HTTPS://INTERNAL.example.com/x">internal</a>\r\n'
        '<a href="https://x.example/?utm_campaign=secret">secret</a>\r\n'
        '<a href="https://x.example/p" X-SKIP>skipped</a>\r\n'
        '<a href="https://x.example/q" data-notrack>default marker no longer special</a>\r\n'
        '<a href="https://lists.example.org/unsubscribe">patterns replaced the defaults</a>'
    )
    result, _ = clicked(html_message(html), policy)
    assert urls(result) == ["https://x.example/q", "https://lists.example.org/unsubscribe"]


def test_default_patterns_are_the_documented_ones() -> None:
    assert DEFAULT_CLICK_EXCLUDE_PATTERNS == DEFAULT_EXCLUDES
    config = Config(hostname="relay.test")
    assert config.click_exclude_patterns == DEFAULT_CLICK_EXCLUDE_PATTERNS
    policy = rewrite_policy(config)
    assert policy.time_limit_s == config.rewrite_timeout_s  # the rewrite thread stops then
    assert dataclasses.replace(policy, time_limit_s=None) == RewritePolicy()
    assert RewritePolicy().click_exclude_patterns == DEFAULT_EXCLUDES
    assert RewritePolicy().click_notrack_attribute == "data-notrack"
    assert (RewritePolicy().track_clicks, RewritePolicy().track_text_links) == (False, False)


# -- text/plain ---------------------------------------------------------------------------

TEXT = (
    "Sale: https://shop.example.com/sale?a=1&b=2. See (https://x.example/wiki/A_(b)) or\r\n"
    "<https://x.example/angle>, 'https://x.example/quoted', https://x.example/end!\r\n"
    "Leave: https://lists.example.org/unsubscribe?u=1 and mailto:u@example.org\r\n"
    "Not a URL: xhttps://x.example/ nor ftp://x.example/\r\n"
)
TEXT_URLS = [
    "https://shop.example.com/sale?a=1&b=2",
    "https://x.example/wiki/A_(b)",
    "https://x.example/angle",
    "https://x.example/quoted",
    "https://x.example/end",
]


def alternative(text: str, html: str, *, cte: str | None = None) -> bytes:
    return message(
        multipart(
            "alternative",
            leaf(text, ctype="text/plain", cte=cte),
            leaf(html, cte="quoted-printable"),
        )
    )


@pytest.mark.parametrize("cte", [None, "quoted-printable", "base64"])
def test_text_plain_alternative_urls_with_track_text_links(cte: str | None) -> None:
    original = alternative(TEXT, page(f'<a href="{SHOP}">x</a>'), cte=cte)
    policy = RewritePolicy(track_clicks=True, track_text_links=True)
    result, wrapped = clicked(original, policy)
    assert urls(result) == [SHOP, *TEXT_URLS]
    assert [w.ctype for w in wrapped] == ["text/plain"] * 5 + ["text/html"]


def test_text_plain_is_left_alone_by_default() -> None:
    original = alternative(TEXT, page(f'<a href="{SHOP}">x</a>'))
    result, _wrapped = clicked(original)
    assert urls(result) == [SHOP]
    assert TEXT.encode() in result.message


def test_find_text_links_trims_sentence_punctuation() -> None:
    found = find_text_links(TEXT)
    assert [h.url for h in found] == [*TEXT_URLS, "https://lists.example.org/unsubscribe?u=1"]
    assert all(TEXT[h.start : h.end] == h.url for h in found)


# -- when nothing is wrapped --------------------------------------------------------------


def test_off_by_default_and_without_a_click_base_url() -> None:
    original = html_message(page(f'<a href="{SHOP}">x</a>'))
    plain = rewrite(original, PIXEL_URL)
    assert rewrite(original, PIXEL_URL, click_base_url=BASE) == plain
    assert rewrite(original, PIXEL_URL, CLICKS) == plain
    assert plain.links == ()


@pytest.mark.parametrize(
    ("headers", "reason"),
    [("X-Track: no\r\n", "opt-out"), ("Auto-Submitted: auto-replied\r\n", "auto-submitted")],
)
def test_untracked_messages_get_no_links(headers: str, reason: str) -> None:
    original = html_message(page(f'<a href="{SHOP}">x</a>'), headers=headers)
    result, wrapped = clicked(original)
    assert (result.tracked, result.reason, result.links, wrapped) == (False, reason, (), [])


def test_when_the_parsers_disagree_the_pixel_goes_in_alone() -> None:
    # "<!-->" ends a comment at once for HTML5 (and lxml), not for html.parser
    html = page(f'<!--><a href="{SHOP}?1">a</a> --><a href="{SHOP}?2">b</a>')
    original = html_message(html)
    result = rewrite(original, PIXEL_URL, CLICKS, click_base_url=BASE)
    assert result.tracked and result.links == ()
    assert "links-not-aligned" in result.defects
    assert result.message == rewrite(original, PIXEL_URL).message


def test_no_line_over_998_octets_in_7bit_and_8bit_parts() -> None:
    crowded = f'<a href="{SHOP}">x</a>' + "y" * (990 - len(f'<a href="{SHOP}">x</a>'))
    html = page(f'{crowded}\r\n<a href="{SHOP}?short">ok</a>')
    result, _ = clicked(html_message(html, cte="8bit"))
    assert urls(result) == [f"{SHOP}?short"]
    assert "links-line-too-long" in result.defects


@pytest.mark.parametrize(
    ("bounds", "defect"),
    [
        ({"max_click_html_bytes": 200}, "links-html-too-large"),
        ({"max_links": 2}, "links-too-many"),
    ],
)
def test_bounds_on_the_work_leave_the_pixel_alone(bounds: dict[str, int], defect: str) -> None:
    html = page("".join(f'<a href="{SHOP}/{n}">{n}</a>\r\n' for n in range(3)))
    original = html_message(html)
    policy = RewritePolicy(track_clicks=True, **bounds)
    result, wrapped = clicked(original, policy)
    assert result.tracked and (result.links, wrapped) == ((), [])
    assert defect in result.defects
    assert result.message == rewrite(original, PIXEL_URL).message
    # just within the bounds, every link is wrapped
    roomy = {name: 3 if name == "max_links" else len(html.encode()) for name in bounds}
    result, wrapped = clicked(original, RewritePolicy(track_clicks=True, **roomy))
    assert len(wrapped) == 3


def test_text_links_count_toward_max_links() -> None:
    original = alternative(TEXT, page(f'<a href="{SHOP}">x</a>'))
    policy = RewritePolicy(track_clicks=True, track_text_links=True, max_links=3)
    result, _wrapped = clicked(original, policy)
    assert urls(result) == [SHOP]  # the 5 text URLs would make 6
    assert "links-too-many" in result.defects


def test_iso_2022_jp_html() -> None:
    html = page(f'\u65e5\u672c\u8a9e <a href="{SHOP}?q=\u6771\u4eac">\u6771\u4eac</a> \u3067\u3059')
    original = html_message(html, charset="iso-2022-jp", cte="7bit")
    result, _ = clicked(original)
    assert urls(result) == [f"{SHOP}?q=\u6771\u4eac"]


def test_utf16_html_is_tracked_without_links() -> None:
    html = page(f'<a href="{SHOP}">x</a>')
    original = html_message(html, charset="utf-16", cte="base64")
    result, _ = clicked(original)
    assert result.tracked and result.links == ()
    assert "links-charset-unsupported" in result.defects


def test_an_internal_error_relays_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(text: str) -> tuple[list[Href], str | None]:
        raise RuntimeError("boom")

    monkeypatch.setattr(rewrite_module, "find_html_links", broken)
    original = html_message(page(f'<a href="{SHOP}">x</a>'), headers="X-Track: yes\r\n")
    result = rewrite(original, PIXEL_URL, CLICKS, click_base_url=BASE)
    assert (result.tracked, result.reason, result.message, result.links) == (
        False,
        "rewrite-failed",
        original,
        (),
    )


# -- the pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"click_exclude_patterns": ("(unclosed",)},
        {"click_exclude_patterns": ["unsubscribe"]},
        {"click_notrack_attribute": "data notrack"},
        {"click_notrack_attribute": ""},
        {"track_clicks": "yes"},
        {"track_text_links": 1},
        {"max_links": 0},
        {"max_click_html_bytes": -1},
    ],
)
def test_policy_rejects_bad_click_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RewritePolicy(**kwargs)


def test_list_unsubscribe_urls() -> None:
    part = read_part(
        b"List-Unsubscribe: <https://x.example/u?a=1&b=2>, (comment)\r\n"
        b"  <mailto:leave@example.org?subject=unsubscribe>\r\n"
        b"List-Unsubscribe: < https://y.example/u\r\n /2 >\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\n",
        0,
        200,
    )
    assert list_unsubscribe_urls(part.headers) == {
        "https://x.example/u?a=1&b=2",
        "mailto:leave@example.org?subject=unsubscribe",
        "https://y.example/u/2",
    }


def test_find_html_links_spans_and_skip_reasons() -> None:
    text = (
        "<a href=\"mailto:x@y\">m</a><A HREF='https://a.example/?x=1&amp;y' data-notrack>"
        "<area href=https://b.example/><a name=anchor><a href>e</a>"
    )
    links, defect = find_html_links(text)
    assert defect is None
    assert [(text[h.start : h.end], h.url, h.tag) for h in links] == [
        ("mailto:x@y", "mailto:x@y", "a"),
        ("https://a.example/?x=1&amp;y", "https://a.example/?x=1&y", "a"),
        ("https://b.example/", "https://b.example/", "area"),
    ]
    rules = LinkRules(own_host="b.example")
    assert [rules.skip_reason(h) for h in links] == ["not-http", "notrack", "own-host"]


def test_click_url() -> None:
    assert click_url(BASE + "/", "T") == BASE + "/c/T"
    assert click_url("https://t.example/x&y", "T") == "https://t.example/x&y/c/T"
    assert click_url("https://t\u00e9.example", "T") == "https://t%C3%A9.example/c/T"


def test_click_url_is_escaped_in_an_html_attribute_not_in_text() -> None:
    base = "https://t.example/x&y"
    html = page(f'<a href="{SHOP}">sale</a>')
    original = multipart("alternative", leaf(f"See {SHOP} now", ctype="text/plain"), leaf(html))
    policy = dataclasses.replace(CLICKS, track_text_links=True)
    result = rewrite(message(original), PIXEL_URL, policy, click_base_url=base)
    assert result.tracked and len(result.links) == 2, result.defects
    html_token, text_token = (link.token for link in result.links)
    assert f'href="https://t.example/x&amp;y/c/{html_token}"'.encode() in result.message
    assert f"See https://t.example/x&y/c/{text_token} now".encode() in result.message
