"""Verify-then-resign: a DKIM signature that survives the pixel rewrite.

For a message whose every ``DKIM-Signature`` is by a key we hold and verifies
(checked on the original octets against the public half of that key, so no DNS
query is made and nothing we did not sign is ever laundered), each signature is
computed anew over the rewritten message with the same tags: ``d=``, ``s=``,
``a=``, ``c=``, ``h=`` (over-signed names included), ``i=``, ``t=`` and the rest
are copied, only ``bh=`` and ``b=`` change (RFC 6376 §3.5).  The new field takes
the old one's place; other fields and their order stay as they were.

dkimpy does the canonicalization (RFC 6376 §3.4), the header selection and
hashing (§5.4.2, its ``hash_headers``) and every verification; the private-key
operation is OpenSSL's (:meth:`DkimKey.sign_digest`), about twenty times faster
than dkimpy's pure-Python RSA.  Each new signature is verified with dkimpy before
it is used: a re-sign that does not verify is never sent.

A message is not re-signed (:attr:`Check.reason`) when it carries a signature
that does not verify (``dkim-invalid``; ``rsa-sha1`` counts, RFC 8301 §3.1), a
signature by a ``d=``/``s=`` we hold no key for (``dkim-foreign``), a body
length tag ``l=`` (``dkim-length-tag``), or an ARC set (``arc-sealed``: a seal
over the original cannot be made anew by us, RFC 8617).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from dataclasses import dataclass

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from smtp_tracker.dkim.keys import DkimKey
from smtp_tracker.dkim.tables import Keyring

__all__ = ["Check", "ResignError", "Resigner"]

#: dkimpy logs what it finds at ERROR; the outcome is ours to report.
_DKIMPY_LOG = logging.getLogger("smtp_tracker.dkim.dkimpy")
_DKIMPY_LOG.propagate = False
_DKIMPY_LOG.addHandler(logging.NullHandler())

_SIGNATURE = b"dkim-signature"
_ARC = frozenset({b"arc-seal", b"arc-message-signature", b"arc-authentication-results"})
#: A header field's name, as dkimpy's rfc822_parse reads it.
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_TAG = re.compile(rb"(\s*)([A-Za-z][A-Za-z0-9_]*)(\s*=)(.*?)(\s*)\Z", re.DOTALL)
#: Columns of base64 per folded line of ``b=``.
_B64_COLUMNS = 72


class ResignError(Exception):
    """A re-sign that could not be made or did not verify; the original goes on."""


@dataclass(frozen=True, slots=True)
class Check:
    """What the original message's signatures allow.

    :ivar signatures: how many ``DKIM-Signature`` fields it has.
    :ivar reason: why it may not be re-signed (``dkim-invalid``, ``dkim-foreign``,
        ``dkim-length-tag``, ``arc-sealed``), or None when it may.
    :ivar keys: the key of each signature, top to bottom (when it may).
    """

    signatures: int
    reason: str | None = None
    keys: tuple[DkimKey, ...] = ()


def _fields(message: bytes) -> list[tuple[bytes, int, int]]:
    """Each header field's lower-case name and ``message[start:end]`` span (with its
    line ending), split into lines as dkimpy's ``rfc822_parse`` does."""
    fields: list[tuple[bytes, int, int]] = []
    pos, size = 0, len(message)
    while pos < size:
        newline = message.find(b"\n", pos)
        end = size if newline < 0 else newline + 1
        line = message[pos:end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1] = (fields[-1][0], fields[-1][1], end)
        else:
            match = _FIELD_NAME.match(line)
            if match is not None:
                fields.append((match.group(1).lower(), pos, end))
            elif not line.startswith(b"From "):
                break  # dkimpy refuses such a header; the verification will say so
        pos = end
    return fields


