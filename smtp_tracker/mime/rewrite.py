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

With click tracking (:mod:`~smtp_tracker.mime.links`), the ``href`` values of
the links to wrap are replaced in the same pass: all the edits of the part are
computed on the decoded text, then spliced at once
(:func:`~smtp_tracker.mime.transfer.splice_edits`) and checked by decoding
the result again.
"""

from __future__ import annotations

import bisect
import codecs
import logging
import os
import re
import traceback
import urllib.parse
from dataclasses import dataclass
from html import escape

from smtp_tracker.mime import deadline
from smtp_tracker.mime.charset import CharsetError, decode_text
from smtp_tracker.mime.disclosure import footer_for_part
from smtp_tracker.mime.inject import (
    InjectError,
    find_insertion,
    find_start_insertion,
    is_xhtml,
    pixel_tag,
    renders_at,
)
from smtp_tracker.mime.links import (
    Href,
    LinkRules,
    find_html_links,
    find_text_links,
    list_unsubscribe_urls,
)
from smtp_tracker.mime.policy import AUTO_BOTH_HTML_BYTES, RewritePolicy
from smtp_tracker.mime.selection import NotTracked, Selector
from smtp_tracker.mime.structure import Field, Part, read_part
from smtp_tracker.mime.transfer import (
    TransferEncoding,
    TransferError,
    apply_edits,
    decode,
    line_ending,
    parse_transfer_encoding,
    splice,
    splice_edits,
)
from smtp_tracker.tokens import LinkRecord, click_url, new_link_token

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
    :param tracked: True iff the pixel was added (:attr:`pixels` elements).
    :param reason: when not tracked, why (kebab-case): ``"no-html-body"``,
        ``"html-after-text-in-mixed"`` (the only HTML part comes after a
        first part that is not HTML in ``multipart/mixed``: see
        :mod:`~smtp_tracker.mime.selection`),
        ``"multipart-signed"``, ``"multipart-encrypted"``, ``"pkcs7-mime"``,
        ``"dkim-signed"``, ``"null-reverse-path"``, ``"report"``,
        ``"auto-submitted"``, ``"opt-out"``, ``"no-opt-in"``,
        ``"limits-exceeded"``, ``"html-too-large"``, ``"footer-not-placeable"``
        (the disclosure footer would not render where the pixel goes), a
        ``not_tracked`` reason given by the caller, ``"rewrite-failed"``
        (the original octets, unchanged, control header included), or
        ``"rewrite-timeout"`` (``policy.time_limit_s`` passed; the original
        octets too).
    :param defects: what was met on the way: email defect class names or
        short texts; never message content.
    :param links: the links wrapped for click tracking, in the order of the
        message (HTML body first), each with its token and destination; empty
        unless tracked.
    :param pixels: pixel elements added: 0 unless tracked; 2 with
        ``policy.pixel_position`` ``"both"`` (or ``"auto"`` on a large body)
        where the body has a start place, both with the same URL.
    """

    message: bytes
    tracked: bool
    reason: str | None
    defects: tuple[str, ...]
    links: tuple[LinkRecord, ...] = ()
    pixels: int = 0


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
    click_base_url: str | None = None,
    log_timeout: bool = True,
) -> RewriteResult:
    """Add one tracking pixel to the HTML body of ``message``, and wrap its links.

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
        envelope's domain lists, :mod:`smtp_tracker.tracking.domains`): the message is
        not tracked, for that reason, unless an earlier rule (null
        reverse-path, opt-out) applies; the control header is removed as usual.
    :param click_base_url: with ``policy.track_clicks``, the base of the click
        URLs (``<click_base_url>/c/<token>``): in the same pass as the pixel,
        the value of each ``href`` that :class:`~smtp_tracker.mime.links.LinkRules`
        lets be wrapped is replaced by a click URL with a fresh token (each
        occurrence its own), every other character unchanged; with
        ``policy.track_text_links`` the URLs of the ``text/plain``
        alternatives too.  When the links cannot be wrapped exactly, the
        pixel goes in alone (a defect says why).
    :param log_timeout: log a warning when ``policy.time_limit_s`` (or an
        enclosing :func:`.deadline.time_limit`) stops the rewrite; False for a
        caller that does not relay the original then but tries again (the
        tracking stage's first attempt on the event loop).
    :returns: the result; never raises: on any internal error the original
        octets are returned unchanged with ``reason="rewrite-failed"`` and a
        warning is logged on ``smtp_tracker.mime`` (without message content).
    """
    try:
        with deadline.time_limit(policy.time_limit_s):
            return _Rewrite(
                bytes(message),
                pixel_url,
                policy,
                reverse_path,
                extra_html,
                not_tracked,
                click_base_url,
            ).run()
    except deadline.TimeLimitExceeded:
        if log_timeout:
            log.warning(
                "rewrite stopped after %g s (time_limit_s); relaying the original",
                policy.time_limit_s,
            )
        return RewriteResult(
            message=bytes(message), tracked=False, reason="rewrite-timeout", defects=("time-limit",)
        )
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
        click_base_url: str | None = None,
    ) -> None:
        self.data = data
        self.url = url
        self.policy = policy
        self.reverse_path = reverse_path
        self.extra_html = extra_html
        self.not_tracked = not_tracked
        self.click_base_url = click_base_url
        self.defects: list[str] = []
        self.rules: LinkRules | None = None
        self.links: list[tuple[str, str]] = []  # (token, url) of each wrapped link
        self.part_edits: list[tuple[int, int, bytes]] = []  # text/plain parts rewritten
        self.pixels = 1  # pixel elements in the rewritten part

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
        return self._result([*cuts, (part.body_start, part.end, body), *self.part_edits], None)

    def _defects(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.defects))

    def _result(self, edits: list[tuple[int, int, bytes]], reason: str | None) -> RewriteResult:
        """The message with ``edits`` (``(start, end, replacement)``) made.

        One copy when there are edits (a join of views into the message), none
        when there are not: the message as received is the result (issue 15:
        a large untracked message was copied twice here).
        """
        message = self.data
        if edits:
            view = memoryview(self.data)
            pieces: list[bytes | memoryview] = []
            pos = 0
            for start, end, replacement in sorted(edits, key=lambda e: e[0]):
                pieces += (view[pos:start], replacement)
                pos = end
            pieces.append(view[pos:])
            message = b"".join(pieces)
        links = tuple(
            LinkRecord(token=token, url=url, position=position)
            for position, (token, url) in enumerate(self.links if reason is None else ())
        )
        return RewriteResult(
            message=message,
            tracked=reason is None,
            reason=reason,
            defects=self._defects(),
            links=links,
            pixels=self.pixels if reason is None else 0,
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
        deadline.check()
        selector = Selector(self.data, self.policy, self.defects)
        part = selector.select(top)
        deadline.check()
        if part is None:
            raise NotTracked("no-html-body")
        if self.policy.track_clicks and self.click_base_url:
            self.rules = self.policy.link_rules(
                own_host=urllib.parse.urlsplit(self.click_base_url).hostname,
                unsubscribe_urls=list_unsubscribe_urls(headers),
            )
        body = self._rewrite_part(part)
        if self.rules is not None and self.policy.track_text_links:
            for text_part in selector.text_alternatives:
                deadline.check()
                text_body = self._wrap_text_part(text_part)
                if text_body is not None:
                    self.part_edits.append((text_part.body_start, text_part.end, text_body))
        return part, body

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
            octets = decode(raw, encoding, self.defects)
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
        start = self._start_index(text, xhtml, len(octets), index, decoded.canonical)
        if start is not None:
            both = self.policy.pixel_position != "start"
            body = self._splice_pixels(
                raw, encoding, eol, octets, text, decoded.codec, xhtml, extra, start, index, both
            )
            if body is not None:
                self.pixels = 2 if both else 1
                return body
            self.defects.append("pixel-start-splice-failed")  # the end alone, then
        prefix = text[:index]
        tag = pixel_tag(self.url, xhtml=xhtml, extra_html=extra)
        if not decoded.canonical:  # UTF-7 whose markup another encoder put in base64
            return self._splice_utf7(raw, encoding, eol, octets, text, index, xhtml, extra)
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
        if self.rules is not None:
            wrapped = self._wrap_links(
                raw, encoding, eol, octets, text, decoded.codec, [(index, tag, offset, insert)]
            )
            if wrapped is not None:
                return wrapped
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

    def _start_index(
        self, text: str, xhtml: bool, size: int, end: int, canonical: bool
    ) -> int | None:
        """Where the start pixel goes (``policy.pixel_position``), or None for the end alone.

        ``"auto"`` is ``"both"`` for a decoded body over
        :data:`~.policy.AUTO_BOTH_HTML_BYTES` octets.  No start place (no
        opening ``<body>`` where a probe renders, or UTF-7 that is not
        Python's own): defect ``pixel-start-not-placeable``, the end alone.
        """
        position = self.policy.pixel_position
        if position == "auto":
            position = "both" if size > AUTO_BOTH_HTML_BYTES else "end"
        if position == "end":
            return None
        start: int | None = None
        if canonical:
            try:
                start = find_start_insertion(text, lambda url: pixel_tag(url, xhtml=xhtml))
            except InjectError:
                start = None
        if start is None or start > end:
            self.defects.append("pixel-start-not-placeable")
            return None
        return start

    def _splice_pixels(
        self,
        raw: bytes,
        encoding: TransferEncoding,
        eol: bytes,
        octets: bytes,
        text: str,
        codec: str,
        xhtml: bool,
        extra: str,
        start: int,
        end: int,
        both: bool,
    ) -> bytes | None:
        """The body with a pixel at ``text[start]`` and, when *both*, one at ``text[end]``.

        The disclosure footer stays before the end place (with the end pixel,
        or alone).  Spliced in one pass (:func:`~.transfer.splice_edits`, with
        the links when clicks are tracked) and checked: the decoded octets and
        text must be the old ones with exactly these insertions.  None when it
        cannot be done exactly (the caller puts the end pixel alone).
        """
        forms = ("", eol.decode("ascii")) if encoding is TransferEncoding.IDENTITY else ("",)
        for newline in forms:
            first = pixel_tag(self.url, xhtml=xhtml, newline=newline)
            last = pixel_tag(self.url, xhtml=xhtml, newline=newline, extra_html=extra)
            places = [(start, first)]
            if both or extra:
                places.append((end, last if both else extra))
            pixels = [(index, tag, *_encode_at(text[:index], tag, codec)) for index, tag in places]
            if encoding is not TransferEncoding.IDENTITY or not any(
                _adds_long_line(octets, offset, insert) for _, _, offset, insert in pixels
            ):
                break
        else:
            return None
        if self.rules is not None:
            wrapped = self._wrap_links(raw, encoding, eol, octets, text, codec, pixels)
            if wrapped is not None:
                return wrapped
        octet_edits = [(offset, offset, insert) for _, _, offset, insert in pixels]
        text_edits = [(index, index, tag) for index, tag, _, _ in pixels]
        try:
            body = splice_edits(raw, encoding, octet_edits, newline=eol)
            new_octets = apply_edits(octets, octet_edits)
            same = decode(body, encoding) == new_octets
            same = same and new_octets.decode(codec) == apply_edits(text, text_edits)
        except (TransferError, UnicodeError):
            return None
        return body if same else None

    def _splice_utf7(
        self,
        raw: bytes,
        encoding: TransferEncoding,
        eol: bytes,
        octets: bytes,
        text: str,
        index: int,
        xhtml: bool,
        extra: str,
    ) -> bytes:
        """The body with the pixel at ``text[index]`` of UTF-7 that is not Python's own.

        The place is found in the octets (:func:`_utf7_edit`): in a run of
        directly written characters, the pixel goes in as it is; inside a
        base64 run (``+AD4APA-`` for ``><``), that run alone is written again,
        split around the pixel.  No link is wrapped in UTF-7 (see ``_plan``).
        """
        tag = pixel_tag(self.url, xhtml=xhtml, extra_html=extra)
        try:
            edit = _utf7_edit(octets, index, tag)
            if encoding is TransferEncoding.IDENTITY and _edit_adds_long_line(octets, edit):
                newline = eol.decode("ascii")
                tag = pixel_tag(self.url, xhtml=xhtml, newline=newline, extra_html=extra)
                edit = _utf7_edit(octets, index, tag)
                if _edit_adds_long_line(octets, edit):
                    raise _FailOpen("line-too-long")
            new_octets = apply_edits(octets, [edit])
            body = splice_edits(raw, encoding, [edit], newline=eol)
            same = decode(body, encoding) == new_octets
            new_text = new_octets.decode("utf-7")
        except (TransferError, UnicodeError, ValueError) as exc:
            raise _FailOpen("splice-failed") from exc
        if not same or not _spliced(new_text, text, text[:index], tag):
            raise _FailOpen("round-trip-mismatch")
        return body

    # -- click tracking ----------------------------------------------------------

    def _wrap_links(
        self,
        raw: bytes,
        encoding: TransferEncoding,
        eol: bytes,
        octets: bytes,
        text: str,
        codec: str,
        pixels: list[tuple[int, str, int, bytes]],
    ) -> bytes | None:
        """The HTML body with the pixels (``(index, tag, offset, insert)`` each) and
        the wrapped links in one splice, or None when there is nothing to wrap
        or it cannot be done exactly (the pixels then go in alone)."""
        if len(octets) > self.policy.max_click_html_bytes:
            self.defects.append("links-html-too-large")
            return None
        deadline.check()
        found, defect = find_html_links(text)
        if defect:
            self.defects.append(defect)
        inserts = [(offset, insert) for _, _, offset, insert in pixels]
        plan = self._plan(found, text, octets, codec, encoding, html=True, pixels=inserts)
        if not plan:
            return None
        body = self._splice_plan(raw, encoding, eol, octets, text, codec, plan, pixels)
        if body is None:
            self.defects.append("links-splice-failed")
        return body

    def _wrap_text_part(self, part: Part) -> bytes | None:
        """A ``text/plain`` alternative with its URLs wrapped, or None to leave it as it is."""
        raw = self.data[part.body_start : part.end]
        cte = part.headers.get("Content-Transfer-Encoding")
        encoding, _defect = parse_transfer_encoding(None if cte is None else str(cte), raw)
        if encoding is None or len(raw) > 3 * self.policy.max_click_html_bytes + 4096:
            return None
        try:
            octets = decode(raw, encoding)
            if len(octets) > self.policy.max_click_html_bytes:
                self.defects.append("links-text-too-large")
                return None
            decoded = decode_text(octets, part.headers.get_content_charset())
        except (TransferError, CharsetError):
            self.defects.append("text-links-undecodable")
            return None
        text = decoded.text
        plan = self._plan(find_text_links(text), text, octets, decoded.codec, encoding, html=False)
        if not plan:
            return None
        eol = line_ending(raw, line_ending(self.data[: part.body_start]))
        body = self._splice_plan(raw, encoding, eol, octets, text, decoded.codec, plan, [])
        if body is None:
            self.defects.append("text-links-splice-failed")
        return body

    def _plan(
        self,
        found: list[Href],
        text: str,
        octets: bytes,
        codec: str,
        encoding: TransferEncoding,
        *,
        html: bool,
        pixels: list[tuple[int, bytes]] | None = None,
    ) -> list[_Wrap]:
        """The links of ``found`` to wrap, each with its token and octets."""
        assert self.rules is not None and self.click_base_url is not None
        chosen = []
        for number, link in enumerate(found):
            if number % 1024 == 0:
                deadline.check()
            if self.rules.skip_reason(link) is None:
                chosen.append(link)
        if not chosen:
            return []
        if len(self.links) + len(chosen) > self.policy.max_links:
            self.defects.append("links-too-many")
            return []
        if codec.startswith(("utf-16", "utf-32")) or (
            codec in _STATEFUL and not codec.startswith("iso2022")
        ):
            self.defects.append("links-charset-unsupported")
            return []
        points = _octet_offsets(text, codec, [p for link in chosen for p in (link.start, link.end)])
        plan: list[_Wrap] = []
        for number, link in enumerate(chosen):
            start, end = points[2 * number], points[2 * number + 1]
            if octets[start:end] != text[link.start : link.end].encode(codec):
                self.defects.append("links-offsets-mismatch")
                return []
            token = new_link_token()
            value = click_url(self.click_base_url, token)
            if html:  # an attribute value in any quoting
                value = escape(value, quote=True)
            plan.append(_Wrap(link, token, value, start, end, value.encode(codec)))
        if encoding is TransferEncoding.IDENTITY:
            fitting = _fit_lines(octets, plan, pixels or [])
            if len(fitting) < len(plan):
                self.defects.append("links-line-too-long")
            plan = fitting
        return plan

    def _splice_plan(
        self,
        raw: bytes,
        encoding: TransferEncoding,
        eol: bytes,
        octets: bytes,
        text: str,
        codec: str,
        plan: list[_Wrap],
        pixels: list[tuple[int, str, int, bytes]],
    ) -> bytes | None:
        """The body with the links of ``plan`` (and the pixels) spliced, checked, or None."""
        if not plan:
            return None
        octet_edits = [(w.start, w.end, w.new) for w in plan]
        text_edits = [(w.link.start, w.link.end, w.value) for w in plan]
        if pixels:
            octet_edits = sorted(
                [*octet_edits, *((offset, offset, insert) for _, _, offset, insert in pixels)],
                key=_first,
            )
            text_edits = sorted(
                [*text_edits, *((index, index, tag) for index, tag, _, _ in pixels)], key=_first
            )
        deadline.check()
        new_octets = apply_edits(octets, octet_edits)
        try:
            body = splice_edits(raw, encoding, octet_edits, newline=eol)
            same = decode(body, encoding) == new_octets
            same = same and new_octets.decode(codec) == apply_edits(text, text_edits)
        except (TransferError, UnicodeError):
            return None
        if not same:
            return None
        self.links.extend((w.token, w.link.url) for w in plan)
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


#: A UTF-7 base64 run: "+", modified base64, and the "-" that may end it (RFC 2152).
_UTF7_RUN = re.compile(rb"\+[A-Za-z0-9+/]*-?")


def _utf7_edit(octets: bytes, index: int, tag: str) -> tuple[int, int, bytes]:
    """The edit of UTF-7 ``octets`` that puts ``tag`` before their ``index``-th character.

    Directly written characters are one octet each; each base64 run is decoded
    on its own (a run ends the shift state).  Between characters written
    directly (or before a run) the tag's octets are inserted; inside a run,
    the run is replaced by its characters before the place, the tag and its
    characters after, each encoded by Python (which ends each piece back in
    the direct state).

    :returns: ``(start, end, new)``: ``octets[start:end]`` becomes ``new``.
    :raises ValueError: when ``index`` is past the end, or a run does not decode.
    """
    insert = tag.encode("utf-7")
    chars = 0
    pos = 0
    for match in _UTF7_RUN.finditer(octets):
        direct = match.start() - pos
        if index <= chars + direct:
            at = pos + index - chars
            return at, at, insert
        chars += direct
        run = codecs.utf_7_decode(match.group(), "strict", True)[0]
        if index < chars + len(run):
            cut = index - chars
            new = run[:cut].encode("utf-7") + insert + run[cut:].encode("utf-7")
            return match.start(), match.end(), new
        chars += len(run)
        pos = match.end()
    at = pos + index - chars
    if at > len(octets):
        raise ValueError("index past the end of the text")
    return at, at, insert


def _edit_adds_long_line(octets: bytes, edit: tuple[int, int, bytes]) -> bool:
    """Whether replacing ``octets[start:end]`` by ``new`` makes a line over 998 octets."""
    start, end, new = edit
    first = octets.rfind(b"\n", 0, start) + 1
    last = octets.find(b"\n", end)
    last = len(octets) if last < 0 else last
    if _longest_line(octets[first:last]) > MAX_LINE:
        return False  # already too long: nothing new is introduced
    return _longest_line(octets[first:start] + new + octets[end:last]) > MAX_LINE


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


@dataclass(frozen=True, slots=True)
class _Wrap:
    """A link to wrap: ``octets[start:end]`` (its ``href`` value or URL) becomes ``new``."""

    link: Href
    token: str
    value: str
    start: int
    end: int
    new: bytes


def _first(edit: tuple[int, int, object]) -> int:
    return edit[0]


def _octet_offsets(text: str, codec: str, points: list[int]) -> list[int]:
    """The octet offsets of the character offsets ``points`` (ascending) in ``text``.

    Encoded piece by piece: exact for stateless codecs, and for ISO-2022
    wherever the character before each point is ASCII (the caller checks).
    """
    offsets: list[int] = []
    pos = 0
    total = 0
    for point in points:
        total += len(text[pos:point].encode(codec))
        pos = point
        offsets.append(total)
    return offsets


def _fit_lines(octets: bytes, plan: list[_Wrap], pixels: list[tuple[int, bytes]]) -> list[_Wrap]:
    """The links of ``plan`` whose wrapping adds no line over 998 octets (RFC 5322 §2.1.1).

    A 7bit/8bit body is spliced as it is: a longer URL lengthens its line.  On
    a line that would go over the limit, none of the links is wrapped; values
    holding a line break are never wrapped there.
    """
    newlines = [m.start() for m in re.finditer(b"\n", octets)]

    def line(offset: int) -> int:
        return bisect.bisect_left(newlines, offset)

    def length(number: int) -> int:
        start = newlines[number - 1] + 1 if number else 0
        end = newlines[number] if number < len(newlines) else len(octets)
        return end - start - (1 if end > start and octets[end - 1] == 0x0D else 0)

    growth: dict[int, int] = {}
    candidates = [w for w in plan if b"\n" not in octets[w.start : w.end]]
    for wrap in candidates:
        number = line(wrap.start)
        growth[number] = growth.get(number, 0) + len(wrap.new) - (wrap.end - wrap.start)
    for offset, insert in pixels:
        number = line(offset)
        growth[number] = growth.get(number, 0) + len(insert)
    too_long = {
        number
        for number, grown in growth.items()
        if grown > 0 and length(number) <= MAX_LINE < length(number) + grown
    }
    return [w for w in candidates if line(w.start) not in too_long]
