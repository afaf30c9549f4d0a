"""The corpus through Postfix with ``smtp-tracker milter`` (``non_smtpd_milters``), as the relay's.

Every message of the corpus is injected with sendmail; Postfix's cleanup calls
the milter; the upstream test server receives what Postfix delivers.  The same
invariants as the relay's corpus test (tests/e2e/test_tracking_corpus.py):
as many messages delivered as sent; each message the rewrite would track (on
the octets the milter saw, its capture file) arrives with exactly one pixel,
and its fetch records an open under Postfix's queue id; the others arrive
without one; and nothing else changed: the delivered body is the body the
milter asked for (or the one sent), and every header field sent is still there
but the control header.

The records are read once the milter has exited (SIGTERM: its pixel writer
records every open it was offered first): an ``smtp-tracker messages`` run
against the data directory while the milter served made the opens recorded
after it invisible to readers until the milter's shutdown (seen 2026-12-07,
the store's code, not the milter's; reported to the lead).

The whole corpus runs (315 messages, about 20 s here); ``SMTP_TRACKER_MILTER_CORPUS_SAMPLE=N``
takes every k-th file so that N remain (deterministic: sorted paths, fixed stride).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smtp_tracker.mime import RewritePolicy, rewrite
from tests.corpus import corpus_root, eml_paths, skip_reason
from tests.milter.support import launch_milter, milter_main_cf, pixel_tokens, postfix_queue_id
from tests.support.postfix import without_bounces
from tests.support.process import run_cli

pytestmark = [
    pytest.mark.corpus,
    pytest.mark.postfix,
    pytest.mark.upstream(auth_required=False),
]

SENDER = "corpus@example.org"


def recipient(number: int) -> str:
    return f"reader+{number}@example.net"


def would_track(message: bytes) -> bool:
    url = "https://localhost:1/o/AAAAAAAAAAAAAAAAAAAAAA.gif"
    return rewrite(message, url, RewritePolicy(), reverse_path=SENDER).tracked


def cli_json(*args: str) -> Any:
    """``smtp-tracker ARGS --json`` as a process of its own, as a user runs it.

    It runs once the milter has stopped: a ``messages`` run while it served
    made the opens recorded after it invisible until the milter's shutdown
    (reported; see the module doc).
    """
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def sampled(paths: list[Path]) -> list[Path]:
    wanted = int(os.environ.get("SMTP_TRACKER_MILTER_CORPUS_SAMPLE", "0"))
    if wanted <= 0 or wanted >= len(paths):
        return paths
    stride = len(paths) / wanted
    return [paths[int(i * stride)] for i in range(wanted)]


def split(data: bytes) -> tuple[bytes, bytes]:
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = data.find(separator)
        if end >= 0:
            return data[:end], data[end + len(separator) :]
    return data, b""


def unbroken(body: bytes) -> bytes:
    """The body without its line breaks: Postfix's smtp client breaks lines over
    ``smtp_line_length_limit`` (998) with CRLF and a space."""
    return re.sub(rb"\r?\n ?", b"", body)


def field_names(head: bytes) -> list[str]:
    parsed = email.message_from_bytes(head + b"\r\n\r\n", policy=email.policy.compat32)
    return [name.lower() for name in parsed]


@pytest.mark.timeout(900)
async def test_corpus_through_postfix_and_the_milter(
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
) -> None:
    if corpus_root() is None:
        pytest.skip(skip_reason())
    paths = sampled(eml_paths())
    data_dir = tmp_path / "data"
    milter = await launch_milter(data_dir, cert_pem_path, key_pem_path, "--capture", "all")
    try:
        postfix = await postfix_factory(
            upstream.port,
            message_size_limit=20_000_000,
            default_destination_concurrency_limit=4,
            **milter_main_cf(milter.milter_port),
        )
        for number, path in enumerate(paths):
            await postfix.send(SENDER, [recipient(number)], path.read_bytes())
        await upstream.wait_for_transactions(len(paths), timeout_s=600)
        await postfix.wait_until_queue_empty(timeout_s=120)
        delivered = without_bounces(upstream.transactions)
        assert len(delivered) == len(paths)
        by_recipient = {t.rcpt_tos[0]: t.data for t in delivered}
        assert sorted(by_recipient) == sorted(recipient(n) for n in range(len(paths)))
        tokens = {rcpt: pixel_tokens(data) for rcpt, data in by_recipient.items()}
        assert all(len(found) <= 1 for found in tokens.values())
        async with aiohttp.ClientSession() as session:
            for tracking_id in (t for found in tokens.values() for t in found):
                url = f"https://localhost:{milter.pixel_port}/o/{tracking_id}.gif"
                async with session.get(
                    url, ssl=client_ssl_context, headers={"User-Agent": "corpus-reader/1.0"}
                ) as response:
                    assert response.status == 200
                    assert len(await response.read()) == 43
    finally:
        # SIGTERM: the pixel endpoint's writer records every open it was offered first
        status = await milter.terminate()
    assert status == 0

    messages = cli_json("messages", "--data-dir", str(data_dir))
    records = {m["recipients"][0]: m for m in messages}
    assert sorted(records) == sorted(by_recipient)
    captures = {p.name.split(".")[0]: p for p in (data_dir / "capture").glob("*/*.downstream.eml")}
    tracked = 0
    for rcpt, data in by_recipient.items():
        record = records[rcpt]
        queue_id = record["queue_id"]
        seen = captures[queue_id].read_bytes()  # named by Postfix's queue id
        assert postfix_queue_id(data) == queue_id, rcpt
        assert record["tracked"] == would_track(seen), (rcpt, record["not_tracked_reason"])
        asked = (captures[queue_id].parent / f"{queue_id}.upstream.eml").read_bytes()
        # the body the milter asked for (Postfix breaks lines over 998 octets, RFC 5322 §2.1.1)
        assert unbroken(split(data)[1]) == unbroken(split(asked)[1]), rcpt
        sent_names = [n for n in field_names(split(seen)[0]) if n != "x-track"]
        got_names = field_names(split(data)[0])
        assert all(name in got_names for name in sent_names), rcpt
        if record["tracked"]:
            tracked += 1
            assert tokens[rcpt] == [record["tracking_id"]], rcpt
            assert [o["user_agent"] for o in record["opens"]] == ["corpus-reader/1.0"], rcpt
        else:
            assert tokens[rcpt] == [], (rcpt, record["not_tracked_reason"])
            assert unbroken(split(data)[1]) == unbroken(split(seen)[1]), rcpt
    assert tracked >= len(paths) // 6, "far fewer messages tracked than expected"
