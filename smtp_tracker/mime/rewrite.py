"""The pixel rewrite: one tracking pixel in the HTML body, every other octet unchanged.

:func:`rewrite` reads the message with a byte-level MIME walker
(:mod:`~smtp_tracker.mime.structure`), decides whether it may be touched,
picks the HTML body (:mod:`~smtp_tracker.mime.selection`), decodes it
(:mod:`~smtp_tracker.mime.transfer`, :mod:`~smtp_tracker.mime.charset`),
finds where the pixel goes (:mod:`~smtp_tracker.mime.inject`), and edits the
original octets by offset: the control header field is cut out and the body
of that one part is replaced.  The :mod:`email` package is used only to read
header fields; the message is never serialised again, so header folding,
boundaries, preamble, epilogue and the other parts stay as they were.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from dataclasses import dataclass

from smtp_tracker.mime.charset import CharsetError, decode_text
from smtp_tracker.mime.disclosure import footer_for_part
from smtp_tracker.mime.inject import (
    InjectError,
    find_insertion,
    is_xhtml,
    pixel_tag,
    renders_at,
)
from smtp_tracker.mime.policy import RewritePolicy
from smtp_tracker.mime.selection import NotTracked, Selector
from smtp_tracker.mime.structure import Field, Part, read_part
from smtp_tracker.mime.transfer import (
    TransferEncoding,
    TransferError,
    decode,
    line_ending,
    parse_transfer_encoding,
    splice,
)

__all__ = ["RewriteResult", "rewrite"]

log = logging.getLogger("smtp_tracker.mime")

#: RFC 5322 §2.1.1: a line is at most 998 octets, without its CRLF.
MAX_LINE = 998
#: Codecs whose encoder keeps state: the pixel's octets depend on what precedes it.
_STATEFUL = frozenset(
    {"iso2022_jp", "iso2022_jp_1", "iso2022_jp_2", "iso2022_jp_2004", "iso2022_jp_3",
     "iso2022_jp_ext", "iso2022_kr", "utf-7", "hz"}
)  # fmt: skip
_COMMENT = re.compile(r"\([^()]*\)")


@dataclass(frozen=True, kw_only=True)
class RewriteResult:
    """What :func:`rewrite` did.

    :param message: the octets to relay.
    :param tracked: True iff exactly one pixel was added.
    :param reason: when not tracked, why (kebab-case): ``"no-html-body"``,
        ``"multipart-signed"``, ``"multipart-encrypted"``, ``"pkcs7-mime"``,
        ``"dkim-signed"``, ``"null-reverse-path"``, ``"report"``,
        ``"auto-submitted"``, ``"opt-out"``, ``"no-opt-in"``,
        ``"limits-exceeded"``, ``"html-too-large"``, ``"footer-not-placeable"``
        (the disclosure footer would not render where the pixel goes), a
        ``not_tracked`` reason given by the caller, or ``"rewrite-failed"``
        (the original octets, unchanged, control header included).
    :param defects: what was met on the way: email defect class names or
        short texts; never message content.
    """

    message: bytes
    tracked: bool
    reason: str | None
    defects: tuple[str, ...]


class _FailOpen(Exception):
    def __init__(self, defect: str) -> None:
        super().__init__(defect)
        self.defect = defect


def rewrite(
    message: bytes,
    pixel_url: str,
    policy: RewritePolicy = RewritePolicy(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    reverse_path: str | None = None,
    extra_html: str = "",
    not_tracked: str | None = None,
) -> RewriteResult:
    """Add one tracking pixel to the HTML body of ``message``.

    The pixel goes just before the closing ``</body>`` of the HTML part the
    recipient sees (else at the end of the fragment), decoded and re-encoded
    with the part's own charset and Content-Transfer-Encoding (RFC 2045 §6;
    quoted-printable and base64 lines at most 76 characters, §6.7, §6.8; no
    line over 998 octets added, RFC 5322 §2.1.1).  The ``policy.control_header``
    field is removed from the top-level header whatever the decision.

    Not tracked (octets unchanged but for the control header): a null
    reverse-path (bounces, RFC 5321 §4.5.5), ``<control_header>: no``, no
    ``yes`` when opt-in is required, ``Auto-Submitted`` other than ``no``
    (RFC 3834 §5), a top-level ``multipart/report`` (RFC 6522), a
    ``DKIM-Signature`` field unless ``policy.dkim_policy == "track"``
    (RFC 6376: the body hash would break), signed or encrypted parts on the
    way (RFC 1847, RFC 8551), bounds exceeded, no HTML body.

    Synchronous and CPU-bound: about one lxml parse of the HTML part, with
    nesting, part count and size bounded by ``policy``.

    :param message: the message as received (CRLF or LF line endings).
    :param pixel_url: the URL of this message's pixel.
    :param reverse_path: the envelope sender; None when unknown, ``""`` for
        the null reverse-path ``<>``.
    :param extra_html: the disclosure footer, spliced right before the pixel
        with the part's line endings (characters its charset lacks become
        character references); ``""`` for none.
    :param not_tracked: a reason decided before the content was read (the
        envelope's domain lists, :mod:`smtp_tracker.privacy`): the message is
        not tracked, for that reason, unless an earlier rule (null
        reverse-path, opt-out) applies; the control header is removed as usual.
    :returns: the result; never raises: on any internal error the original
        octets are returned unchanged with ``reason="rewrite-failed"`` and a
        warning is logged on ``smtp_tracker.mime`` (without message content).
    """
    try:
        return _Rewrite(
            bytes(message), pixel_url, policy, reverse_path, extra_html, not_tracked
        ).run()
    except Exception as exc:  # never raise: relay the original (fail open)
        frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f"{os.path.basename(frame[0].filename)}:{frame[0].lineno}" if frame else "?"
        log.warning("rewrite failed (%s at %s); relaying the original", type(exc).__name__, where)
        try:
            original = bytes(message)
        except Exception:  # not bytes-like at all: nothing to relay
            original = b""
        return RewriteResult(
            message=original, tracked=False, reason="rewrite-failed", defects=(type(exc).__name__,)
        )


class _Rewrite:
    def __init__(
        self,
        data: bytes,
        url: str,
        policy: RewritePolicy,
        reverse_path: str | None,
        extra_html: str = "",
        not_tracked: str | None = None,
    ) -> None:
        self.data = data
        self.url = url
        self.policy = policy
        self.reverse_path = reverse_path
        self.extra_html = extra_html
        self.not_tracked = not_tracked
        self.defects: list[str] = []

    def run(self) -> RewriteResult:
        top = read_part(self.data, 0, len(self.data))
        self.defects.extend(top.defects)
        name = self.policy.control_header.lower()
        control = [f for f in top.fields if f.name.lower() == name]
        cuts = [(f.start, f.end, b"") for f in control]
        try:
            part, body = self._decide(top, control)
        except NotTracked as decision:
            return self._result(cuts, decision.reason)
        except _FailOpen as failure:
            self.defects.append(failure.defect)
            log.info("not tracked: %s; relaying the original", failure.defect)
            return RewriteResult(
                message=self.data, tracked=False, reason="rewrite-failed", defects=self._defects()
            )
        return self._result([*cuts, (part.body_start, part.end, body)], None)

    def _defects(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.defects))

    def _result(self, edits: list[tuple[int, int, bytes]], reason: str | None) -> RewriteResult:
        out = bytearray()
        pos = 0
        for start, end, replacement in sorted(edits, key=lambda e: e[0]):
            out += self.data[pos:start]
            out += replacement
            pos = end
        out += self.data[pos:]
        return RewriteResult(
            message=bytes(out), tracked=reason is None, reason=reason, defects=self._defects()
        )

    # -- the decision ------------------------------------------------------------

    def _decide(self, top: Part, control: list[Field]) -> tuple[Part, bytes]:
        headers = top.headers
        votes = {_token(f.value) for f in control}
        if self.reverse_path is not None and self.reverse_path.strip() in ("", "<>"):
            raise NotTracked("null-reverse-path")
        if "no" in votes:
            raise NotTracked("opt-out")
        if self.not_tracked:
            raise NotTracked(self.not_tracked)
        if self.policy.tracking_requires_opt_in and "yes" not in votes:
            raise NotTracked("no-opt-in")
        if any(_token(str(v)) != "no" for v in headers.get_all("Auto-Submitted", [])):
            raise NotTracked("auto-submitted")
        if headers.get_content_type() == "multipart/report":
            raise NotTracked("report")
        if self.policy.dkim_policy == "skip" and headers.get_all("DKIM-Signature"):
            raise NotTracked("dkim-signed")
        part = Selector(self.data, self.policy, self.defects).select(top)
        if part is None:
            raise NotTracked("no-html-body")
        return part, self._rewrite_part(part)

    # -- the part ----------------------------------------------------------------

    def _rewrite_part(self, part: Part) -> bytes:
        raw = self.data[part.body_start : part.end]
        limit = self.policy.max_html_bytes
        if len(raw) > 3 * limit + 4096:  # "=XX" is the most any encoding spends on an octet
            raise NotTracked("html-too-large")
        cte = part.headers.get("Content-Transfer-Encoding")
        encoding, cte_defect = parse_transfer_encoding(None if cte is None else str(cte), raw)
        if cte_defect:
            self.defects.append(cte_defect)
        if encoding is None:
            raise _FailOpen("transfer-encoding-not-plausible")
        try:
            octets = decode(raw, encoding)
        except TransferError as exc:
            raise _FailOpen("undecodable-body") from exc
        if len(octets) > limit:
            raise NotTracked("html-too-large")
        if not octets.strip():
            raise NotTracked("no-html-body")
        try:
            decoded = decode_text(octets, part.headers.get_content_charset())
        except CharsetError as exc:
            raise _FailOpen("undecodable-charset") from exc
        self.defects.extend(decoded.defects)
        text = decoded.text
        xhtml = is_xhtml(text)
        eol = line_ending(raw, line_ending(self.data[: part.body_start]))
        extra = ""
        if self.extra_html:
            # RFC 2045 §6.7 rule 4: a line break in quoted-printable text is a
            # hard line break, which the one-line splice cannot add: a space then
            text_eol = line_ending(octets, eol).decode("ascii")
            if encoding is TransferEncoding.QUOTED_PRINTABLE:
                text_eol = " "
            extra = footer_for_part(self.extra_html, decoded.codec, text_eol)
        try:
            index = find_insertion(text, lambda url: pixel_tag(url, xhtml=xhtml))
            if extra and index is not None:
                footer_fits = renders_at(
                    text, index, lambda url: pixel_tag(url, xhtml=xhtml, extra_html=extra)
                )
                if not footer_fits:  # never a pixel without its disclosure
                    raise NotTracked("footer-not-placeable")
        except InjectError as exc:
            self.defects.append("html-parse-limit")
            raise NotTracked("limits-exceeded") from exc
        if index is None:
            self.defects.append("no-insertion-point")
            raise NotTracked("no-html-body")
        prefix = text[:index]
        tag = pixel_tag(self.url, xhtml=xhtml, extra_html=extra)
        offset, insert = _encode_at(prefix, tag, decoded.codec)
        if encoding is TransferEncoding.BASE64:
            for pad in (1, 2):
                if len(insert) % 3 == 0:
                    break
                tag = pixel_tag(self.url, xhtml=xhtml, pad=pad, extra_html=extra)
                offset, insert = _encode_at(prefix, tag, decoded.codec)
        elif encoding is TransferEncoding.IDENTITY and _adds_long_line(octets, offset, insert):
            tag = pixel_tag(self.url, xhtml=xhtml, newline=eol.decode("ascii"), extra_html=extra)
            offset, insert = _encode_at(prefix, tag, decoded.codec)
            if _adds_long_line(octets, offset, insert):
                raise _FailOpen("line-too-long")
        new_octets = octets[:offset] + insert + octets[offset:]
        try:
            body = splice(raw, encoding, offset, insert, newline=eol)
            same = decode(body, encoding) == new_octets
        except TransferError as exc:
            raise _FailOpen("splice-failed") from exc
        del octets
        if not same or not _spliced(new_octets.decode(decoded.codec), text, prefix, tag):
            raise _FailOpen("round-trip-mismatch")
        return body


def _spliced(new: str, old: str, prefix: str, tag: str) -> bool:
    """Whether ``new == prefix + tag + old[len(prefix):]`` (without building the right side)."""
    return (
        len(new) == len(old) + len(tag)
        and new.startswith(prefix)
        and new.startswith(tag, len(prefix))
        and new.endswith(old[len(prefix) :])
    )


def _encode_at(prefix: str, tag: str, codec: str) -> tuple[int, bytes]:
    """The octet offset of the end of ``prefix`` and the octets of ``tag`` there."""
    before = prefix.encode(codec)
    if codec in _STATEFUL or not tag.isascii():
        return len(before), (prefix + tag).encode(codec)[len(before) :]
    insert = tag.encode(codec)
    if codec.startswith(("utf-16", "utf-32")):
        insert = (prefix + tag).encode(codec)[len(before) :]  # no second byte order mark
    return len(before), insert


def _adds_long_line(octets: bytes, offset: int, insert: bytes) -> bool:
    """Whether inserting at ``offset`` makes a line over 998 octets where there was none."""
    start = octets.rfind(b"\n", 0, offset) + 1
    end = octets.find(b"\n", offset)
    end = len(octets) if end < 0 else end
    if _longest_line(octets[start:end]) > MAX_LINE:
        return False  # already too long: nothing new is introduced
    return _longest_line(octets[start:offset] + insert + octets[offset:end]) > MAX_LINE


def _longest_line(text: bytes) -> int:
    return max(len(line.removesuffix(b"\r")) for line in text.split(b"\n"))


def _token(value: str) -> str:
    """The first word of a field value, comments dropped, lowercased: ``" Yes (x)"`` → ``yes``."""
    words = _COMMENT.sub(" ", value).replace(";", " ").split()
    return words[0].lower() if words else ""
