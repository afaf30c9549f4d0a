"""The link finder over hostile markup: linear, bounded in CPU time, failing open.

Python's ``html.parser`` steps over a construct it cannot finish (``<a`` with
no ``>`` after it) two characters at a time at ``close()``, scanning to the
end each time: ``find_html_links("<a" * 131072)`` took about 93 s, and a
0.7 MB HTML part of it held a rewrite thread for minutes (issue 12, item 2).
The bounds here are CPU seconds (``time.process_time``), which a busy
machine does not stretch; the inputs are 0.5 to 1.6 MB.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from smtp_tracker.mime import RewritePolicy, rewrite
from smtp_tracker.mime.deadline import TimeLimitExceeded, check, time_limit
from smtp_tracker.mime.links import find_html_links
from tests.mime.invariants import check as check_rewrite
from tests.mime.messages import PIXEL_URL, html_message

N = 262_144
#: CPU seconds one search may take (each input below takes well under 1 s).
CPU_BOUND_S = 4.0
LINK = '<a href="https://shop.example.com/x">x</a>'

ADVERSARIAL: dict[str, Callable[[int], str]] = {
    "unfinished start tags": lambda n: "<a" * n,
    "unfinished start tags, lines": lambda n: ("<a" * 400 + "\r\n") * (n // 400),
    "unclosed single-quoted attributes": lambda n: "<a x='" * (n // 2),
    "unclosed double-quoted attributes": lambda n: '<a x="' * (n // 2),
    "unquoted attribute values": lambda n: "<a x=" * (n // 2),
    "one tag, many attributes": lambda n: "<a " + "x=y " * (n // 2),
    "self-closing slashes": lambda n: "<a/" * n,
    "unclosed comments": lambda n: "<!--" * n,
    "a comment never closed": lambda n: LINK + "<!--" + "x" * n,
    "markup declarations": lambda n: "<!" * n,
    "end tags": lambda n: "</a" * n,
    "processing instructions": lambda n: "<?" * n,
    "CDATA sections": lambda n: "<![CDATA[" * (n // 4),
    "doctypes": lambda n: "<!DOCTYPE" * (n // 4),
    "character references": lambda n: "&#" * n,
    "an unclosed script": lambda n: "<script>" + "<" * n,
    "raw text elements": lambda n: "<title>" * (n // 4),
    "deep nesting": lambda n: "<div>" * (n // 4) + LINK * 10,
    "deep VML nesting": lambda n: "<v:group>" * (n // 8) + LINK * 10,
    "deep nesting, closed": lambda n: "<b>" * (n // 8) + LINK + "</b>" * (n // 8),
}


def _cpu(call: Callable[[], object]) -> float:
    started = time.process_time()
    call()
    return time.process_time() - started


@pytest.mark.parametrize("make", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_markup_is_searched_in_bounded_cpu_time(make: Callable[[int], str]) -> None:
    text = make(N)
    assert len(text) >= 200_000
    found: list[tuple[list[object], str | None]] = []
    spent = _cpu(lambda: found.append(find_html_links(text)))  # type: ignore[arg-type]
    assert spent < CPU_BOUND_S, f"{spent:.2f} CPU s for {len(text)} characters"
    links, defect = found[0]
    assert links == [] or defect is None


def test_the_original_input_wraps_nothing_and_says_why() -> None:
    links, defect = find_html_links(LINK + "<a" * 131_072)
    assert (links, defect) == ([], "links-markup-unfinished")


def test_a_short_unfinished_end_is_still_read_to_its_end() -> None:
    links, defect = find_html_links(LINK + "<a" * 100)
    assert defect is None
    assert [link.url for link in links] == ["https://shop.example.com/x"]


def test_many_real_links_are_found_in_linear_time() -> None:
    small = _cpu(lambda: find_html_links(LINK * 2_000))
    large = _cpu(lambda: find_html_links(LINK * 16_000))
    links, defect = find_html_links(LINK * 16_000)
    assert defect is None and len(links) == 16_000
    assert large < 16 * small + 0.5, (small, large)  # 8 times the input: not 64 times the time


def test_links_inside_vml_are_still_marked_as_such() -> None:
    text = "<body><v:roundrect>" + LINK + "</v:roundrect>" + LINK + "</body>"
    links, defect = find_html_links(text)
    assert defect is None
    assert [link.in_vml for link in links] == [True, False]


@pytest.mark.parametrize("cte", ["8bit", "base64"])
def test_a_hostile_html_part_with_clicks_is_rewritten_in_bounded_cpu_time(cte: str) -> None:
    html = f"<html><body>{LINK}</body></html>\r\n" + ("<a" * 400 + "\r\n") * 900  # no ">" after
    original = html_message(html, cte=cte)
    policy = RewritePolicy(track_clicks=True)
    results = []
    spent = _cpu(
        lambda: results.append(
            rewrite(original, PIXEL_URL, policy, click_base_url="https://t.example")
        )
    )
    assert spent < CPU_BOUND_S, f"{spent:.2f} CPU s"
    (result,) = results
    check_rewrite(original, result, PIXEL_URL)
    assert (result.tracked, result.links) == (True, ())  # fail open to the pixel alone
    assert "links-markup-unfinished" in result.defects


def test_the_deadline_stops_a_rewrite_from_inside() -> None:
    with time_limit(0.0), pytest.raises(TimeLimitExceeded):
        check()
    check()  # no limit outside the block
    with time_limit(None):
        check()


def test_an_inner_limit_never_extends_an_outer_one() -> None:
    with time_limit(0.0), time_limit(60.0), pytest.raises(TimeLimitExceeded):
        check()


def test_a_rewrite_past_its_time_limit_relays_the_original_and_stops() -> None:
    row = "<tr><td>Row of a long table</td></tr>\r\n"
    html = "<html><body><table>\r\n" + row * 200_000 + "</table></body></html>\r\n"
    original = html_message(html)
    policy = RewritePolicy(time_limit_s=0.001)
    results = []
    spent = _cpu(lambda: results.append(rewrite(original, PIXEL_URL, policy)))
    (result,) = results
    assert (result.tracked, result.reason, result.message) == (False, "rewrite-timeout", original)
    assert result.defects == ("time-limit",)
    unlimited = _cpu(lambda: rewrite(original, PIXEL_URL))
    assert spent < unlimited, (spent, unlimited)  # it stopped early rather than finishing


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_time_limit_is_validated(value: object) -> None:
    with pytest.raises(ValueError, match="time_limit_s"):
        RewritePolicy(time_limit_s=value)  # type: ignore[arg-type]
