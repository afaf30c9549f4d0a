"""Verify-then-resign over rewritten messages, checked by dkimpy as a receiver would."""

from __future__ import annotations

import re
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import parse_tag_value

from smtp_tracker.dkim import Keyring, Resigner, ResignError, load_keyring
from tests.dkim.conftest import ed25519_seed, rsa_pem

MESSAGE = (
    b"From: Sender <a@example.com>\r\n"
    b"To: b@example.org\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 07 Dec 2026 05:00:00 +0000\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<html><body><p>Hello  there </p>\r\n\r\n</body></html>\r\n"
)
PIXEL = b'<img src="https://t.example/o/x.gif" width="1" height="1" alt="">'
HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"content-type", b"from"]


def rewritten(message: bytes) -> bytes:
    """What the pixel rewrite does to the body: a pixel before ``</body>``."""
    return message.replace(b"</body>", PIXEL + b"</body>")


@pytest.fixture
def keyring(key_table: Path) -> Keyring:
    return load_keyring(key_table)


@pytest.fixture
def resigner(keyring: Keyring) -> Resigner:
    return Resigner(keyring)


def sign(
    message: bytes,
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    *,
    selector: bytes = b"sel",
    domain: bytes = b"example.com",
    canon: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    length: bool = False,
    headers: list[bytes] = HEADERS,
) -> bytes:
    """The sender's signer (dkimpy): the message with its DKIM-Signature on top."""
    if isinstance(key, rsa.RSAPrivateKey):
        private, algorithm = rsa_pem(key), b"rsa-sha256"
    else:
        private, algorithm = ed25519_seed(key).strip(), b"ed25519-sha256"
    field = dkim.sign(
        message,
        selector,
        domain,
        private,
        signature_algorithm=algorithm,
        canonicalize=canon,
        include_headers=headers,
        length=length,
    )
    return field + message


def verify_all(message: bytes, keyring: Keyring) -> list[bool]:
    resigner = Resigner(keyring)
    count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n")[0]))
    results = []
    for i in range(count):
        try:
            results.append(dkim.DKIM(message).verify(idx=i, dnsfunc=resigner._dns))
        except dkim.ValidationError:  # body hash mismatch
            results.append(False)
    return results


def tags(message: bytes, index: int = 0) -> dict[bytes, bytes]:
    headers, _ = dkim.rfc822_parse(message)
    values = [v for n, v in headers if n.lower() == b"dkim-signature"]
    return parse_tag_value(values[index])


@pytest.mark.parametrize(
    "canon",
    [(b"relaxed", b"relaxed"), (b"relaxed", b"simple"), (b"simple", b"simple")],
    ids=lambda c: b"/".join(c).decode(),
)
@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_resigned_message_verifies_with_the_same_tags(
    resigner: Resigner,
    keyring: Keyring,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    canon: tuple[bytes, bytes],
    algorithm: str,
) -> None:
    key = rsa_key if algorithm == "rsa" else ed_key
    original = sign(MESSAGE, key, selector=b"sel" if algorithm == "rsa" else b"ed", canon=canon)
    check = resigner.check(original)
    assert (check.signatures, check.reason) == (1, None)
    changed = rewritten(original)
    assert verify_all(changed, keyring) == [False]  # the pixel broke it
    out = resigner.resign(changed, check)
    assert verify_all(out, keyring) == [True]
    before, after = tags(original), tags(out)
    assert {k: v for k, v in after.items() if k not in (b"b", b"bh")} == {
        k: v for k, v in before.items() if k not in (b"b", b"bh")
    }
    assert after[b"bh"] != before[b"bh"]
    # the new field takes the old one's place; everything after it is the rewritten message
    assert out.startswith(b"DKIM-Signature:")
    assert out[out.index(b"From: Sender") :] == changed[changed.index(b"From: Sender") :]


def test_over_signed_from_still_guards_against_an_added_from(
    resigner: Resigner, keyring: Keyring, rsa_key: rsa.RSAPrivateKey
) -> None:
    original = sign(MESSAGE, rsa_key)
    out = resigner.resign(rewritten(original), resigner.check(original))
    assert tags(out)[b"h"].count(b"from") == 2
    forged = out.replace(b"To: b@", b"From: evil@example.net\r\nTo: b@")
    assert verify_all(forged, keyring) == [False]


def test_signature_in_the_middle_of_the_header_keeps_its_place(
    resigner: Resigner, keyring: Keyring, rsa_key: rsa.RSAPrivateKey
) -> None:
    signed = sign(MESSAGE, rsa_key)
    field_end = signed.index(b"From: Sender")
    field = signed[:field_end]
    original = b"Received: from a by b; Mon, 07 Dec 2026 05:00:00 +0000\r\n" + field + MESSAGE
    out = resigner.resign(rewritten(original), resigner.check(original))
    assert out.startswith(b"Received: from a by b;")
    assert out.index(b"DKIM-Signature:") == original.index(b"DKIM-Signature:")
    assert verify_all(out, keyring) == [True]


