"""A short run of the HTTP header fuzz target (``fuzz/http_headers_target.py``) in the suite.

The long run is ``python -m fuzz.http_headers_target --runs 20000``; here a
bounded number of requests with hostile header bytes go to the pixel and the
reports listeners, each beside a legitimate pixel open, and every one must
hold: never a 500, never a traceback (nothing logged at error level), never a
lost neighbour (the legitimate open is recorded).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings

from fuzz.http_headers_target import KNOWN_TOKENS, HttpCase, Listeners, http_cases


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listeners]:
    with Listeners(tmp_path_factory.mktemp("http-fuzz")) as started:
        yield started


def pixel_get(*headers: bytes) -> HttpCase:
    lines = [b"GET /o/" + KNOWN_TOKENS[1].encode() + b".gif HTTP/1.1", b"Host: localhost"]
    return HttpCase("pixel", b"\r\n".join([*lines, *headers, b"Connection: close", b"", b""]))


def reports_get(path: bytes, *headers: bytes) -> HttpCase:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: localhost"]
    return HttpCase("reports", b"\r\n".join([*lines, *headers, b"Connection: close", b"", b""]))


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=http_cases())
# the probe's inputs (issue 12, items 1 and 4), always tried
@example(case=pixel_get(b"User-Agent: \xff"))
@example(case=reports_get(b"/api/stats", b"Authorization: Bearer \xff\xfe"))
@example(case=reports_get(b"/login", b"Cookie: __Host-smtp-tracker-session=\xff"))
@example(case=reports_get(b"/", b"Cookie: __Host-smtp-tracker-session=\xff"))
@example(case=HttpCase("reports", b"GET /api/stats\r\n\r\n"))
# found by this fuzzer: aiohttp's answer to an unknown Expect was a 500 for these bytes
@example(case=pixel_get(b"Expect: \x80"))
@example(case=reports_get(b"/login", b"Expect: \xff"))
def test_hostile_headers_never_give_a_500_a_traceback_or_a_lost_neighbour(
    listeners: Listeners, case: HttpCase
) -> None:
    listeners.check(case)


def test_the_check_catches_an_error_logged_while_serving(listeners: Listeners) -> None:
    """The harness sees a traceback logged by the server (here: a logger the app uses)."""
    real = logging.Logger.debug

    def loud(self: logging.Logger, msg: object, *args: object, **kwargs: object) -> None:
        if self.name == "smtp_tracker.web.reports.auth":
            self.error(msg, *args, exc_info=ValueError("planted"))
            return
        real(self, msg, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.Logger, "debug", loud)
        with pytest.raises(AssertionError, match="planted"):
            listeners.check(reports_get(b"/api/stats", b"Authorization: Bearer wrong"))


def test_the_target_runs_from_the_command_line(tmp_path: Path) -> None:
    from fuzz import http_headers_target

    assert http_headers_target.main(["--runs", "5", "--seed", "1"]) == 0
