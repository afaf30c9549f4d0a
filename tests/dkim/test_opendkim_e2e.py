"""DKIM-signed mail tracked end to end, with real OpenDKIM and Postfix.

Topology 1, re-signing: Postfix signs with OpenDKIM as a milter, then its
``transport_maps`` hand every message to smtp-tracker (``dkim_policy = "resign"``,
the same KeyTable and SigningTable), which relays to the STARTTLS upstream.

Topology 2, signing after tracking (Postfix's FILTER_README after-queue filter,
set up with ``conf/postfix/sign-after-tracking.*`` as shipped): Postfix →
``content_filter`` → smtp-tracker → a second Postfix ``smtpd`` whose milter is
OpenDKIM → the queue → the upstream.

Each message must arrive with exactly one pixel and exactly one DKIM signature,
which two independent verifiers pass: dkimpy (``dnsfunc`` with the session's
records) and OpenDKIM itself: in topology 1 a verifying OpenDKIM milter on the
receiving side's Postfix (smtp-tracker → that Postfix → the upstream), whose
Authentication-Results must say ``dkim=pass``; in topology 2 (``relaxed``
header canonicalization) ``opendkim -t``, see :mod:`tests.support.opendkim`.

The matrix: canonicalization ``relaxed/relaxed``, ``relaxed/simple``,
``simple/simple`` by RSA 2048 (signed by OpenDKIM, the SigningTable a ``refile:``
wildcard) and Ed25519 (signed by dkimpy before Postfix: Debian's OpenDKIM 2.11
cannot sign with Ed25519, see :mod:`tests.support.opendkim`); ``From`` is
over-signed in every case.  With the corpus, each HTML template (wrapped as a
message, quoted-printable, base64 or 8bit in turn) and each HTML corpus message
is sent once, in one cell of the matrix chosen by its position (deterministic).
"""

from __future__ import annotations

import email
import email.policy
import logging
import re
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import pytest

from smtp_tracker.mime import RewritePolicy, RewriteResult, rewrite
from smtp_tracker.tracking import stage as tracking
from tests.corpus import corpus_root, eml_paths, html_as_message, html_paths, skip_reason
from tests.support.opendkim import DOMAIN, DkimKeys, OpenDkim, opendkim_verify
from tests.support.postfix import Postfix, free_port, without_bounces
from tests.support.relay import tracking_over_tls

pytestmark = [pytest.mark.postfix]

CANONS = ["relaxed/relaxed", "relaxed/simple", "simple/simple"]
CTES = ["quoted-printable", "base64", "8bit"]
#: OpenDKIM signs mail from this address (SigningTable ``*@example.test rsa``).
RSA_FROM = f"Sender <sender@{DOMAIN}>"
#: ... and not from this one: dkimpy signs it with the Ed25519 key.
ED_FROM = "Sender <sender@ed-signer.example.net>"
ENVELOPE_SENDER = f"bounces@{DOMAIN}"
PIXEL = re.compile(rb"https://localhost:\d+/o/[A-Za-z0-9_-]{23}\.gif")
#: Header fields a message picked up on its earlier travels: a corpus message is
#: sent as if it had just been written.
_TRAVEL_FIELDS = (
    b"dkim-signature",
    b"domainkey-signature",
    b"arc-seal",
    b"arc-message-signature",
    b"arc-authentication-results",
    b"authentication-results",
)

SIMPLE_HTML = (
    b"Subject: a signed newsletter\r\n"
    b"To: reader@example.net\r\n"
    b"Message-ID: <simple@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<html><body><p>Hello, this is the news.</p></body></html>\r\n"
)


def as_written(message: bytes, from_field: str) -> bytes:
    """``message`` with its earlier signatures and results (and an mbox ``From ``
    line) removed and ``From`` replaced."""
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = message.partition(b"\n\n")
    lines = re.split(rb"\r?\n", head)
    kept: list[bytes] = [f"From: {from_field}".encode()]
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        if line.startswith(b"From "):  # an mbox separator, not a field
            dropping = True
            continue
        name = line.split(b":", 1)[0].strip().lower()
        dropping = name in _TRAVEL_FIELDS or name == b"from"
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + b"\r\n\r\n" + body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def ed25519_signed(message: bytes, keys: DkimKeys, canon: str) -> bytes:
    header, body = canon.encode().split(b"/")
    field = dkim.sign(
        message,
        b"ed",
        DOMAIN.encode(),
        keys.ed25519_seed,
        signature_algorithm=b"ed25519-sha256",
        canonicalize=(header, body),
    )
    return bytes(field) + message


def would_track(message: bytes) -> bool:
    url = "https://localhost:1/o/AAAAAAAAAAAAAAAAAAAAAA.gif"
    policy = RewritePolicy(dkim_policy="track")
    return rewrite(message, url, policy, reverse_path=ENVELOPE_SENDER).tracked


