"""The tracking stage with dkim_policy = "resign": rewrite, then re-sign or relay as received."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from smtp_tracker.dkim import Resigner, load_keyring
from smtp_tracker.mime import RewritePolicy, RewriteResult
from smtp_tracker.mime.disclosure import Disclosure
from smtp_tracker.smtp.session import Transaction
from smtp_tracker.tracking import stage as tracking
from smtp_tracker.tracking.stage import TrackedMessage, Tracker
from tests.dkim.test_resign import MESSAGE, sign, verify_all


def failed_rewrite(content: bytes, *args: object) -> RewriteResult:
    """What :func:`smtp_tracker.mime.rewrite` returns when it fails open."""
    return RewriteResult(message=content, tracked=False, reason="rewrite-failed", defects=("x",))


@pytest.fixture
async def tracker(key_table: Path) -> AsyncIterator[Tracker]:
    tracker = Tracker(
        policy=RewritePolicy(dkim_policy="resign"),
        pixel_base_url="https://pixel.test",
        workers=1,
        resigner=Resigner(load_keyring(key_table)),
        disclosure=Disclosure(header_value="this message is tracked"),
    )
    yield tracker
    await asyncio.to_thread(tracker.close)


async def prepare(tracker: Tracker, message: bytes) -> TrackedMessage:
    prepared = await tracker.prepare(message, Transaction("a@example.com", (), False))
    assert isinstance(prepared, TrackedMessage)
    return prepared


async def test_signed_message_is_tracked_and_resigned(
    tracker: Tracker, key_table: Path, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    original = sign(MESSAGE, rsa_key, headers=[b"from", b"subject", b"x-tracking-notice"])
    with caplog.at_level(logging.INFO, logger="smtp_tracker.mime"):
        prepared = await prepare(tracker, original)
    assert (prepared.tracked, prepared.reason, prepared.dkim) == (True, None, "resigned")
    assert prepared.data.count(b"https://pixel.test/") == 1
    # the disclosure header was added before the re-sign, and h= over-signs its name
    assert b"X-Tracking-Notice: this message is tracked" in prepared.data
    assert verify_all(prepared.data, load_keyring(key_table)) == [True]
    assert tracker.counters.resigned == 1
    assert "dkim=resigned" in caplog.text


@pytest.mark.parametrize(
    ("alter", "reason"),
    [
        (lambda m: m.replace(b"Hello", b"Hallo"), "dkim-invalid"),
        (lambda m: m.replace(b"d=example.com", b"d=example.org"), "dkim-foreign"),
        (lambda m: b"ARC-Seal: i=1; cv=none; b=AAAA\r\n" + m, "arc-sealed"),
    ],
)
async def test_a_signature_we_may_not_resign_goes_on_byte_for_byte(
    tracker: Tracker,
    rsa_key: rsa.RSAPrivateKey,
    alter: object,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = alter(sign(MESSAGE, rsa_key))  # type: ignore[operator]
    with caplog.at_level(logging.INFO, logger="smtp_tracker.mime"):
        prepared = await prepare(tracker, original)
    assert prepared.data == original
    assert (prepared.tracked, prepared.reason, prepared.dkim) == (False, reason, reason)
    assert f"dkim={reason}: relaying the message as received" in caplog.text


async def test_a_failed_rewrite_relays_the_original_still_valid_signature(
    tracker: Tracker,
    key_table: Path,
    ed_key: ed25519.Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rewrite fails open (its contract: the original octets, ``rewrite-failed``)."""
    monkeypatch.setattr(tracking, "_rewrite", failed_rewrite)
    original = sign(MESSAGE, ed_key, selector=b"ed")
    prepared = await prepare(tracker, original)
    assert prepared.data == original
    assert (prepared.tracked, prepared.reason, prepared.dkim) == (False, "rewrite-failed", None)
    assert verify_all(prepared.data, load_keyring(key_table)) == [True]


async def test_a_resign_that_fails_relays_the_original(
    tracker: Tracker, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = sign(MESSAGE, rsa_key)

    def fail(self: Resigner, message: bytes, check: object) -> bytes:
        raise RuntimeError("a defect")

    monkeypatch.setattr(Resigner, "resign", fail)
    prepared = await prepare(tracker, original)
    assert prepared.data == original
    assert (prepared.tracked, prepared.dkim) == (False, "dkim-resign-failed")
    assert tracker.counters.resign_failed == 1


async def test_unsigned_mail_is_tracked_as_before(tracker: Tracker) -> None:
    prepared = await prepare(tracker, MESSAGE)
    assert (prepared.tracked, prepared.dkim) == (True, None)


async def test_a_defect_in_the_rewrite_thread_relays_the_original(
    tracker: Tracker,
    rsa_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not a 451 the client would retry forever: the message goes on as received."""

    def broken(*args: object) -> RewriteResult:
        raise TypeError("a defect")

    monkeypatch.setattr(tracking, "_rewrite", broken)
    original = sign(MESSAGE, rsa_key)
    prepared = await tracker.prepare(original, Transaction("a@example.com", (), False))
    assert (prepared.data, prepared.tracked, prepared.reason) == (original, False, "rewrite-failed")
    assert tracker.counters.rewrite_failed == 1
    assert "the rewrite stage failed; relaying the original" in caplog.text
