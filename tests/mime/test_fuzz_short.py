"""A short run of the rewrite fuzz target (``fuzz/rewrite_target.py``) in the test suite.

The long run is ``python -m fuzz.rewrite_target --runs 200000`` (``make fuzz``);
here a few hundred mutated messages go through the same invariants: the
rewrite raises nothing, its output parses with the default policy whenever the
input does, the top-level header section stays but for the control header,
and the message is unchanged or gained exactly one pixel.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz import rewrite_target
from fuzz.rewrite_target import FuzzCase, check_rewrite, fuzz_cases, header_section, seeds
from smtp_tracker.mime import RewritePolicy
from tests.mime.messages import FIXTURES, html_message


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fuzz_cases())
def test_rewrite_keeps_its_invariants_on_mutated_messages(case: FuzzCase) -> None:
    check_rewrite(case)


def test_seeds_hold_the_fixtures_and_stay_small() -> None:
    pool = seeds()
    for path in FIXTURES.glob("*.eml"):
        assert path.read_bytes() in pool, path.name
    assert all(0 < len(seed) <= rewrite_target.MAX_SEED_BYTES for seed in pool)


def test_the_check_catches_a_rewrite_that_touches_the_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = html_message("<html><body><p>hi</p></body></html>")
    real = rewrite_target.rewrite

    def meddling(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        return type(result)(
            message=result.message.replace(b"Subject: test", b"Subject: TEST", 1),
            tracked=result.tracked,
            reason=result.reason,
            defects=result.defects,
        )

    monkeypatch.setattr(rewrite_target, "rewrite", meddling)
    with pytest.raises(AssertionError):
        check_rewrite(FuzzCase(message, RewritePolicy(), "sender@example.org"))


def test_header_section_ends_where_the_email_package_ends_it() -> None:
    assert header_section(b"A: 1\r\n b\r\nC: 2\r\n\r\nbody\r\n") == b"A: 1\r\n b\r\nC: 2\r\n"
    assert header_section(b"A: 1\nnot a field\nB: 2\n\n") == b"A: 1\n"
    assert header_section(b"no header at all") == b""


def test_the_command_line_runs_and_reproduces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crashes = tmp_path / "crashes"
    assert rewrite_target.main(["--runs", "20", "--seed", "1", "--crash-dir", str(crashes)]) == 0
    assert "no invariant broken" in capsys.readouterr().out
    saved = tmp_path / "message.eml"
    saved.write_bytes(html_message("<html><body>x</body></html>", cte="quoted-printable"))
    assert rewrite_target.main(["--reproduce", str(saved)]) == 0
    assert "ok   tracked=True" in capsys.readouterr().out
