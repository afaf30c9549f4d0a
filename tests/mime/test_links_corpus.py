"""Click tracking over every message and template of the shared corpus ($SMTP_TRACKER_CORPUS).

Each message is rewritten without and with ``track_clicks``; besides the
invariants of :func:`tests.mime.link_invariants.check_clicks` (octets
identical but for the spliced ``href`` values, encodings respected), lxml
reads the ``<a>``/``<area>`` elements of the original and of the clicked HTML
body: every changed ``href`` is a click URL whose stored destination is the
original ``href`` as lxml reads it (entities decoded), every other ``href`` is
unchanged, and the ones left alone are the kinds that must be.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from smtp_tracker.mime import RewritePolicy, rewrite
from tests.corpus import corpus_root, eml_paths, html_as_message, html_paths, skip_reason
from tests.mime.link_invariants import (
    anchors,
    changed_html,
    check_clicks,
    click_pattern,
    destination,
    excluded,
    html_text,
    unsubscribe_urls,
)

pytestmark = [
    pytest.mark.corpus,
    pytest.mark.skipif(corpus_root() is None, reason=skip_reason()),
]

URL = "https://track.example.test/o/AAAAAAAAAAAAAAAAAAAAAA.gif"
BASE = "https://track.example.test:8443"
CLICKS = RewritePolicy(track_clicks=True)
VARIANTS = [("utf-8", "quoted-printable"), ("utf-8", "base64"), (None, "8bit")]
#: Defects that explain a link left alone although it could be wrapped.
EXPLAINED = frozenset({"links-line-too-long"})


def _id(path: Path) -> str:
    root = corpus_root()
    return str(path.relative_to(root)) if root else path.name


def check_message(original: bytes) -> collections.Counter[str]:
    """All checks for one message; what happened to its links, by kind."""
    pixel_only = rewrite(original, URL)
    result = rewrite(original, URL, CLICKS, click_base_url=BASE)
    check_clicks(original, pixel_only, result, BASE)
    kinds: collections.Counter[str] = collections.Counter()
    if not result.tracked:
        return kinds
    assert "links-not-aligned" not in result.defects, result.defects
    assert "links-splice-failed" not in result.defects, result.defects
    texts = changed_html(pixel_only.message, result.message)
    if texts is None:  # nothing wrapped: the HTML part is the pixel-only one
        assert result.links == ()
        texts = (_html_of(pixel_only.message), _html_of(pixel_only.message))
    before, after = anchors(texts[0]), anchors(texts[1])
    assert [a.tag for a in before] == [a.tag for a in after]
    stored = {link.token: link.url for link in result.links}
    pattern = click_pattern(BASE)
    unsubscribe = unsubscribe_urls(original)
    wrapped = 0
    for old, new in zip(before, after, strict=True):
        assert old.attributes == new.attributes
        why = (
            "no-href"
            if old.href is None
            else excluded(
                destination(old.href),
                attributes=old.attributes,
                in_vml=old.in_vml,
                unsubscribe=unsubscribe,
                own_host="track.example.test",
            )
        )
        if new.href != old.href:
            assert new.href is not None and old.href is not None
            match = pattern.fullmatch(new.href.encode())
            assert match, new.href
            assert stored[match.group(1).decode()] == destination(old.href)
            assert why is None, (why, old.href)
            wrapped += 1
            kinds["wrapped"] += 1
        else:
            assert why is not None or EXPLAINED & set(result.defects), old.href
            kinds[why or "explained"] += 1
    assert wrapped == len(result.links)  # (text/plain links are off)
    return kinds


def _html_of(message: bytes) -> str:
    text = html_text(message)
    assert text is not None
    return text


@pytest.mark.parametrize("path", eml_paths(), ids=_id)
def test_message(path: Path) -> None:
    check_message(path.read_bytes())


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[1]}-{v[0] or 'no-charset'}")
@pytest.mark.parametrize("path", html_paths(), ids=_id)
def test_template(path: Path, variant: tuple[str | None, str]) -> None:
    charset, cte = variant
    original = html_as_message(path.read_bytes(), charset=charset, cte=cte)  # type: ignore[arg-type]
    check_message(original)


def test_totals() -> None:
    """Whole corpus: many links wrapped, every excluded kind met and left alone."""
    kinds: collections.Counter[str] = collections.Counter()
    for path in eml_paths():
        kinds += check_message(path.read_bytes())
    for path in html_paths():
        for charset, cte in VARIANTS:
            original = html_as_message(path.read_bytes(), charset=charset, cte=cte)  # type: ignore[arg-type]
            kinds += check_message(original)
    # measured: 864 wrapped; 728 not http (mailto:, #, relative...), 81 malformed
    # ("http://" placeholders), 5 unsubscribe/preference links
    assert kinds["wrapped"] >= 800, kinds
    assert kinds["not-http"] >= 500, kinds
    assert kinds["malformed"] >= 50, kinds
    assert kinds["excluded"] >= 3, kinds
