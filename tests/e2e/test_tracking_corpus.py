"""The main job over real mail: every corpus message through Postfix → serve → the upstream.

Postfix normalises some broken header sections on the way (a header block
starting with a continuation line becomes body, ``Fro :`` is taken as a
header), so what "should be tracked" is decided by the rewrite on the DATA as
smtp-tracker received it (its capture file), and differs from the file on
disk only for messages with such header defects.  Each message that should be
tracked must arrive with exactly one
pixel whose URL, fetched over HTTPS by a client that verifies the session CA,
returns the GIF and shows up as an open in ``smtp-tracker show ID --json``;
each other message arrives without a pixel; as many messages reach the upstream
as were given to Postfix.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import io
import json
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smtp_tracker.cli import main as cli_main
from smtp_tracker.mime import RewritePolicy, rewrite
from tests.corpus import corpus_root, eml_paths, skip_reason
from tests.support.postfix import without_bounces
from tests.support.relay import tracking_over_tls
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.corpus, pytest.mark.postfix]

SENDER = "corpus@example.org"
PIXEL = re.compile(r"https://localhost:\d+/o/([A-Za-z0-9_-]{23})\.gif")


def recipient(number: int) -> str:
    return f"reader+{number}@example.net"


def pixel_tokens(data: bytes) -> list[str]:
    """Tracking ids of pixel URLs in the message, searched in every decoded text part."""
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    tokens: list[str] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            tokens += PIXEL.findall(payload.decode("latin-1"))
    return tokens


def would_track(message: bytes) -> bool:
    url = "https://localhost:1/o/AAAAAAAAAAAAAAAAAAAAAA.gif"
    return rewrite(message, url, RewritePolicy(), reverse_path=SENDER).tracked


def header_defects(path: Path) -> list[str]:
    """Defects of the header section, the part Postfix's cleanup may normalise."""
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    names = {"MissingHeaderBodySeparatorDefect", "FirstHeaderLineIsContinuationDefect"}
    return [type(d).__name__ for d in parsed.defects if type(d).__name__ in names]


def show(data_dir: Path, tracking_id: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli_main(["show", tracking_id, "--json", "--data-dir", str(data_dir)])
    assert status == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


@pytest.mark.timeout(900)
async def test_every_corpus_message_relayed_through_postfix_with_its_pixel(
    relay_factory: Any,
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
) -> None:
    if corpus_root() is None:
        pytest.skip(skip_reason())
    paths = eml_paths()
    app = await relay_factory(
        **tracking_over_tls(cert_pem_path, key_pem_path),
        capture="all",
    )
    data_dir = tmp_path / "data"
    postfix = await postfix_factory(
        app.smtp_address[1], message_size_limit=20_000_000, default_destination_concurrency_limit=4
    )

    from_file: dict[str, bool] = {}
    for number, path in enumerate(paths):
        original = path.read_bytes()
        from_file[recipient(number)] = would_track(original)
        await postfix.send(SENDER, [recipient(number)], original)
    await upstream.wait_for_transactions(len(paths), timeout_s=600)
    await postfix.wait_until_queue_empty(timeout_s=120)
    delivered = without_bounces(upstream.transactions)
    assert len(delivered) == len(paths)
    by_recipient = {t.rcpt_tos[0]: t for t in delivered}
    assert sorted(by_recipient) == sorted(from_file)

    store = app.store
    assert store is not None
    records = {m.record.recipients[0]: m.record for m in await store.list_messages()}
    assert sorted(records) == sorted(from_file)
    await app.capture.drain()
    received = {
        path.name.split(".")[0]: path for path in (data_dir / "capture").glob("*/*.downstream.eml")
    }

    mismatched, normalised, tracked = [], [], []
    for rcpt, file_says in from_file.items():
        record = records[rcpt]
        name = paths[int(rcpt.split("+")[1].split("@")[0])].name
        should_track = would_track(received[record.queue_id].read_bytes())
        if record.tracked != should_track:
            mismatched.append((name, should_track, record.not_tracked_reason))
        if should_track != file_says:
            normalised.append(name)
            defects = header_defects(paths[int(rcpt.split("+")[1].split("@")[0])])
            assert defects, f"{name}: Postfix changed the decision but its header is sound"
        tokens = pixel_tokens(by_recipient[rcpt].data)
        if record.tracked:
            assert tokens == [record.tracking_id], (rcpt, tokens)
            tracked.append(record.tracking_id)
        else:
            assert tokens == [], (rcpt, record.not_tracked_reason, tokens)
    assert mismatched == [], mismatched
    assert len(normalised) <= 5, normalised
    assert len(tracked) >= 50, "far fewer corpus messages were tracked than the corpus holds"

    async with aiohttp.ClientSession() as session:
        for tracking_id in tracked:
            url = f"https://localhost:{app.pixel_port}/o/{tracking_id}.gif"
            async with session.get(
                url, ssl=client_ssl_context, headers={"User-Agent": "corpus-reader/1.0"}
            ) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "image/gif"
                assert len(await response.read()) == 43

    async def all_opened() -> bool:
        found = [await store.find_message(t) for t in tracked]
        return all(m is not None and len(m.opens) == 1 for m in found)

    await wait_until(all_opened, timeout_s=30, message="opens were not all recorded")
    for tracking_id in tracked:
        shown = await asyncio.to_thread(show, data_dir, tracking_id)
        assert shown["tracking_id"] == tracking_id
        assert [o["user_agent"] for o in shown["opens"]] == ["corpus-reader/1.0"]
