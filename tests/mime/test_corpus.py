"""The rewrite over every message and template of the shared corpus ($SMTP_TRACKER_CORPUS)."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

from smtp_tracker.mime import rewrite
from tests.corpus import corpus_root, eml_paths, html_as_message, html_paths, skip_reason
from tests.mime.invariants import check

pytestmark = [
    pytest.mark.corpus,
    pytest.mark.skipif(corpus_root() is None, reason=skip_reason()),
]

URL = "https://track.example.test/o/AAAAAAAAAAAAAAAAAAAAAA.gif?m=1&r=2"
#: (charset parameter, Content-Transfer-Encoding) each template is wrapped in.
VARIANTS = [("utf-8", "quoted-printable"), ("utf-8", "base64"), (None, "8bit")]
#: Messages of the corpus whose HTML body is left alone on purpose (rewrite-failed:
#: the original octets), with why.
FAIL_OPEN: frozenset[str] = frozenset()  # parts_extra-base64-character.eml is tracked now


def _id(path: Path) -> str:
    root = corpus_root()
    return str(path.relative_to(root)) if root else path.name


@pytest.mark.parametrize("path", eml_paths(), ids=_id)
def test_message(path: Path) -> None:
    original = path.read_bytes()
    result = rewrite(original, URL)
    check(original, result, URL)
    if result.reason == "rewrite-failed":
        assert _id(path) in FAIL_OPEN, result.defects


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[1]}-{v[0] or 'no-charset'}")
@pytest.mark.parametrize("path", html_paths(), ids=_id)
def test_template(path: Path, variant: tuple[str | None, str]) -> None:
    charset, cte = variant
    original = html_as_message(path.read_bytes(), charset=charset, cte=cte)  # type: ignore[arg-type]
    result = rewrite(original, URL)
    check(original, result, URL)
    assert result.tracked, (result.reason, result.defects)


def test_totals() -> None:
    """Whole corpus in one pass: enough messages tracked, reasons as expected, in time."""
    reasons: collections.Counter[str] = collections.Counter()
    started = time.process_time()  # CPU seconds: not stretched by a busy machine
    for path in eml_paths():
        result = rewrite(path.read_bytes(), URL)
        reasons[result.reason or "tracked"] += 1
    for path in html_paths():
        for charset, cte in VARIANTS:
            message = html_as_message(path.read_bytes(), charset=charset, cte=cte)  # type: ignore[arg-type]
            reasons[rewrite(message, URL).reason or "tracked"] += 1
    elapsed = time.process_time() - started
    templates = 3 * len(html_paths())
    assert reasons["tracked"] >= templates + 100, reasons
    assert reasons["dkim-signed"] >= 30, reasons
    assert reasons["report"] >= 10, reasons
    assert reasons["multipart-signed"] >= 5, reasons
    assert reasons["auto-submitted"] >= 5, reasons
    assert reasons["rewrite-failed"] <= len(FAIL_OPEN), reasons
    assert elapsed < 60, f"whole corpus took {elapsed:.1f} CPU s"
