"""A real Postfix in front: Postfix → smtp-tracker → the STARTTLS/AUTH upstream.

Postfix routes everything to smtp-tracker with ``transport_maps`` exactly as an
admin would; what Postfix logs and keeps in its queue is the proof that
smtp-tracker's replies make it do the right thing (deliver, defer, bounce).
"""

from __future__ import annotations

import asyncio
import email
import shutil
from typing import Any

import pytest

from tests.support.postfix import without_bounces

MESSAGE = (
    b"From: Alice <alice@example.org>\n"
    b"To: Bob <bob@example.net>\n"
    b"Subject: through Postfix\n"
    b"Message-ID: <postfix-e2e-1@example.org>\n"
    b"\n"
    b"Hello Bob,\n"
    b".a line starting with a dot\n"
    b"\n"
    b"-- \nAlice\n"
)
BODY = b"Hello Bob,\r\n.a line starting with a dot\r\n\r\n-- \r\nAlice\r\n"


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


async def test_message_given_to_postfix_arrives_upstream_with_the_same_body(
    relay: Any, upstream: Any, postfix_factory: Any
) -> None:
    postfix = await postfix_factory(relay.smtp_address[1])
    await postfix.send("alice@example.org", ["bob@example.net"], MESSAGE)
    await upstream.wait_for_transactions(1, timeout_s=30)
    (delivered,) = upstream.transactions
    assert delivered.tls and delivered.auth_user == upstream.user
    assert delivered.mail_from == "alice@example.org"
    assert delivered.rcpt_tos == ["bob@example.net"]
    assert body_of(delivered.data) == BODY
    parsed = email.message_from_bytes(delivered.data)
    assert parsed["Message-ID"] == "<postfix-e2e-1@example.org>"
    # Postfix saw the upstream's own reply as the verdict
    match = await postfix.wait_for_log(r"to=<bob@example\.net>.*status=sent \((250 2\.0\.0 .*)\)")
    assert "queued as" in match.group(1)
    await postfix.wait_until_queue_empty(timeout_s=20)


async def test_upstream_down_postfix_defers_then_delivers_exactly_once(
    relay: Any, upstream: Any, postfix_factory: Any
) -> None:
    await upstream.stop()
    postfix = await postfix_factory(relay.smtp_address[1])
    await postfix.send("alice@example.org", ["bob@example.net"], MESSAGE)
    deferred = await postfix.wait_for_log(r"to=<bob@example\.net>.*status=deferred \((.*)\)")
    assert "said: 451 4.4.1 " in deferred.group(1), deferred.group(1)
    assert (await postfix.queue())[0]["recipients"][0]["address"] == "bob@example.net"

    await upstream.start()
    # the message may be in the active queue for a moment before it is deferred
    await postfix.wait_for_log(r"status=deferred", timeout_s=30)
    await postfix.flush()
    await upstream.wait_for_transactions(1, timeout_s=30)
    await postfix.wait_until_queue_empty(timeout_s=30)
    assert len(upstream.transactions) == 1
    assert body_of(upstream.transactions[0].data) == BODY


@pytest.mark.upstream(rcpt_replies={"nobody@example.net": "550 5.1.1 no such user here"})
async def test_one_of_two_recipients_refused_postfix_bounces_it_delivers_the_other(
    relay: Any, upstream: Any, postfix_factory: Any
) -> None:
    postfix = await postfix_factory(relay.smtp_address[1])
    await postfix.send("alice@example.org", ["nobody@example.net", "bob@example.net"], MESSAGE)
    bounced = await postfix.wait_for_log(r"to=<nobody@example\.net>.*status=bounced \((.*)\)")
    assert "550 5.1.1 no such user here" in bounced.group(1)
    await postfix.wait_for_log(r"to=<bob@example\.net>.*status=sent")
    await upstream.wait_for_transactions(1, timeout_s=30)
    # the bounce notice to alice goes out through the relay too; leave it aside
    (delivered,) = without_bounces(upstream.transactions)
    assert delivered.rcpt_tos == ["bob@example.net"]


@pytest.mark.parametrize(
    "expected",
    [
        pytest.param("451 4.7.4 ", marks=pytest.mark.upstream(starttls=False), id="no-starttls"),
        pytest.param("451 4.7.5 ", marks=pytest.mark.upstream(cert="untrusted"), id="bad-cert"),
        pytest.param("451 4.7.8 ", marks=pytest.mark.upstream(auth_ok=False), id="auth-refused"),
        pytest.param(
            "451 4.4.2 ", marks=pytest.mark.upstream(drop_during_data=True), id="drop-during-data"
        ),
    ],
)
async def test_upstream_failures_make_postfix_defer_and_nothing_goes_in_plaintext(
    expected: str, relay: Any, upstream: Any, postfix_factory: Any
) -> None:
    postfix = await postfix_factory(relay.smtp_address[1])
    await postfix.send("alice@example.org", ["bob@example.net"], MESSAGE * 200)
    deferred = await postfix.wait_for_log(r"to=<bob@example\.net>.*status=deferred \((.*)\)")
    assert f"said: {expected}" in deferred.group(1), deferred.group(1)
    assert upstream.transactions == []
    if expected.startswith("451 4.7"):
        assert not any(
            line.upper().startswith(("MAIL", "AUTH PLAIN", "DATA")) for line in upstream.transcript
        )


async def test_dsn_and_smtputf8_parameters_from_postfix_reach_the_upstream(
    relay: Any, upstream: Any, postfix_factory: Any
) -> None:
    postfix = await postfix_factory(relay.smtp_address[1], smtputf8_autodetect_classes="sendmail")
    await postfix.send(
        "jörg@example.org",
        ["bob@example.net"],
        "Subject: grüße\n\nünïcödé body\n".encode(),
        dsn_notify="success,failure",
        ret="hdrs",
        envid="env-42+x",
    )
    await upstream.wait_for_transactions(1, timeout_s=30)
    (delivered,) = upstream.transactions
    assert delivered.mail_from == "jörg@example.org"
    options = {option.partition("=")[0]: option for option in delivered.mail_options}
    assert options["RET"] == "RET=HDRS"
    assert options["ENVID"] == "ENVID=env-42+2Bx"
    assert "SMTPUTF8" in options
    (rcpt_options,) = delivered.rcpt_options
    assert "NOTIFY=SUCCESS,FAILURE" in rcpt_options
    assert "ünïcödé body".encode() in delivered.data


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_to_postfix_reaches_the_upstream(
    relay: Any, upstream: Any, postfix_factory: Any
) -> None:
    postfix = await postfix_factory(relay.smtp_address[1])
    process = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        postfix.smtpd_address,
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        "--body",
        "sent with swaks",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, out.decode()
    await upstream.wait_for_transactions(1, timeout_s=30)
    assert b"sent with swaks" in upstream.transactions[0].data
