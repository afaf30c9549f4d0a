"""``smtp-tracker inject``: the rewrite as a content filter, stdin → stdout, decision on stderr."""

import subprocess
import sys
from pathlib import Path

PIXEL = "https://track.example.test/o/AAAAAAAAAAAAAAAAAAAAAA.gif"

HTML_MESSAGE = (
    b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\nX-Track: yes\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><body><p>Hello &amp; welcome</p></body></html>\r\n"
)
PLAIN_MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nplain\r\n"


def inject(data: bytes, *args: str, pixel_url: str = PIXEL) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "smtp_tracker", "inject", "--pixel-url", pixel_url, *args],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_html_message_gets_one_pixel_and_nothing_else_changes() -> None:
    result = inject(HTML_MESSAGE)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"smtp-tracker: tracked\n"
    out = result.stdout
    assert out.count(PIXEL.encode()) == 1
    # the control header is gone; everything before the body is otherwise as it was
    assert b"X-Track" not in out
    assert out.startswith(HTML_MESSAGE.replace(b"X-Track: yes\r\n", b"").split(b"<p>")[0])
    assert b"<p>Hello &amp; welcome</p>" in out
    assert out.index(PIXEL.encode()) < out.index(b"</body>")


def test_untouchable_message_comes_out_byte_identical_exit_0() -> None:
    result = inject(PLAIN_MESSAGE)
    assert result.returncode == 0
    assert result.stdout == PLAIN_MESSAGE
    assert result.stderr == b"smtp-tracker: not tracked (no-html-body)\n"


def test_bounce_is_not_tracked() -> None:
    result = inject(HTML_MESSAGE, "--reverse-path", "<>")
    assert result.returncode == 0
    assert PIXEL.encode() not in result.stdout
    assert result.stderr == b"smtp-tracker: not tracked (null-reverse-path)\n"


def test_input_file_option(tmp_path: Path) -> None:
    path = tmp_path / "in.eml"
    path.write_bytes(HTML_MESSAGE)
    result = inject(b"", "--input", str(path))
    assert result.returncode == 0 and result.stdout.count(PIXEL.encode()) == 1


def test_empty_or_unreadable_input_is_one_line_and_exit_1(tmp_path: Path) -> None:
    empty = inject(b"")
    assert empty.returncode == 1
    assert (
        empty.stderr == b"smtp-tracker: error: no message on standard input: pipe an .eml file in\n"
    )
    missing = inject(b"", "--input", str(tmp_path / "nope.eml"))
    assert missing.returncode == 1
    assert missing.stderr.startswith(b"smtp-tracker: error: cannot read ")
    assert missing.stderr.count(b"\n") == 1


def test_bad_pixel_url_is_a_usage_error() -> None:
    result = inject(HTML_MESSAGE, pixel_url="javascript:alert(1)")
    assert result.returncode == 2
    assert b"expected an https:// URL" in result.stderr
