"""ESMTP parameters are checked and kept exactly as the client wrote them."""

import pytest

from smtp_tracker.errors import CommandRejected
from smtp_tracker.smtp.parameters import parse_mail_parameters, parse_rcpt_parameters


def test_dsn_and_smtputf8_parameters_keep_their_case() -> None:
    parsed = parse_mail_parameters(
        "SIZE=1000 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ314159+2Bxyz",
        max_message_bytes=10_000,
    )
    assert parsed.raw == (
        "SIZE=1000",
        "BODY=8BITMIME",
        "SMTPUTF8",
        "RET=HDRS",
        "ENVID=QQ314159+2Bxyz",
    )
    assert parsed.size == 1000 and parsed.smtputf8 and parsed.eight_bit
    assert parse_rcpt_parameters("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob@Example.COM") == (
        "NOTIFY=SUCCESS,FAILURE",
        "ORCPT=rfc822;Bob@Example.COM",
    )


def test_size_over_the_limit_is_552_5_3_4() -> None:
    with pytest.raises(CommandRejected) as caught:
        parse_mail_parameters("SIZE=10001", max_message_bytes=10_000)
    assert str(caught.value.reply).startswith("552 5.3.4 ")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("AUTH=<>", "555 5.5.4"),
        ("MT-PRIORITY=3", "555 5.5.4"),
        ("BODY=BINARYMIME", "501 5.5.4"),
        ("RET=ALL", "501 5.5.4"),
        ("SIZE=abc", "501 5.5.4"),
        ("SIZE=1 SIZE=2", "501 5.5.4"),
        ("ENVID=has=equals", "501 5.5.4"),
        ("SMTPUTF8=yes", "501 5.5.4"),
        ("=x", "501 5.5.4"),
    ],
)
def test_bad_mail_parameters_are_refused(text: str, code: str) -> None:
    with pytest.raises(CommandRejected) as caught:
        parse_mail_parameters(text, max_message_bytes=10_000)
    assert str(caught.value.reply).startswith(code + " ")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
        ("NOTIFY=SOMETIMES", "501 5.5.4"),
        ("ORCPT=no-semicolon", "501 5.5.4"),
        ("XFORWARD=1", "555 5.5.4"),
    ],
)
def test_bad_rcpt_parameters_are_refused(text: str, code: str) -> None:
    with pytest.raises(CommandRejected) as caught:
        parse_rcpt_parameters(text)
    assert str(caught.value.reply).startswith(code + " ")
