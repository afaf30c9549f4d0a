"""The ``Received:`` trace header we prepend to each relayed message (RFC 5321 §4.4).

Written as Postfix writes its own, so the path reads the same::

    Received: from client.example ([127.0.0.1])
    \tby relay.example (smtp-tracker) with ESMTPS id 4F2A9C01B3
    \tfor <rcpt@example.net>; Sat, 21 Nov 2026 10:00:00 +0000

``with`` is ESMTP, ESMTPS (TLS), SMTP (HELO), or UTF8ESMTP(S) for SMTPUTF8
(RFC 3848, RFC 6531 §3.7.3).  ``for`` names the recipient only when there is
one, so a message to many does not reveal the others (RFC 5321 §7.2).  No
DNS lookup is made: the client is named by its HELO and address.
"""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime

__all__ = ["received_header"]

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def received_header(
    *,
    helo: str | None,
    client_ip: str,
    hostname: str,
    queue_id: str,
    esmtp: bool,
    tls: bool,
    smtputf8: bool,
    recipients: list[str],
    at: float,
) -> bytes:
    """Build the header field, CRLF-terminated, folded with tabs.

    :param helo: the client's HELO/EHLO argument (sanitised), or None.
    :param at: the time the message was received, seconds since the epoch.
    :returns: ASCII bytes (UTF-8 only when ``smtputf8`` and an address needs it).
    """
    helo_text = _UNSAFE.sub("?", helo or "unknown")[:255]
    protocol = "SMTP"
    if esmtp:
        protocol = ("UTF8ESMTP" if smtputf8 else "ESMTP") + ("S" if tls else "")
    address = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    lines = [
        f"Received: from {helo_text} ([{address}])",
        f"\tby {hostname} (smtp-tracker) with {protocol} id {queue_id}",
    ]
    stamp = email.utils.format_datetime(datetime.fromtimestamp(at, UTC))
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {stamp}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{stamp}")
    text = "\r\n".join(lines) + "\r\n"
    if smtputf8:
        return text.encode("utf-8", "surrogateescape")
    return text.encode("ascii", "replace")
