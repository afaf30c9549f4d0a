"""The milter killed (SIGKILL) while Postfix sends it mail: what ``milter_default_action`` promises.

``accept``: Postfix carries on without the milter; no message is lost or held.
``tempfail``: smtpd answers 4xx (the client keeps the message), and mail
injected with sendmail (``non_smtpd_milters``) waits in Postfix's queue; both
are delivered once the milter is back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.milter.support import launch_milter, milter_main_cf, pixel_tokens, send_to_postfix
from tests.support.postfix import without_bounces

pytestmark = [pytest.mark.postfix, pytest.mark.upstream(auth_required=False)]

SENDER = "sender@example.org"


def html(number: int) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: reader{number}@example.net\r\nSubject: message {number}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n"
        f"<html><body><p>message {number}</p></body></html>\r\n"
    ).encode()


@pytest.mark.timeout(240)
async def test_accept_no_message_lost_when_the_milter_is_killed_mid_flow(
    upstream: Any, postfix_factory: Any, tmp_path: Path, cert_pem_path: Path, key_pem_path: Path
) -> None:
    data_dir = tmp_path / "data"
    milter = await launch_milter(data_dir, cert_pem_path, key_pem_path)
    postfix = await postfix_factory(upstream.port, **milter_main_cf(milter.milter_port))
    total = 30
    killed = asyncio.Event()

    async def sender() -> None:
        for number in range(total):
            await send_to_postfix(
                postfix.smtpd_port, SENDER, [f"reader{number}@example.net"], html(number)
            )
            if number == 9:
                killed.set()

    sending = asyncio.create_task(sender())
    await killed.wait()
    await milter.kill()  # while the sender goes on
    await sending
    delivered = without_bounces(await upstream.wait_for_transactions(total, timeout_s=120))
    await postfix.wait_until_queue_empty(timeout_s=60)
    recipients = sorted(t.rcpt_tos[0] for t in delivered)
    assert recipients == sorted(f"reader{n}@example.net" for n in range(total))
    by_recipient = {t.rcpt_tos[0]: t.data for t in delivered}
    # tracked before the kill, untouched after it
    assert all(len(pixel_tokens(by_recipient[f"reader{n}@example.net"])) == 1 for n in range(10))
    assert pixel_tokens(by_recipient[f"reader{total - 1}@example.net"]) == []

    restarted = await launch_milter(
        data_dir,
        cert_pem_path,
        key_pem_path,
        milter_port=milter.milter_port,
        pixel_port=milter.pixel_port,
    )
    try:
        await send_to_postfix(postfix.smtpd_port, SENDER, ["after@example.net"], html(99))
        [after] = [
            t
            for t in await upstream.wait_for_transactions(total + 1, timeout_s=60)
            if t.rcpt_tos == ["after@example.net"]
        ]
        assert len(pixel_tokens(after.data)) == 1
    finally:
        assert await restarted.terminate() == 0


@pytest.mark.timeout(240)
async def test_tempfail_defers_while_the_milter_is_down_and_delivers_once_it_is_back(
    upstream: Any, postfix_factory: Any, tmp_path: Path, cert_pem_path: Path, key_pem_path: Path
) -> None:
    data_dir = tmp_path / "data"
    milter = await launch_milter(data_dir, cert_pem_path, key_pem_path)
    postfix = await postfix_factory(
        upstream.port, **milter_main_cf(milter.milter_port, default_action="tempfail")
    )
    await send_to_postfix(postfix.smtpd_port, SENDER, ["before@example.net"], html(0))
    await upstream.wait_for_transactions(1, timeout_s=60)
    await milter.kill()

    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await send_to_postfix(postfix.smtpd_port, SENDER, ["smtp@example.net"], html(1))
    assert refused.value.code // 100 == 4  # deferred: the client keeps it
    await postfix.send(SENDER, ["local@example.net"], html(2))  # sendmail: non_smtpd_milters
    await postfix.wait_for_log(r"cleanup\[\d+\]: \w+: milter-reject: CONNECT", timeout_s=60)
    assert [t.rcpt_tos for t in without_bounces(upstream.transactions)] == [["before@example.net"]]
    assert await postfix.queue() or list(postfix.queue_dir.glob("maildrop/*"))

    restarted = await launch_milter(
        data_dir,
        cert_pem_path,
        key_pem_path,
        milter_port=milter.milter_port,
        pixel_port=milter.pixel_port,
    )
    try:
        await send_to_postfix(postfix.smtpd_port, SENDER, ["smtp@example.net"], html(1))  # retry
        await postfix.send(SENDER, ["kick@example.net"], html(3))  # pickup scans maildrop again
        delivered = without_bounces(await upstream.wait_for_transactions(4, timeout_s=120))
        by_recipient = {t.rcpt_tos[0]: t.data for t in delivered}
        assert sorted(by_recipient) == sorted(
            ["before@example.net", "smtp@example.net", "local@example.net", "kick@example.net"]
        )
        assert all(len(pixel_tokens(data)) == 1 for data in by_recipient.values())
        await postfix.wait_until_queue_empty(timeout_s=60)
    finally:
        assert await restarted.terminate() == 0
