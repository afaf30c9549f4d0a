"""``smtp-tracker milter`` under a real Postfix honours the objection registry too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.cli import main as cli_main
from tests.milter.support import launch_milter, milter_main_cf, pixel_tokens, send_to_postfix
from tests.support.postfix import without_bounces

pytestmark = [pytest.mark.postfix, pytest.mark.upstream(auth_required=False)]


def html(subject: str) -> bytes:
    return (
        "From: sender@example.org\r\nTo: reader@example.net\r\n"
        f"Subject: {subject}\r\nX-Track: yes\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>Hi</p></body></html>\r\n"
    ).encode()


async def test_a_denied_recipient_is_not_tracked_by_the_milter(
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    assert cli_main(["consent", "deny", "Reader@Example.NET", "--data-dir", str(data_dir)]) == 0
    milter = await launch_milter(data_dir, cert_pem_path, key_pem_path)
    try:
        postfix = await postfix_factory(upstream.port, **milter_main_cf(milter.milter_port))
        await send_to_postfix(
            postfix.smtpd_port, "sender@example.org", ["reader@example.net"], html("denied")
        )
        await send_to_postfix(
            postfix.smtpd_port, "sender@example.org", ["other@example.net"], html("allowed")
        )
        delivered = without_bounces(await upstream.wait_for_transactions(2, timeout_s=60))
        by_subject = {
            subject: t.data
            for t in delivered
            for subject in ("denied", "allowed")
            if f"Subject: {subject}".encode() in t.data
        }
        assert pixel_tokens(by_subject["denied"]) == []
        assert len(pixel_tokens(by_subject["allowed"])) == 1
    finally:
        status = await milter.terminate()
    assert status == 0