def test_two_signatures_of_ours_are_both_made_anew(
    resigner: Resigner,
    keyring: Keyring,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    original = sign(sign(MESSAGE, rsa_key), ed_key, selector=b"ed", canon=(b"simple", b"simple"))
    check = resigner.check(original)
    assert (check.signatures, check.reason) == (2, None)
    out = resigner.resign(rewritten(original), check)
    assert verify_all(out, keyring) == [True, True]
    assert [tags(out, i)[b"s"] for i in (0, 1)] == [b"ed", b"sel"]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda k, e: rewritten(sign(MESSAGE, k)), "dkim-invalid"),
        (
            lambda k, e: sign(MESSAGE, k).replace(b"Subject: hello", b"Subject: hullo"),
            "dkim-invalid",
        ),
        (lambda k, e: sign(MESSAGE, k, domain=b"example.org"), "dkim-foreign"),
        (lambda k, e: sign(MESSAGE, k, selector=b"other"), "dkim-foreign"),
        (lambda k, e: sign(MESSAGE, k, length=True), "dkim-length-tag"),
        (
            lambda k, e: sign(sign(MESSAGE, k), e, selector=b"x", domain=b"example.net"),
            "dkim-foreign",
        ),
        (
            lambda k, e: sign(MESSAGE, k, selector=b"ed"),
            "dkim-invalid",
        ),  # RSA under the Ed25519 name
        (
            lambda k, e: (
                b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.com; s=sel; b=AAAA\r\n"
                + sign(MESSAGE, k)
            ),
            "arc-sealed",
        ),
        (
            lambda k, e: sign(MESSAGE, k).replace(b"a=rsa-sha256", b"a=rsa-sha1"),
            "dkim-invalid",
        ),
        (lambda k, e: b"DKIM-Signature: v=1; a\r\n" + MESSAGE, "dkim-invalid"),
        (lambda k, e: b"DKIM-Signature: v=1; a=rsa-sha256; b=AAAA\r\n" + MESSAGE, "dkim-invalid"),
    ],
    ids=[
        "body-altered",
        "header-altered",
        "other-domain",
        "other-selector",
        "length-tag",
        "one-of-two-foreign",
        "wrong-algorithm-for-key",
        "arc-sealed",
        "rsa-sha1",
        "unparsable",
        "no-d-or-s",
    ],
)
def test_what_is_never_resigned(
    resigner: Resigner,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    make: object,
    reason: str,
) -> None:
    message = make(rsa_key, ed_key)  # type: ignore[operator]
    check = resigner.check(message)
    assert check.reason == reason
    with pytest.raises(ResignError):
        resigner.resign(rewritten(message), check)


def test_unsigned_message(resigner: Resigner) -> None:
    assert resigner.check(MESSAGE).signatures == 0


def test_a_rewrite_that_dropped_the_signature_is_not_resigned(
    resigner: Resigner, rsa_key: rsa.RSAPrivateKey
) -> None:
    original = sign(MESSAGE, rsa_key)
    with pytest.raises(ResignError, match="lost a DKIM-Signature"):
        resigner.resign(MESSAGE, resigner.check(original))


def test_openssl_signs_not_dkimpy(
    resigner: Resigner, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dkimpy's pure-Python RSA takes ~32 ms a signature; ours must never call it."""

    def refuse(*args: object) -> bytes:
        raise AssertionError("dkimpy's RSA signing was called")

    original = sign(MESSAGE, rsa_key)
    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", refuse)
    monkeypatch.setattr(dkim.crypto, "RSASSA_PKCS1_v1_5_sign", refuse)
    out = resigner.resign(rewritten(original), resigner.check(original))
    assert out != rewritten(original)


def test_dkimpy_helpers_we_build_on_canary() -> None:
    """The dkimpy functions the re-signer calls keep their shape (dkimpy 1.1.x).

    If a new dkimpy changes them, this fails first and says which.
    """
    import inspect

    assert list(inspect.signature(dkim.hash_headers).parameters) == [
        "hasher",
        "canonicalize_headers",
        "headers",
        "include_headers",
        "sigheader",
        "sig",
    ]
    headers, body = dkim.rfc822_parse(b"A: 1\r\n b\r\nC: 2\r\n\r\nbody\r\n")
    assert headers == [[b"A", b" 1\r\n b\r\n"], [b"C", b" 2\r\n"]]
    assert body == b"body\r\n"
    # the verifier is given our parse through the attributes set_message sets
    verifier = dkim.DKIM(b"A: 1\r\n b\r\nC: 2\r\n\r\nbody\r\n")
    assert (verifier.headers, verifier.body) == (headers, body)
