"""The milter before OpenDKIM in ``smtpd_milters``: OpenDKIM signs the tracked message.

Postfix hands the second milter the message as the first one left it, so
OpenDKIM signs the body with the pixel and the header with the disclosure;
both verifiers (dkimpy, and OpenDKIM's own code with ``opendkim -t``) pass.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from tests.milter.support import launch_milter, pixel_tokens, send_to_postfix
from tests.support.opendkim import DOMAIN, DkimKeys, OpenDkim, make_keys, opendkim_verify
from tests.support.opendkim import missing_reason as opendkim_missing
from tests.support.postfix import without_bounces

pytestmark = [pytest.mark.postfix, pytest.mark.upstream(auth_required=False)]

SENDER = f"news@{DOMAIN}"
HEAD = (
    f"From: News <{SENDER}>\r\nTo: reader@example.net\r\nSubject: signed after tracking\r\n"
    "X-Track: yes\r\nMIME-Version: 1.0\r\n"
).encode()
MESSAGES = {
    "html@example.net": HEAD
    + b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>Hi</p></body></html>\r\n",
    "alternative@example.net": HEAD + b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\nHi\r\n"
    b"--b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: "
    b'quoted-printable\r\n\r\n<html><body><p style=3D"x">Hi</p></body></html>\r\n--b--\r\n',
    "base64@example.net": HEAD
    + b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"PGh0bWw+PGJvZHk+PHA+SGk8L3A+PC9ib2R5PjwvaHRtbD4=\r\n",
}


@pytest.fixture
async def signer(tmp_path: Path) -> AsyncIterator[tuple[OpenDkim, DkimKeys]]:
    reason = opendkim_missing()
    if reason is not None:
        pytest.skip(reason)
    keys = make_keys(Path(tempfile.mkdtemp(prefix="dkim-keys-", dir="/tmp")))
    opendkim = await OpenDkim.start(keys)
    try:
        yield opendkim, keys
    finally:
        await opendkim.stop()


async def test_tracked_messages_signed_after_the_milter_verify(
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    signer: tuple[OpenDkim, DkimKeys],
) -> None:
    opendkim, keys = signer
    milter = await launch_milter(
        tmp_path / "data", cert_pem_path, key_pem_path, "--disclosure-header", "tracked"
    )
    try:
        postfix = await postfix_factory(
            upstream.port,
            smtpd_milters=f"inet:127.0.0.1:{milter.milter_port}, {opendkim.milter}",
            milter_default_action="accept",
            milter_protocol="6",
        )
        for rcpt, data in MESSAGES.items():
            await send_to_postfix(postfix.smtpd_port, SENDER, [rcpt], data)
        delivered = without_bounces(
            await upstream.wait_for_transactions(len(MESSAGES), timeout_s=60)
        )
        assert sorted(t.rcpt_tos[0] for t in delivered) == sorted(MESSAGES)
        verify_dir = Path(tempfile.mkdtemp(prefix="dkim-verify-", dir="/tmp"))
        for transaction in delivered:
            data = transaction.data
            rcpt = transaction.rcpt_tos[0]
            assert len(pixel_tokens(data)) == 1, rcpt
            head = data.split(b"\r\n\r\n", 1)[0]
            assert b"\r\nX-Tracking-Notice: tracked" in head or head.startswith(
                b"X-Tracking-Notice: tracked"
            )
            assert b"DKIM-Signature:" in head, rcpt
            assert dkim.verify(data, dnsfunc=keys.dnsfunc), rcpt
            verdict = await opendkim_verify(data, keys, verify_dir)
            assert "dkim=pass" in verdict, (rcpt, verdict)
    finally:
        assert await milter.terminate() == 0
