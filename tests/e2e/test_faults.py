"""The fault matrix: a real Postfix → smtp-tracker → the upstream test server, scripted to fail.

For every way the upstream can fail we check what Postfix, the sender's MTA,
ends up doing, since that is what decides whether mail is lost:

* a temporary fault (refused, too slow for our timeouts, 421 or 554 greeting,
  454 to STARTTLS, 4xx to MAIL/RCPT/DATA, a connection dropped during or right
  after the payload) must leave the message deferred in Postfix's queue with
  an RFC 3463 enhanced status code in the reason; once the fault is gone and
  the queue is flushed, the message reaches the upstream byte for byte, and
  nothing is left behind;
* a permanent refusal (5xx to MAIL, RCPT, the DATA command or the payload)
  must make Postfix bounce with the upstream's own reply text.

Every fault here ends with exactly one copy upstream. Two of them are where a
real upstream could deliver a second: ``slow-eom`` and ``drop-after-data``
leave the upstream holding the whole payload without our having its verdict;
an MTA that committed the message anyway delivers it, and Postfix's retry
delivers it again (at-least-once, RFC 5321 §6.1 accepts this). The test
server, like an MTA that discards a transaction whose client left before its
reply, does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.postfix import Postfix, without_bounces
from tests.support.upstream import UpstreamOptions, UpstreamServer
from tests.support.waiting import wait_until

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
#: What sendmail is given; Postfix adds no header to it but its Received: line.
MESSAGE = (
    b"From: Alice <alice@example.org>\n"
    b"To: Bob <bob@example.net>\n"
    b"Subject: fault matrix\n"
    b"Date: Mon, 06 Jan 2025 10:00:00 +0000\n"
    b"Message-ID: <fault-matrix@example.org>\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"\n"
    b"Hello Bob,\n"
    b".a line starting with a dot\n"
    b"\n" + b"a long line, still under the 998 octets of RFC 5322 2.1.1 " * 16 + b"\n-- \nAlice\n"
)
#: ... and what must arrive after the trace headers: the same, with CRLF line ends.
EXPECTED_TAIL = MESSAGE.replace(b"\n", b"\r\n")

#: Timeouts of the relay in the tests whose upstream is slow on purpose.
SHORT_TIMEOUT_S = 1.5
#: How long the slow upstream waits before answering (well past SHORT_TIMEOUT_S).
SLOW_S = 4.0


@dataclass(frozen=True)
class Fault:
    """A way for the upstream to fail and what smtp-tracker must make of it.

    :ivar options: ``@pytest.mark.upstream`` keywords that cause the fault.
    :ivar expected: the start of the reply Postfix must have heard from us.
    :ivar relay: configuration keys of the relay for this case (short timeouts).
    """

    options: dict[str, Any]
    expected: str
    relay: dict[str, Any] = field(default_factory=dict)


TEMPORARY = {
    "refused": Fault({"refuse": True}, "451 4.4.1 "),
    "slow-greeting": Fault(
        {"delay_s": {"CONNECT": SLOW_S}},
        "451 4.4.2 upstream timed out",
        relay={"upstream_connect_timeout_s": SHORT_TIMEOUT_S},
    ),
    "slow-mail": Fault(
        {"delay_s": {"MAIL": SLOW_S}},
        "451 4.4.2 upstream timed out",
        relay={"upstream_command_timeout_s": SHORT_TIMEOUT_S},
    ),
    "slow-eom": Fault(
        {"delay_s": {"EOM": SLOW_S}},
        "451 4.4.2 upstream timed out",
        relay={"upstream_data_timeout_s": SHORT_TIMEOUT_S},
    ),
    "421-greeting": Fault({"greeting": "421 4.3.2 upstream busy"}, "451 4.3.2 upstream busy"),
    "554-greeting": Fault({"greeting": "554 5.3.2 no service here"}, "451 4.3.2 no service here"),
    "454-starttls": Fault(
        {"starttls_reply": "454 4.7.0 TLS not available now"}, "454 4.7.0 TLS not available now"
    ),
    "mail-4xx": Fault(
        {"mail_reply": "451 4.3.0 sender check unavailable"}, "451 4.3.0 sender check unavailable"
    ),
    "rcpt-4xx": Fault(
        {"rcpt_replies": {RECIPIENT: "450 4.2.1 mailbox busy"}}, "450 4.2.1 mailbox busy"
    ),
    "data-command-4xx": Fault({"data_command_reply": "451 4.3.0 not now"}, "451 4.3.0 not now"),
    "data-4xx": Fault(
        {"data_reply": "452 4.3.1 insufficient system storage"},
        "452 4.3.1 insufficient system storage",
    ),
    "drop-during-data": Fault({"drop_during_data": True}, "451 4.4.2 connection to upstream lost"),
    "drop-after-data": Fault({"drop_after_data": True}, "451 4.4.2 connection to upstream lost"),
}

PERMANENT = {
    "mail-5xx": Fault(
        {"mail_reply": "550 5.7.1 sender not allowed"}, "550 5.7.1 sender not allowed"
    ),
    "rcpt-5xx": Fault(
        {"rcpt_replies": {RECIPIENT: "550 5.1.1 no such user"}}, "550 5.1.1 no such user"
    ),
    "data-command-5xx": Fault(
        {"data_command_reply": "554 5.5.0 no DATA for you"}, "554 5.5.0 no DATA for you"
    ),
    "data-5xx": Fault(
        {"data_reply": "554 5.6.0 message content rejected"}, "554 5.6.0 message content rejected"
    ),
}

DEFAULTS = UpstreamOptions()


def cases(faults: dict[str, Fault]) -> list[Any]:
    return [
        pytest.param(fault, id=name, marks=pytest.mark.upstream(**fault.options))
        for name, fault in faults.items()
    ]


async def start(relay_factory: Any, postfix_factory: Any, fault: Fault) -> Postfix:
    relay = await relay_factory(**fault.relay)
    postfix: Postfix = await postfix_factory(relay.smtp_address[1])
    await postfix.send(SENDER, [RECIPIENT], MESSAGE)
    return postfix


async def clear(upstream: UpstreamServer, fault: Fault) -> None:
    """Take the fault away: options back to their defaults, the server listening."""
    upstream.configure(**{name: getattr(DEFAULTS, name) for name in fault.options})
    await upstream.start()


@pytest.mark.parametrize("fault", cases(TEMPORARY))
async def test_temporary_fault_postfix_defers_then_delivers_the_message_unchanged(
    fault: Fault, relay_factory: Any, upstream: UpstreamServer, postfix_factory: Any
) -> None:
    postfix = await start(relay_factory, postfix_factory, fault)

    deferred = await postfix.wait_for_log(
        rf"to=<{re.escape(RECIPIENT)}>.*status=deferred \((.*)\)", timeout_s=30
    )
    assert f"said: {fault.expected}" in deferred.group(1), deferred.group(1)
    assert without_bounces(upstream.transactions) == []
    if "starttls_reply" in fault.options:  # never a fallback to plaintext
        assert not any(
            c.upper().startswith(("MAIL", "RCPT", "DATA", "AUTH")) for c in upstream.commands
        )
    # still Postfix's: in its deferred queue, our reply as the reason
    reasons = await wait_until(
        postfix.deferred_reasons, timeout_s=30, message="the message never reached 'deferred'"
    )
    assert len(reasons) == 1 and fault.expected in reasons[0], reasons

    await clear(upstream, fault)
    await postfix.flush()
    await postfix.wait_for_log(rf"to=<{re.escape(RECIPIENT)}>.*status=sent", timeout_s=30)
    await upstream.wait_for_transactions(1, timeout_s=30)
    await postfix.wait_until_queue_empty(timeout_s=30)

    (delivered,) = without_bounces(upstream.transactions)
    assert delivered.tls and delivered.auth_user == upstream.user
    assert delivered.mail_from == SENDER and delivered.rcpt_tos == [RECIPIENT]
    assert delivered.data.endswith(EXPECTED_TAIL)
    trace = delivered.data[: -len(EXPECTED_TAIL)]
    assert trace.count(b"Received: ") == 2, trace  # Postfix's and ours, nothing else


@pytest.mark.parametrize("fault", cases(PERMANENT))
async def test_permanent_refusal_postfix_bounces_with_the_upstreams_own_text(
    fault: Fault, relay_factory: Any, upstream: UpstreamServer, postfix_factory: Any
) -> None:
    postfix = await start(relay_factory, postfix_factory, fault)

    bounced = await postfix.wait_for_log(
        rf"to=<{re.escape(RECIPIENT)}>.*status=bounced \((.*)\)", timeout_s=30
    )
    assert f"said: {fault.expected}" in bounced.group(1), bounced.group(1)
    assert without_bounces(upstream.transactions) == []

    async def original_gone() -> bool:  # not kept for a retry (the notice to alice may be)
        return not [m for m in await postfix.queue() if m["sender"] == SENDER]

    await wait_until(original_gone, timeout_s=30, message="the bounced message is still queued")
