"""Which part is the HTML body the recipient sees, and what forbids touching it.

RFC 2046 §5.1.3 (``multipart/mixed``: the first body part; unknown subtypes
are read as mixed), §5.1.4 (``multipart/alternative``: the last alternative is
the richest one), RFC 2387 (``multipart/related``: the root is the part named
by ``start``, else the first).  Attachments and attached messages
(``message/*``) are never entered.  RFC 1847 signed and encrypted multiparts
and S/MIME ``application/pkcs7-mime`` (RFC 8551 §3.2) on the way stop the
search: any change would break the signature or is impossible.

An HTML part shown after a first part that is not HTML in ``multipart/mixed``
(``text/plain`` then ``text/html``, as several corpus messages have it) is
not the body and is left untracked, with its own reason,
``"html-after-text-in-mixed"`` (issue 19, item 6): RFC 2046 §5.1.3 gives the
parts of a mixed entity no order of importance, and readers disagree on
showing it: Thunderbird and Apple Mail show it inline after the text, Outlook
lists it as an attachment (``ATT00001.htm``), so the pixel would go into what
its reader sees as a file, and be fetched only if they opened that.
"""

from __future__ import annotations

from collections.abc import Iterator
from email.utils import collapse_rfc2231_value

from smtp_tracker.mime.policy import RewritePolicy
from smtp_tracker.mime.structure import Part, iter_children

__all__ = ["NotTracked", "Selector"]

_PKCS7 = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})


class NotTracked(Exception):
    """The message is to be relayed without a pixel, for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Selector:
    """Finds the HTML body part within the bounds of a policy.

    :param data: the whole message.
    :param policy: ``max_depth`` and ``max_parts`` bound the walk.
    :param defects: list the structural defects met are appended to.
    """

    def __init__(self, data: bytes, policy: RewritePolicy, defects: list[str]) -> None:
        self._data = data
        self._policy = policy
        self._defects = defects
        self._parts = 1
        #: After :meth:`select`: the ``text/plain`` alternatives (RFC 2046 §5.1.4)
        #: of the HTML body found, outermost last.
        self.text_alternatives: list[Part] = []

    def select(self, top: Part) -> Part | None:
        """The HTML body part of the message whose top-level entity is ``top``.

        :returns: the part, or None when there is no HTML body.
        :raises NotTracked: ``"multipart-signed"``, ``"multipart-encrypted"``,
            ``"pkcs7-mime"`` on the path, or ``"limits-exceeded"``.
        """
        return self._select(top, 0)

    def _select(self, part: Part, depth: int) -> Part | None:
        headers = part.headers
        self._defects.extend(part.defects)
        ctype = headers.get_content_type()
        if ctype == "multipart/signed":
            raise NotTracked("multipart-signed")
        if ctype == "multipart/encrypted":
            raise NotTracked("multipart-encrypted")
        if ctype in _PKCS7:
            raise NotTracked("pkcs7-mime")
        if headers.get_content_disposition() == "attachment":
            return None
        if ctype == "text/html":
            return part
        if headers.get_content_maintype() != "multipart":
            return None  # text/plain, images, message/rfc822 (never entered), ...
        if depth >= self._policy.max_depth:
            raise NotTracked("limits-exceeded")
        subtype = headers.get_content_subtype()
        children = self._children(part)
        if subtype == "alternative":
            alternatives = list(children)
            for child in reversed(alternatives):
                found = self._select(child, depth + 1)
                if found is not None:
                    self.text_alternatives.extend(
                        other
                        for other in alternatives
                        if other is not child
                        and other.headers.get_content_type() == "text/plain"
                        and other.headers.get_content_disposition() != "attachment"
                    )
                    return found
            return None
        if subtype == "related":
            root = self._related_root(part, children)
            return None if root is None else self._select(root, depth + 1)
        first = next(children, None)  # mixed, and unknown subtypes read as mixed
        if first is None:
            return None
        found = self._select(first, depth + 1)
        if found is None and subtype == "mixed" and self._later_html(children, depth + 1):
            raise NotTracked("html-after-text-in-mixed")
        return found

    def _later_html(self, children: Iterator[Part], depth: int) -> bool:
        """Whether a later part of a mixed entity holds an HTML body (not an attachment)."""
        for child in children:
            try:
                if self._select(child, depth) is not None:
                    return True
            except NotTracked:  # signed, encrypted, over the bounds: not a body we would track
                continue
        return False

    def _children(self, part: Part) -> Iterator[Part]:
        for child in iter_children(self._data, part, self._defects):
            self._parts += 1
            if self._parts > self._policy.max_parts:
                raise NotTracked("limits-exceeded")
            yield child

    def _related_root(self, part: Part, children: Iterator[Part]) -> Part | None:
        start = part.headers.get_param("start")
        if start is None:
            return next(children, None)
        wanted = _content_id(collapse_rfc2231_value(start))
        first: Part | None = None
        for child in children:
            if first is None:
                first = child
            cid = child.headers.get("Content-ID")
            if cid is not None and _content_id(str(cid)) == wanted:
                return child
        self._defects.append("related-start-not-found")
        return first


def _content_id(value: str) -> str:
    return value.strip().strip("<>").strip()
