"""``smtp-tracker milter`` with ``dkim_policy = "resign"`` under a real Postfix (issue 13):
the milter builds its tracking stage with :meth:`Application.build_tracker`, which
carries the re-signer, so signed mail is tracked and signed again, and says so."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from smtp_tracker.cli import main as cli_main
from smtp_tracker.dkim import load_keyring
from tests.dkim.test_resign import MESSAGE, sign, verify_all
from tests.milter.support import launch_milter, milter_main_cf, pixel_tokens, send_to_postfix
from tests.support.postfix import without_bounces

pytestmark = [pytest.mark.postfix, pytest.mark.upstream(auth_required=False)]


def show(data_dir: Path, ident: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli_main(["show", ident, "--json", "--data-dir", str(data_dir)])
    assert status == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


async def test_milter_resigns_signed_mail_and_leaves_a_foreign_signature(
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    key_table: Path,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    ours = sign(MESSAGE, rsa_key)
    foreign = sign(MESSAGE.replace(b"<m1@", b"<m2@"), rsa_key, domain=b"example.net")
    milter = await launch_milter(
        tmp_path / "data",
        cert_pem_path,
        key_pem_path,
        "--dkim-policy",
        "resign",
        "--dkim-key-table",
        str(key_table),
    )
    try:
        postfix = await postfix_factory(upstream.port, **milter_main_cf(milter.milter_port))
        await send_to_postfix(postfix.smtpd_port, "a@example.com", ["b@example.org"], ours)
        [first] = without_bounces(await upstream.wait_for_transactions(1, timeout_s=60))
        await send_to_postfix(postfix.smtpd_port, "a@example.com", ["b@example.org"], foreign)
        delivered = without_bounces(await upstream.wait_for_transactions(2, timeout_s=60))
        second = delivered[-1]

        assert len(pixel_tokens(first.data)) == 1
        head = first.data.split(b"\r\n\r\n", 1)[0]
        assert (
            head.lower().count(b"\ndkim-signature:") + head.lower().startswith(b"dkim-signature:")
            == 1
        )
        assert verify_all(first.data, load_keyring(key_table)) == [True]
        assert pixel_tokens(second.data) == []
        assert second.data.endswith(foreign.split(b"\r\n\r\n", 1)[1])

        assert show(milter.data_dir, "m1@example.com")["dkim"] == "resigned"
        assert show(milter.data_dir, "m2@example.com")["dkim"] == "dkim-foreign"
    finally:
        status = await milter.terminate()
    assert status == 0
    assert "tracked=yes dkim=resigned" in milter.log
    assert "tracked=no reason=dkim-foreign dkim=dkim-foreign" in milter.log
