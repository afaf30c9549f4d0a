"""ESMTP parameters of MAIL FROM and RCPT TO: checked, kept exactly as the client wrote them.

We advertise SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and
DSN (RFC 3461), so those are the parameters we accept.  Keywords are
case-insensitive; values are passed upstream byte for byte (an ENVID or an
ORCPT is the client's, not ours to re-case).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smtp_tracker.errors import CommandRejected
from smtp_tracker.smtp import replies

__all__ = ["MailParameters", "parse_mail_parameters", "parse_rcpt_parameters", "sendable"]

#: C0 controls (TAB included) and DEL: allowed nowhere in a path or a parameter
#: (RFC 5321 §4.1.2: not even in a quoted local part, whose qtextSMTP and
#: quoted-pairSMTP are %d32-126), and refused by aiosmtplib in any command
#: argument (its guard against command injection), so never sent upstream.
_UNSENDABLE = re.compile(rb"[\x00-\x1f\x7f]")

#: RFC 3461 §4: xtext = *( xchar / hexchar ), printable US-ASCII except "+" and "=".
_XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})+$")
#: RFC 3461 §4.2: ORCPT=addr-type ";" xtext.
_ORCPT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*;.+$")
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_NOTIFY_VALUES = {"SUCCESS", "FAILURE", "DELAY"}


@dataclass(frozen=True, slots=True)
class MailParameters:
    """MAIL FROM parameters as sent, with what we need to know of them.

    :ivar raw: each ``KEYWORD[=value]`` as the client wrote it, in order.
    :ivar size: the declared message size in bytes (RFC 1870 §4), or None.
    :ivar smtputf8: whether SMTPUTF8 was requested (RFC 6531 §3.4).
    """

    raw: tuple[str, ...]
    size: int | None
    smtputf8: bool
    eight_bit: bool


def sendable(argument: str | bytes) -> bool:
    """Whether a command argument can be sent upstream as it is (no C0 control, no DEL).

    :param argument: a path or parameter; text is taken as UTF-8 with the
        client's undecodable bytes kept (``surrogateescape``, aiosmtpd's decoding).
    """
    if isinstance(argument, str):
        argument = argument.encode("utf-8", "surrogateescape")
    return _UNSENDABLE.search(argument) is None


def _split(text: str) -> list[tuple[str, str | None, str]]:
    items = []
    for word in text.split():
        keyword, eq, value = word.partition("=")
        if not _KEYWORD.match(keyword) or (eq and not value):
            raise CommandRejected(replies.R501_PARAMETER_SYNTAX)
        items.append((keyword.upper(), value if eq else None, word))
    return items


def parse_mail_parameters(text: str, *, max_message_bytes: int) -> MailParameters:
    """Check the parameters after ``MAIL FROM:<path>``.

    :param text: everything after the reverse-path, space-separated.
    :param max_message_bytes: our SIZE limit, in bytes.
    :raises CommandRejected: 501 on bad syntax, 552 5.3.4 when SIZE exceeds our
        limit (RFC 1870 §6.1), 555 5.5.4 for a parameter we do not know.
    """
    seen: set[str] = set()
    size: int | None = None
    smtputf8 = False
    eight_bit = False
    raw = []
    for keyword, value, word in _split(text):
        if keyword in seen:
            raise CommandRejected(replies.R501_DUPLICATE_PARAMETER.format(keyword=keyword))
        seen.add(keyword)
        if keyword == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise CommandRejected(replies.R501_BAD_SIZE)
            size = int(value)
            if size > max_message_bytes:
                raise CommandRejected(replies.R552_MESSAGE_TOO_BIG)
        elif keyword == "BODY":
            if value is None or value.upper() not in {"7BIT", "8BITMIME"}:
                raise CommandRejected(replies.R501_BAD_BODY)
            eight_bit = value.upper() == "8BITMIME"
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise CommandRejected(replies.R501_SMTPUTF8_VALUE)
            smtputf8 = True
        elif keyword == "RET":
            if value is None or value.upper() not in {"FULL", "HDRS"}:
                raise CommandRejected(replies.R501_BAD_RET)
        elif keyword == "ENVID":
            if value is None or len(value) > 100 or not _XTEXT.match(value):
                raise CommandRejected(replies.R501_BAD_ENVID)
        else:
            raise CommandRejected(replies.R555_MAIL_PARAMETER_UNKNOWN)
        raw.append(word)
    return MailParameters(tuple(raw), size, smtputf8, eight_bit)


def parse_rcpt_parameters(text: str) -> tuple[str, ...]:
    """Check the parameters after ``RCPT TO:<path>``: NOTIFY and ORCPT (RFC 3461 §4.1, §4.2).

    :returns: each ``KEYWORD=value`` as the client wrote it.
    :raises CommandRejected: 501 on bad syntax, 555 for an unknown parameter.
    """
    seen: set[str] = set()
    raw = []
    for keyword, value, word in _split(text):
        if keyword in seen:
            raise CommandRejected(replies.R501_DUPLICATE_PARAMETER.format(keyword=keyword))
        seen.add(keyword)
        if keyword == "NOTIFY":
            values = {v.upper() for v in (value or "").split(",")}
            if not (values == {"NEVER"} or (values and values <= _NOTIFY_VALUES)):
                raise CommandRejected(replies.R501_BAD_NOTIFY)
        elif keyword == "ORCPT":
            if value is None or len(value) > 500 or not _ORCPT.match(value):
                raise CommandRejected(replies.R501_BAD_ORCPT)
        else:
            raise CommandRejected(replies.R555_RCPT_PARAMETER_UNKNOWN)
        raw.append(word)
    return tuple(raw)
