"""What the pixel rewrite may touch, and the bounds on its work.

One frozen, keyword-only dataclass, validated once when it is built: the relay
builds it from the configuration and hands the same instance to every
:func:`smtp_tracker.mime.rewrite` call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from smtp_tracker.mime.links import (
    DEFAULT_CLICK_EXCLUDE_PATTERNS,
    DEFAULT_NOTRACK_ATTRIBUTE,
    LinkRules,
)

__all__ = ["AUTO_BOTH_HTML_BYTES", "MAX_DEPTH_LIMIT", "PIXEL_POSITIONS", "RewritePolicy"]

#: Highest ``max_depth`` accepted: the walk recurses once per MIME level, and
#: this stays well inside Python's recursion limit.
MAX_DEPTH_LIMIT = 200
#: The values of ``pixel_position``.
PIXEL_POSITIONS = ("end", "start", "both", "auto")
#: With ``pixel_position = "auto"``, HTML bodies over this many octets (decoded)
#: get both pixels: Gmail clips a message whose HTML is over about 102 KB.
AUTO_BOTH_HTML_BYTES = 90 * 1024
#: RFC 5322 §3.6.8: a field name is printable US-ASCII except ":".
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")


@dataclass(frozen=True, kw_only=True)
class RewritePolicy:
    """Rules and bounds for :func:`smtp_tracker.mime.rewrite`.

    :param dkim_policy: ``"skip"`` (default) leaves messages with a
        ``DKIM-Signature`` field untouched, since adding the pixel breaks the
        body hash (RFC 6376 §3.7) unless the signer used ``l=``; ``"track"``
        tracks them anyway (for relays that sign after us); ``"resign"`` tracks
        them like ``"track"``, and the tracking stage then re-signs them with the
        signer's own key or relays the original (:mod:`smtp_tracker.dkim`).
    :param tracking_requires_opt_in: when true, only messages carrying
        ``<control_header>: yes`` are tracked.
    :param control_header: field name of the per-message control header;
        values ``yes``/``no``, case-insensitive.  It is removed from the top-level
        header of every relayed message (except when the rewrite fails open).
    :param max_depth: bound on multipart nesting followed to find the HTML body
        (the top-level entity is depth 0; attached ``message/*`` parts are
        never entered); deeper is ``"limits-exceeded"``.  At most
        :data:`MAX_DEPTH_LIMIT`.
    :param max_parts: bound on the number of body parts looked at while
        searching (a ``multipart/mixed`` is read only up to its first part);
        more is ``"limits-exceeded"``.
    :param max_html_bytes: bound in octets on the transfer-decoded HTML part; a
        larger one is not tracked, reason ``"html-too-large"``.
    :param track_clicks: wrap the ``http``/``https`` links of the HTML body in
        click URLs (given a click base URL; see :mod:`smtp_tracker.mime.links`).
    :param track_text_links: also wrap the URLs of the ``text/plain``
        alternatives of a tracked HTML body (with ``track_clicks``).
    :param click_exclude_patterns: regular expressions searched,
        case-insensitively, in each destination URL; a match is never wrapped.
    :param click_notrack_attribute: a link whose tag carries this attribute is
        never wrapped (the attribute stays).
    :param max_click_html_bytes: bound in octets on a part whose links are
        wrapped (finding them costs about a second per megabyte of dense
        markup); a larger part gets the pixel alone.
    :param max_links: bound on the links wrapped in one message; a message
        with more gets the pixel alone.
    :param time_limit_s: seconds (wall clock, from the start of the rewrite)
        after which the rewrite stops where it is and relays the original,
        reason ``"rewrite-timeout"`` (:mod:`~smtp_tracker.mime.deadline`: checked
        inside its loops, so the thread really stops); None for no limit.
    :param pixel_position: where the pixel goes in the HTML body: ``"end"``
        (before ``</body>``), ``"start"`` (right after the opening ``<body>``,
        so that a clipped message, Gmail's over about 102 KB, still fetches
        it), ``"both"`` (two elements with the same URL), or ``"auto"``
        (``"both"`` for a decoded HTML body over :data:`AUTO_BOTH_HTML_BYTES`,
        else ``"end"``).  Where there is no start place, the end alone.
    :raises ValueError: when a value is out of range or ``control_header`` is
        not an RFC 5322 field name.
    """

    dkim_policy: Literal["skip", "track", "resign"] = "skip"
    tracking_requires_opt_in: bool = False
    control_header: str = "X-Track"
    max_depth: int = 32
    max_parts: int = 1000
    max_html_bytes: int = 64 * 1024 * 1024
    track_clicks: bool = False
    track_text_links: bool = False
    click_exclude_patterns: tuple[str, ...] = DEFAULT_CLICK_EXCLUDE_PATTERNS
    click_notrack_attribute: str = DEFAULT_NOTRACK_ATTRIBUTE
    max_click_html_bytes: int = 2 * 1024 * 1024
    max_links: int = 1000
    time_limit_s: float | None = None
    pixel_position: Literal["end", "start", "both", "auto"] = "end"

    def __post_init__(self) -> None:
        problems: list[str] = []
        limit = self.time_limit_s
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not math.isfinite(limit)
            or limit <= 0
        ):
            problems.append(f"time_limit_s must be a positive number of seconds, not {limit!r}")
        if self.dkim_policy not in ("skip", "track", "resign"):
            problems.append(
                f"dkim_policy must be 'skip', 'track' or 'resign', not {self.dkim_policy!r}"
            )
        if self.pixel_position not in PIXEL_POSITIONS:
            problems.append(
                "pixel_position must be 'end', 'start', 'both' or 'auto', "
                f"not {self.pixel_position!r}"
            )
        if not isinstance(self.control_header, str) or not _FIELD_NAME.match(self.control_header):
            problems.append(f"control_header is not a header field name: {self.control_header!r}")
        for name in (
            "max_depth",
            "max_parts",
            "max_html_bytes",
            "max_click_html_bytes",
            "max_links",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, not {value!r}")
        if isinstance(self.max_depth, int) and self.max_depth > MAX_DEPTH_LIMIT:
            problems.append(f"max_depth must be at most {MAX_DEPTH_LIMIT}, not {self.max_depth}")
        for name in ("tracking_requires_opt_in", "track_clicks", "track_text_links"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be a bool, not {getattr(self, name)!r}")
        if not isinstance(self.click_exclude_patterns, tuple) or not all(
            isinstance(p, str) for p in self.click_exclude_patterns
        ):
            problems.append("click_exclude_patterns must be a tuple of strings")
        else:
            try:
                self.link_rules()
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))

    def link_rules(
        self, *, own_host: str | None = None, unsubscribe_urls: frozenset[str] = frozenset()
    ) -> LinkRules:
        """The click-tracking rules of this policy for one message.

        :param own_host: the host of the click base URL.
        :param unsubscribe_urls: the message's ``List-Unsubscribe`` URLs.
        :raises ValueError: when a pattern or the attribute name is not valid.
        """
        return LinkRules(
            exclude_patterns=self.click_exclude_patterns,
            notrack_attribute=self.click_notrack_attribute,
            own_host=own_host,
            unsubscribe_urls=unsubscribe_urls,
        )
