"""The cost of dkim_policy = "resign": messages per second through the rewrite, with
and without verify-then-resign, over the shared corpus; RSA 2048 and Ed25519.

Run: ``python bench/resign.py [--corpus DIR] [--rounds N]``

Every ``eml/`` message the rewrite tracks and every ``html/`` template (wrapped
quoted-printable, base64 and 8bit, as the corpus tests do) is signed first as
the sender's signer would (dkimpy, ``relaxed/simple``, ``From`` over-signed;
earlier signatures removed), once with a 2048-bit RSA key and once with an
Ed25519 key.  Then, per message, N rounds of:

- *rewrite*: :func:`smtp_tracker.mime.rewrite` alone (``dkim_policy = "track"``);
- *rewrite + resign*: the rewrite, then :meth:`Resigner.check` on the original
  (dkimpy verifies the signature against our key) and :meth:`Resigner.resign`
  on the rewritten message (OpenSSL signs, dkimpy verifies the new signature).

Reported: messages per second for each (total messages / total seconds, the
median round), and the time re-signing adds per message (median and p99).  For
comparison, dkimpy's own pure-Python RSA signing of the same messages (a sample).
The target (issue 13): at most 3 ms added per message with RSA 2048.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import statistics
import sys
import time
from pathlib import Path

# the repository instead of bench/ itself, whose dkim.py (this file) would hide dkimpy
sys.path.remove(str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from smtp_tracker.dkim import Keyring, Resigner, parse_key
from smtp_tracker.mime import RewritePolicy, rewrite
from tests.corpus import CORPUS_ENV, html_as_message

URL = "https://track.example.test/o/AAAAAAAAAAAAAAAAAAAAAA.gif"
DOMAIN = b"example.test"
POLICY = RewritePolicy(dkim_policy="track")
_DROP = re.compile(
    rb"(?im)^(dkim-signature|arc-[a-z-]+|authentication-results):.*(\r?\n[ \t].*)*\r?\n"
)


def load(root: Path) -> list[bytes]:
    """Every corpus message the rewrite tracks, templates wrapped three ways, CRLF."""
    messages = [p.read_bytes() for p in sorted((root / "eml").rglob("*")) if p.is_file()]
    for path in sorted((root / "html").rglob("*")):
        if path.is_file():
            for cte in ("quoted-printable", "base64", "8bit"):
                messages.append(html_as_message(path.read_bytes(), charset="utf-8", cte=cte))  # type: ignore[arg-type]
    kept = []
    for message in messages:
        message = re.sub(rb"\r?\n", b"\r\n", message)
        head, sep, body = message.partition(b"\r\n\r\n")
        message = _DROP.sub(b"", head + b"\r\n") + sep[2:] + body
        if message.startswith(b"From "):
            message = message.split(b"\r\n", 1)[1]
        try:
            dkim.rfc822_parse(message)
        except (dkim.MessageFormatError, IndexError):  # a header dkimpy cannot read
            continue
        if not re.search(rb"(?im)^from:", head):  # DKIM signs From (RFC 6376 §5.4)
            continue
        if rewrite(message, URL, POLICY, reverse_path="a@example.test").tracked:
            kept.append(message)
    return kept


def keys() -> tuple[Keyring, bytes, bytes]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    seed = base64.b64encode(
        ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    keyring = Keyring()
    keyring.keys[("example.test", "rsa")] = parse_key(
        pem, domain="example.test", selector="rsa", source="bench"
    )
    keyring.keys[("example.test", "ed")] = parse_key(
        seed, domain="example.test", selector="ed", source="bench"
    )
    return keyring, pem, seed


def sign(message: bytes, selector: bytes, key: bytes, algorithm: bytes) -> bytes:
    field = dkim.sign(
        message,
        selector,
        DOMAIN,
        key,
        signature_algorithm=algorithm,
        canonicalize=(b"relaxed", b"simple"),
    )
    return bytes(field) + message


def run(messages: list[bytes], resigner: Resigner | None) -> list[float]:
    """Seconds per message for the rewrite (and the re-sign when ``resigner``)."""
    times = []
    for message in messages:
        start = time.perf_counter()
        result = rewrite(message, URL, POLICY, reverse_path="a@example.test")
        if resigner is not None:
            check = resigner.check(message)
            if check.reason is not None:
                raise SystemExit(f"a message the bench signed does not verify: {check.reason}")
            resigner.resign(result.message, check)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=os.environ.get(CORPUS_ENV))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.corpus is None:
        parser.error(f"--corpus DIR or {CORPUS_ENV} is needed")
    messages = load(args.corpus)
    keyring, pem, seed = keys()
    resigner = Resigner(keyring)
    signed = {
        "RSA 2048": [sign(m, b"rsa", pem, b"rsa-sha256") for m in messages],
        "Ed25519": [sign(m, b"ed", seed, b"ed25519-sha256") for m in messages],
    }
    size = sum(len(m) for m in messages) / len(messages)
    print(f"{len(messages)} messages, mean {size / 1024:.1f} KiB, {args.rounds} rounds (median)")
    for name, batch in signed.items():
        plain = [run(batch, None) for _ in range(args.rounds)]
        resigned = [run(batch, resigner) for _ in range(args.rounds)]
        plain_s = statistics.median(sum(r) for r in plain)
        resigned_s = statistics.median(sum(r) for r in resigned)
        added = sorted(
            statistics.median(r[i] for r in resigned) - statistics.median(p[i] for p in plain)
            for i in range(len(batch))
        )
        print(
            f"{name:9} rewrite: {len(batch) / plain_s:7.0f} msg/s   "
            f"rewrite + resign: {len(batch) / resigned_s:7.0f} msg/s   "
            f"added per message: median {statistics.median(added) * 1000:.2f} ms, "
            f"p99 {added[int(0.99 * (len(added) - 1))] * 1000:.2f} ms"
        )
    sample = messages[:: max(1, len(messages) // 20)]
    start = time.perf_counter()
    for message in sample:
        dkim.sign(message, b"rsa", DOMAIN, pem, canonicalize=(b"relaxed", b"simple"))
    per = (time.perf_counter() - start) / len(sample)
    print(f"for comparison, dkimpy's pure-Python RSA 2048 signing: {per * 1000:.1f} ms a message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