def corpus_items() -> list[tuple[str, bytes]]:
    """Every HTML template (wrapped; the encoding turns with the position) and every
    corpus message the rewrite tracks, by name; none without the corpus.

    Left out: messages with a line over 990 octets (Postfix's SMTP client breaks
    such lines after the signer signed, ``smtp_line_length_limit``), and those whose
    header section dkimpy cannot read (a line that is neither a field nor a
    continuation): the re-signer cannot check their signature, so they go on as
    received, ``dkim-invalid``.
    """
    if corpus_root() is None:
        return []
    items: list[tuple[str, bytes]] = []
    for number, path in enumerate(html_paths()):
        cte = CTES[(number // 6) % 3]
        html = path.read_bytes()
        if cte == "8bit" and any(len(line) > 990 for line in html.splitlines()):
            cte = "quoted-printable"  # too long a line for 8bit (RFC 5322 §2.1.1)
        message = html_as_message(html, charset="utf-8", cte=cte)  # type: ignore[arg-type]
        items.append((f"html/{path.name} ({cte})", message))
    for path in eml_paths():
        message = path.read_bytes()
        if any(len(line) > 990 for line in message.splitlines()) or not would_track(message):
            continue
        try:
            dkim.rfc822_parse(as_written(message, RSA_FROM))
        except dkim.MessageFormatError:
            continue
        items.append((f"eml/{path.name}", message))
    return items


def cell_items(canon: str, algorithm: str, *, corpus: bool) -> list[tuple[str, bytes]]:
    """This cell's share of :func:`corpus_items` (item i goes to cell i mod 6), or
    one simple message (the test that runs without the corpus)."""
    if not corpus:
        return [(f"simple ({algorithm}, {canon})", SIMPLE_HTML)]
    cell = CANONS.index(canon) + (3 if algorithm == "ed25519" else 0)
    return [item for i, item in enumerate(corpus_items()) if i % 6 == cell]


def signature_fields(message: bytes) -> list[dict[bytes, bytes]]:
    headers, _ = dkim.rfc822_parse(message)
    return [
        dkim.util.parse_tag_value(value)
        for name, value in headers
        if name.lower() == b"dkim-signature"
    ]


def pixels(message: bytes) -> int:
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    count = 0
    for part in parsed.walk():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            count += len(PIXEL.findall(payload))
    return count


def verifier_results(message: bytes) -> str:
    """The ``Authentication-Results`` the receiving side's OpenDKIM milter added, unfolded."""
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    found = [
        " ".join(str(v).split())
        for v in parsed.get_all("Authentication-Results", [])
        if str(v).strip().startswith("verifier.test")
    ]
    assert len(found) == 1, f"{len(found)} Authentication-Results by verifier.test"
    return found[0]


async def assert_signed_and_tracked(
    received: bytes,
    keys: DkimKeys,
    tmp_path: Path,
    *,
    name: str,
    canon: str,
    algorithm: str,
    verdict: str | None = None,
) -> None:
    """One signature as expected, one pixel, and both verifiers pass: dkimpy, and
    OpenDKIM (``verdict``, its milter's Authentication-Results, else ``opendkim -t``)."""
    signatures = signature_fields(received)
    assert len(signatures) == 1, f"{name}: {len(signatures)} DKIM signatures"
    tags = signatures[0]
    assert tags[b"d"] == DOMAIN.encode(), name
    assert tags[b"a"] == f"{algorithm}-sha256".encode(), name
    assert tags[b"c"] == canon.encode(), name
    assert re.split(rb"\s*:\s*", tags[b"h"].lower()).count(b"from") >= 2, (
        f"{name}: From over-signed"
    )
    assert pixels(received) == 1, f"{name}: not exactly one pixel"
    assert dkim.verify(received, dnsfunc=keys.dnsfunc), f"{name}: dkimpy says fail"
    if verdict is None:
        verdict = await opendkim_verify(received, keys, tmp_path)
    assert " dkim=pass " in f" {verdict} ", f"{name}: OpenDKIM says {verdict}"


@pytest.mark.timeout(300)
@pytest.mark.upstream(auth_required=False)
@pytest.mark.parametrize(
    "corpus",
    [pytest.param(False, id="simple"), pytest.param(True, id="corpus", marks=pytest.mark.corpus)],
)
@pytest.mark.parametrize("canon", CANONS)
async def test_signed_by_opendkim_tracked_and_resigned(
    canon: str,
    corpus: bool,
    dkim_keys: DkimKeys,
    relay_factory: Any,
    upstream: Any,
    postfix_factory: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if corpus and corpus_root() is None:
        pytest.skip(skip_reason())
    caplog.set_level(logging.INFO, logger="smtp_tracker.mime")
    signer = await OpenDkim.start(dkim_keys, canonicalization=canon)
    verifier = await OpenDkim.start(dkim_keys, verify=True)
    try:
        # the receiving side: a Postfix whose smtpd runs OpenDKIM verifying, then the upstream
        receiving = await postfix_factory(
            int(upstream.address.rpartition(":")[2]), smtpd_milters=verifier.milter
        )
        app = await relay_factory(
            **tracking_over_tls(cert_pem_path, key_pem_path),
            upstream=receiving.smtpd_address,
            upstream_tls="none",
            upstream_user=None,
            upstream_ca_file=None,
            dkim_policy="resign",
            dkim_key_table=str(dkim_keys.key_table),
            dkim_signing_table=dkim_keys.signing_table_spec,
        )
        postfix = await postfix_factory(
            app.smtp_address[1],
            smtpd_milters=signer.milter,
            non_smtpd_milters=signer.milter,
            milter_default_action="tempfail",
            message_size_limit=20_000_000,
            default_destination_concurrency_limit=4,
        )
        expected: dict[str, tuple[str, str]] = {}
        number = 0
        for algorithm in ("rsa", "ed25519"):
            for name, message in cell_items(canon, algorithm, corpus=corpus):
                recipient = f"reader+{number}@example.net"
                number += 1
                if algorithm == "rsa":
                    data = as_written(message, RSA_FROM)
                else:
                    data = ed25519_signed(as_written(message, ED_FROM), dkim_keys, canon)
                expected[recipient] = (name, algorithm)
                if corpus:  # sendmail: OpenDKIM signs as non_smtpd_milters
                    await postfix.send(ENVELOPE_SENDER, [recipient], data)
                else:  # SMTP to Postfix's smtpd, as a client would: smtpd_milters
                    await aiosmtplib.send(
                        data,
                        sender=ENVELOPE_SENDER,
                        recipients=[recipient],
                        hostname="127.0.0.1",
                        port=postfix.smtpd_port,
                        start_tls=False,
                    )
        await upstream.wait_for_transactions(len(expected), timeout_s=240)
        await postfix.wait_until_queue_empty(timeout_s=60)
    finally:
        await signer.stop()
        await verifier.stop()
    delivered = {t.rcpt_tos[0]: t.data for t in without_bounces(upstream.transactions)}
    assert sorted(delivered) == sorted(expected)
    for recipient, (name, algorithm) in expected.items():
        await assert_signed_and_tracked(
            delivered[recipient],
            dkim_keys,
            tmp_path,
            name=name,
            canon=canon,
            algorithm=algorithm,
            verdict=verifier_results(delivered[recipient]),
        )
    assert caplog.text.count("dkim=resigned") == len(expected)


REPO = Path(__file__).resolve().parents[2]


def shipped(name: str, replacements: dict[str, str]) -> str:
    """A file of ``conf/postfix/`` with the test's ports and milter put in."""
    text = (REPO / "conf" / "postfix" / name).read_text()
    for old, new in replacements.items():
        assert old in text, f"{name} no longer has {old!r}"
        text = text.replace(old, new)
    return text


def main_cf_settings(text: str) -> dict[str, str]:
    """The ``name = value`` lines of a main.cf snippet (comments left out)."""
    settings = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


@pytest.mark.timeout(300)
@pytest.mark.upstream(auth_required=False)
async def test_signed_after_tracking(
    dkim_keys: DkimKeys,
    relay_factory: Any,
    upstream: Any,
    tmp_path: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
) -> None:
    """Postfix → content_filter → smtp-tracker → Postfix smtpd with the OpenDKIM
    milter → upstream, one Postfix set up with ``conf/postfix/sign-after-tracking.*``."""
    canon = "relaxed/simple"
    signer = await OpenDkim.start(dkim_keys, canonicalization=canon)
    upstream_port = int(upstream.address.rpartition(":")[2])
    signing_port = free_port()
    postfix: Postfix | None = None
    try:
        app = await relay_factory(
            **tracking_over_tls(cert_pem_path, key_pem_path),
            upstream=f"127.0.0.1:{signing_port}",
            upstream_tls="none",
            upstream_user=None,
            upstream_ca_file=None,
        )
        main_cf = main_cf_settings(
            shipped(
                "sign-after-tracking.main.cf",
                {"[127.0.0.1]:10025": f"[127.0.0.1]:{app.smtp_address[1]}"},
            )
        )
        master_cf = shipped(
            "sign-after-tracking.master.cf",
            {"127.0.0.1:10026": f"127.0.0.1:{signing_port}", "inet:localhost:8891": signer.milter},
        )
        # transport_maps (the test instance's default) send what leaves to the upstream
        postfix = await Postfix.create(upstream_port, main_cf, master_cf_extra=master_cf)
        items = [
            (name, message)
            for i, (name, message) in enumerate(corpus_items())
            if i % 20 == 0  # a sample: the signing is OpenDKIM's own, tested above
        ]
        items.insert(0, ("simple", SIMPLE_HTML))
        for number, (_, message) in enumerate(items):
            await postfix.send(
                ENVELOPE_SENDER,
                [f"reader+{number}@example.net"],
                as_written(message, RSA_FROM),
            )
        await upstream.wait_for_transactions(len(items), timeout_s=240)
        await postfix.wait_until_queue_empty(timeout_s=60)
    finally:
        await signer.stop()
        if postfix is not None:
            await postfix.destroy(keep_log=tmp_path / "postfix.maillog")
    delivered = {t.rcpt_tos[0]: t.data for t in without_bounces(upstream.transactions)}
    assert len(delivered) == len(items)
    for number, (name, _) in enumerate(items):
        await assert_signed_and_tracked(
            delivered[f"reader+{number}@example.net"],
            dkim_keys,
            tmp_path,
            name=name,
            canon=canon,
            algorithm="rsa",
        )


# -- what is relayed as received ---------------------------------------------------------------

MESSAGE = as_written(SIMPLE_HTML, RSA_FROM)


def rsa_signed(message: bytes, keys: DkimKeys, **options: Any) -> bytes:
    domain = options.pop("domain", DOMAIN).encode()
    field = dkim.sign(message, b"rsa", domain, keys.rsa_pem, **options)
    return bytes(field) + message


def arc_sealed(message: bytes, keys: DkimKeys) -> bytes:
    """A signed message under an ARC set of instance 1 (RFC 8617 §4.1), as a
    forwarder that checked it would add.  The set's own signatures are not what is
    tested: any ARC set means ``arc-sealed`` (we cannot seal it anew)."""
    signed = rsa_signed(message, keys)
    return (
        b"ARC-Seal: i=1; a=rsa-sha256; t=1796619048; cv=none; d=forwarder.example;\r\n"
        b" s=arc; b=c2VhbA==\r\n"
        b"ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
        b" d=forwarder.example; s=arc; h=from:to:subject; bh=Ym9keQ==; b=c2ln\r\n"
        b"ARC-Authentication-Results: i=1; forwarder.example; dkim=pass\r\n"
        b" header.d=example.test\r\n"
    ) + signed


CASES = {
    "dkim-invalid": lambda keys: rsa_signed(MESSAGE, keys).replace(b"the news", b"the olds"),
    "dkim-foreign": lambda keys: rsa_signed(MESSAGE, keys, domain="example.org"),
    "dkim-length-tag": lambda keys: rsa_signed(MESSAGE, keys, length=True),
    "arc-sealed": lambda keys: arc_sealed(MESSAGE, keys),
    "rewrite-failed": lambda keys: rsa_signed(MESSAGE.replace(b"news", b"fail"), keys),
}


async def test_what_is_not_resigned_is_relayed_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch,
    dkim_keys: DkimKeys,
    relay_factory: Any,
    upstream: Any,
    cert_pem_path: Path,
    key_pem_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="smtp_tracker.mime")

    def rewrite_failing_on_fail(content: bytes, *args: Any) -> RewriteResult:
        """The rewrite, failing open (its contract) for the message that says "fail"."""
        if b"the fail" in content:
            return RewriteResult(
                message=content, tracked=False, reason="rewrite-failed", defects=("x",)
            )
        return real_rewrite(content, *args)

    real_rewrite = tracking._rewrite
    monkeypatch.setattr(tracking, "_rewrite", rewrite_failing_on_fail)
    app = await relay_factory(
        **tracking_over_tls(cert_pem_path, key_pem_path),
        dkim_policy="resign",
        dkim_key_table=str(dkim_keys.key_table),
        add_received_header=False,
    )
    sent: dict[str, bytes] = {}
    host, port = app.smtp_address
    for reason, make in CASES.items():
        message = make(dkim_keys)
        sent[f"{reason}@example.net"] = message
        await aiosmtplib.send(
            message,
            sender=ENVELOPE_SENDER,
            recipients=[f"{reason}@example.net"],
            hostname=host,
            port=port,
            start_tls=False,
        )
    await upstream.wait_for_transactions(len(sent), timeout_s=30)
    delivered = {t.rcpt_tos[0]: t.data for t in upstream.transactions}
    for recipient, message in sent.items():
        assert delivered[recipient] == message, recipient
    assert dkim.verify(sent["rewrite-failed@example.net"], dnsfunc=dkim_keys.dnsfunc)
    store = app.store
    assert store is not None
    records = {m.record.recipients[0]: m.record for m in await store.list_messages()}
    for reason in CASES:
        record = records[f"{reason}@example.net"]
        assert (record.tracked, record.not_tracked_reason) == (False, reason)
        if reason != "rewrite-failed":
            assert f"dkim={reason}: relaying the message as received" in caplog.text
