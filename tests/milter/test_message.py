"""The milter's message model, the actions it derives from the rewrite's output, and its
address forms (no sockets)."""

from __future__ import annotations

import pytest

from smtp_tracker.errors import ConfigError
from smtp_tracker.milter.listener import parse_milter_listen
from smtp_tracker.milter.message import HeaderChange, MilterMessage, edits_for, split_fields
from smtp_tracker.mime import RewritePolicy, rewrite
from smtp_tracker.mime.disclosure import Disclosure

URL = "https://track.example/o/AAAAAAAAAAAAAAAAAAAAAA.gif"


def collected(fields: list[tuple[bytes, bytes]], body: bytes) -> MilterMessage:
    message = MilterMessage(sender="a@example.org", recipients=["b@example.net"])
    for name, value in fields:
        message.add_field(name, value, max_bytes=10_000_000)
    message.add_body(body, max_bytes=10_000_000)
    return message


HTML_FIELDS = [
    (b"From", b" a@example.org"),
    (b"X-Track", b" yes"),
    (b"Subject", b" folded\n\tsubject"),  # the MTA's LF continuation
    (b"Content-Type", b" text/html; charset=utf-8"),
    (b"X-Track", b" yes"),
]


def test_octets_rebuild_the_fields_as_written_with_crlf() -> None:
    message = collected(HTML_FIELDS, b"<html><body>x</body></html>\r\n")
    assert message.octets() == (
        b"From: a@example.org\r\nX-Track: yes\r\nSubject: folded\r\n\tsubject\r\n"
        b"Content-Type: text/html; charset=utf-8\r\nX-Track: yes\r\n\r\n"
        b"<html><body>x</body></html>\r\n"
    )


def test_tracked_message_removes_both_control_fields_adds_disclosure_and_replaces_body() -> None:
    message = collected(HTML_FIELDS, b"<html><body>x</body></html>\r\n")
    result = rewrite(message.octets(), URL, RewritePolicy(), reverse_path=message.sender)
    assert result.tracked
    rewritten = Disclosure(header_value="tracked").add_header(result.message)
    edits = edits_for(message, rewritten)
    # the second X-Track first, so that index 1 still names the first one
    assert edits.removals == (HeaderChange("X-Track", 2, None), HeaderChange("X-Track", 1, None))
    assert edits.insertions == (HeaderChange("X-Tracking-Notice", 0, " tracked"),)
    assert edits.body == rewritten.split(b"\r\n\r\n", 1)[1]
    assert edits.body.count(URL.encode()) == 1


def test_untracked_message_only_loses_its_control_field_and_keeps_its_body() -> None:
    fields = [(b"From", b" a@example.org"), (b"X-Track", b" no"), (b"Content-Type", b" text/html")]
    message = collected(fields, b"<html><body>x</body></html>\r\n")
    result = rewrite(message.octets(), URL, RewritePolicy(), reverse_path=message.sender)
    assert (result.tracked, result.reason) == (False, "opt-out")
    edits = edits_for(message, result.message)
    assert edits.removals == (HeaderChange("X-Track", 1, None),)
    assert edits.insertions == ()
    assert edits.body is None


def test_over_the_limit_drops_what_was_collected() -> None:
    message = MilterMessage()
    message.add_field(b"Subject", b" hello", max_bytes=100)
    message.add_body(b"x" * 90, max_bytes=100)
    assert message.oversized
    assert (message.fields, bytes(message.body)) == ([], b"")
    assert message.size_bytes == len(b"Subject: hello\r\n") + 90


def test_split_fields_refuses_a_line_without_a_colon() -> None:
    with pytest.raises(ValueError, match="colon"):
        split_fields(b"From: a\r\nnot a field\r\n")


@pytest.mark.parametrize(
    ("text", "spec", "shown"),
    [
        ("127.0.0.1:8892", "inet:8892@127.0.0.1", "127.0.0.1:8892"),
        ("inet:127.0.0.1:8892", "inet:8892@127.0.0.1", "127.0.0.1:8892"),
        ("[::1]:8892", "inet6:8892@::1", "[::1]:8892"),
        ("unix:/run/smtp-tracker/milter.sock", "unix:/run/smtp-tracker/milter.sock", None),
    ],
)
def test_milter_listen_forms(text: str, spec: str, shown: str | None) -> None:
    address = parse_milter_listen(text)
    assert address.libmilter_spec == spec
    assert str(address) == (shown or text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("unix:relative.sock", "expected unix:/absolute/path"),
        ("127.0.0.1:0", "port 0 is not allowed"),
        ("localhost", "expected HOST:PORT"),
    ],
)
def test_milter_listen_refused(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_milter_listen(text)
