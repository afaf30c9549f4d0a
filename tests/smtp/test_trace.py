"""The Received: trace header (RFC 5321 §4.4)."""

import email

from smtp_tracker.smtp.received import received_header


def _header(**overrides: object) -> bytes:
    arguments: dict[str, object] = dict(
        helo="client.example",
        client_ip="192.0.2.7",
        hostname="relay.example",
        queue_id="0123456789AB",
        esmtp=True,
        tls=False,
        smtputf8=False,
        recipients=["rcpt@example.net"],
        at=1_700_000_000.0,
    )
    arguments.update(overrides)
    return received_header(**arguments)  # type: ignore[arg-type]


def test_single_recipient_is_named_and_the_field_parses() -> None:
    field = _header()
    message = email.message_from_bytes(field + b"\r\nbody\r\n")
    value = " ".join(message["Received"].split())
    assert value == (
        "from client.example ([192.0.2.7]) by relay.example (smtp-tracker) with ESMTP "
        "id 0123456789AB for <rcpt@example.net>; Tue, 14 Nov 2023 22:13:20 +0000"
    )
    assert field.endswith(b"\r\n") and b"\n\t" in field


def test_several_recipients_are_not_revealed() -> None:
    field = _header(recipients=["a@example.net", "b@example.net"])
    assert b"a@example.net" not in field and b"for <" not in field


def test_protocol_names_follow_rfc_3848() -> None:
    assert b"with ESMTPS id" in _header(tls=True)
    assert b"with UTF8ESMTPS id" in _header(tls=True, smtputf8=True)
    assert b"with SMTP id" in _header(esmtp=False)
    assert b"[IPv6:2001:db8::1]" in _header(client_ip="2001:db8::1")


def test_hostile_helo_cannot_inject_header_lines() -> None:
    field = _header(helo="evil\r\nX-Injected: yes")
    assert b"X-Injected: yes\r\n" not in field
    assert field.count(b"\r\n") == 3