def _parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse`` of ``message``: its header fields and its body.

    dkimpy splits the whole message into lines and joins the body again; for a
    message with CRLF line ends only (as the relay passes them on) the body is
    the octets after the blank line, and only the header section is split
    (a third of the re-signing time on the corpus went to splitting bodies).
    """
    end = message.find(b"\r\n\r\n")
    if end < 0 or message.count(b"\n") != message.count(b"\r\n"):
        headers, body = dkim.rfc822_parse(message)
        return headers, body
    headers, _ = dkim.rfc822_parse(message[: end + 4])
    return headers, message[end + 4 :]


class Resigner:
    """Checks and re-signs messages with the keys of a :class:`Keyring`.

    Thread-safe: it keeps no state between calls.
    """

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._records = {
            f"{key.selector}._domainkey.{key.domain}.": key.dns_record()
            for key in keyring.keys.values()
        }

    def _dns(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: our own keys' records, never a DNS query."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        return self._records.get(text.lower())

    def check(self, message: bytes) -> Check:
        """Whether the signatures of ``message`` (the original) may be made anew.

        :returns: the :class:`Check`; never raises for malformed input (that is
            ``dkim-invalid``).
        """
        fields = _fields(message)
        signatures = [f for f in fields if f[0] == _SIGNATURE]
        if not signatures:
            return Check(0)
        try:
            parsed = _parse(message)
        except (dkim.DKIMException, IndexError):  # a header section dkimpy cannot read
            return Check(len(signatures), "dkim-invalid")
        count = len(signatures)
        if any(f[0] in _ARC for f in fields):
            return Check(count, "arc-sealed")
        tags: list[dict[bytes, bytes]] = []
        for _, start, end in signatures:
            value = message[start:end].split(b":", 1)[1]
            try:
                tags.append(parse_tag_value(value))
            except InvalidTagValueList:
                return Check(count, "dkim-invalid")
        if any(b"l" in t for t in tags):
            return Check(count, "dkim-length-tag")
        if any(b"d" not in t or b"s" not in t or b"b" not in t for t in tags):
            return Check(count, "dkim-invalid")  # RFC 6376 §3.5: required tags
        keys: list[DkimKey] = []
        for t in tags:
            domain = t.get(b"d", b"").decode("ascii", "replace")
            selector = t.get(b"s", b"").decode("ascii", "replace")
            key = self._keyring.find(domain, selector)
            if key is None:
                return Check(count, "dkim-foreign")
            keys.append(key)
        for index, (t, key) in enumerate(zip(tags, keys, strict=True)):
            if t.get(b"a", b"").strip().lower() != key.algorithm.encode():
                return Check(count, "dkim-invalid")
            if not self._verifies(parsed, index):
                return Check(count, "dkim-invalid")
        return Check(count, None, tuple(keys))

    def _verifies(self, parsed: tuple[list[list[bytes]], bytes], index: int) -> bool:
        """dkimpy's verification of signature ``index`` of the parsed message."""
        try:
            verifier = dkim.DKIM(None, logger=_DKIMPY_LOG, minkey=1024)
            # what set_message(message) sets, from the parse we already have
            verifier.headers = [list(field) for field in parsed[0]]
            verifier.body = parsed[1]
            return bool(verifier.verify(idx=index, dnsfunc=self._dns))
        except (dkim.DKIMException, ValueError, IndexError, KeyError, TypeError):
            return False

    def resign(self, message: bytes, check: Check) -> bytes:
        """Sign ``message`` (the rewritten one) anew for each signature ``check`` allowed.

        :param check: :meth:`check` of the original, with no reason.
        :returns: the message with each ``DKIM-Signature`` field replaced in place.
        :raises ResignError: when the fields no longer match the check, or a new
            signature does not verify (the caller relays the original).
        """
        if check.reason is not None or not check.keys:
            raise ResignError("nothing to re-sign")
        # bottom up: a signer adds its field on top, so a lower one is older
        for index in reversed(range(len(check.keys))):
            message = self._resign_one(message, index, check.keys[index])
        try:
            parsed = _parse(message)
        except (dkim.DKIMException, IndexError):
            raise ResignError("the re-signed message no longer parses") from None
        for index in range(len(check.keys)):
            if not self._verifies(parsed, index):
                raise ResignError(f"the new signature {index} does not verify")
        return message

    def _resign_one(self, message: bytes, index: int, key: DkimKey) -> bytes:
        signatures = [f for f in _fields(message) if f[0] == _SIGNATURE]
        if len(signatures) <= index:
            raise ResignError("the rewritten message lost a DKIM-Signature field")
        _, start, end = signatures[index]
        raw = message[start:end]
        colon = raw.index(b":")
        name, value = raw[:colon], raw[colon + 1 :]
        try:
            tags = parse_tag_value(value)
            canon = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
            headers, body = _parse(message)
        except (
            InvalidTagValueList,
            InvalidCanonicalizationPolicyError,
            dkim.DKIMException,
            IndexError,
        ):
            raise ResignError("the signature or header no longer parses") from None
        linesep = b"\r\n" if raw.endswith(b"\r\n") else b"\n"
        body_hash = base64.b64encode(hashlib.sha256(canon.canonicalize_body(body)).digest())
        segments = value.split(b";")
        b_at: int | None = None
        for i, segment in enumerate(segments):
            match = _TAG.match(segment)
            if match is None:
                continue
            lead, tag, equals, _, trail = match.groups()
            if tag == b"bh":
                segments[i] = lead + tag + equals + body_hash + trail
            elif tag == b"b":
                segments[i] = lead + tag + equals + trail
                b_at = i
        if b_at is None:
            raise ResignError("the signature has no b= tag")
        template = b";".join(segments)
        # the header list as the verifier will see it: this field with b= empty
        positions = [i for i, (n, _) in enumerate(headers) if n.lower() == _SIGNATURE]
        headers[positions[index]] = [headers[positions[index]][0], template]
        include = [h.lower() for h in re.split(rb"\s*:\s*", tags[b"h"].strip()) if h]
        hasher = hashlib.sha256()
        dkim.hash_headers(
            hasher, canon, canon.canonicalize_headers(headers), include, (name, template), tags
        )
        signature = base64.b64encode(key.sign_digest(hasher.digest()))
        lead_match = _TAG.match(segments[b_at])
        assert lead_match is not None
        lead, tag, equals, _, trail = lead_match.groups()
        before = name + b":" + b";".join([*segments[:b_at], lead + tag + equals])
        column = len(before) - (before.rfind(b"\n") + 1)
        first = max(8, 76 - column)
        chunks = [signature[:first]] + [
            signature[i : i + _B64_COLUMNS] for i in range(first, len(signature), _B64_COLUMNS)
        ]
        segments[b_at] = lead + tag + equals + (linesep + b"\t").join(chunks) + trail
        field = name + b":" + b";".join(segments)
        return message[:start] + field + message[end:]
