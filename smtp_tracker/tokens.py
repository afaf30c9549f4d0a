"""The URL scheme: tracking ids, link tokens, and the pixel and click URLs.

One place for every fact of the scheme; :mod:`smtp_tracker.mime` (which
writes the URLs into messages), :mod:`smtp_tracker.store` (which keeps the
tokens) and :mod:`smtp_tracker.web.public` (which routes them) read it here.

A tracking id is ``secrets.token_urlsafe(17)``: 136 random bits in the URL-safe
base64 alphabet (RFC 4648 §5) without padding, 23 characters, drawn again when
it would start with ``-`` (so that ``smtp-tracker show ID`` never mistakes one
for an option); what is left is over 135.9 bits, above the 128 asked for.  The
23rd character carries only 4 bits (the other 2 are zero), so it is one of
``AEIMQUYcgkosw048``; :func:`is_well_formed_token` checks exactly that.  A
link token (``/c/<token>``) is drawn the same way (:func:`new_link_token`).

Paths: the pixel is ``<base>/o/<tracking_id>.gif``, a click ``<base>/c/<link_token>``,
the objection page of a message ``<base>/optout/<optout_token>`` (a token drawn
like a link token, issue 20).
"""

from __future__ import annotations

import re
import secrets
import urllib.parse
from dataclasses import dataclass

__all__ = [
    "CLICK_PATH_PREFIX",
    "OPTOUT_PATH_PREFIX",
    "PIXEL_PATH_PREFIX",
    "URL_SAFE",
    "LinkRecord",
    "click_url",
    "is_well_formed_token",
    "new_link_token",
    "new_tracking_id",
    "optout_url",
    "pixel_url",
    "to_ascii_url",
]

#: The pixel URL path is ``/o/<tracking_id>.gif``.
PIXEL_PATH_PREFIX = "/o/"
#: The click URL path is ``/c/<link_token>``.
CLICK_PATH_PREFIX = "/c/"
#: The objection page of a message is ``/optout/<optout_token>``.
OPTOUT_PATH_PREFIX = "/optout/"
#: Printable ASCII is kept in a URL we write; anything else is
#: percent-encoded as UTF-8 (RFC 3986 §2.1).
URL_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))

_TOKEN_BYTES = 17
_TOKEN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}[AEIMQUYcgkosw048]")


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkRecord:
    """One wrapped link of a tracked message: its token and where it leads.

    Made by the rewrite (:mod:`smtp_tracker.mime`), kept by the store with its
    message, read back by the click endpoint.

    :param token: the click token in ``/c/<token>`` (:func:`new_link_token`).
    :param url: the destination, exactly as the sender wrote it with HTML
        entities decoded; the click endpoint redirects only to this.
    :param position: the link's index among the message's wrapped links (0-based).
    """

    token: str
    url: str
    position: int


def new_tracking_id() -> str:
    """A fresh random tracking id (23 URL-safe characters, not starting with ``-``)."""
    while (token := secrets.token_urlsafe(_TOKEN_BYTES)).startswith("-"):
        pass
    return token


def new_link_token() -> str:
    """A fresh random click token: the same shape and randomness as a tracking id."""
    return new_tracking_id()


def is_well_formed_token(value: str) -> bool:
    """Whether *value* could have come from :func:`new_tracking_id` or :func:`new_link_token`."""
    return _TOKEN_RE.fullmatch(value) is not None


def to_ascii_url(url: str) -> str:
    """*url* with every character outside printable ASCII percent-encoded as UTF-8.

    RFC 3986 §2.1; printable ASCII (:data:`URL_SAFE`, ``%`` included) is kept
    as written, so the function is idempotent.

    :raises UnicodeEncodeError: when *url* holds a lone surrogate.
    """
    return urllib.parse.quote(url, safe=URL_SAFE, encoding="utf-8", errors="strict")


def pixel_url(base_url: str, tracking_id: str) -> str:
    """The pixel URL for *tracking_id* under *base_url*.

    :param base_url: scheme, host, optional port and optional path prefix,
        with or without a trailing slash, e.g. ``"https://track.example.com:8443"``.
    :returns: e.g. ``"https://track.example.com:8443/o/<tracking_id>.gif"``.
    :raises ValueError: when *tracking_id* is not well formed.
    """
    if not is_well_formed_token(tracking_id):
        raise ValueError(f"not a tracking id: {tracking_id!r}")
    return f"{base_url.rstrip('/')}{PIXEL_PATH_PREFIX}{tracking_id}.gif"


def click_url(base_url: str, token: str) -> str:
    """The click URL of *token* under *base_url* (the pixel base URL), made ASCII.

    :returns: e.g. ``"https://track.example.com:8443/c/<token>"``; characters
        outside printable ASCII percent-encoded (:func:`to_ascii_url`).
    """
    return to_ascii_url(f"{base_url.rstrip('/')}{CLICK_PATH_PREFIX}{token}")


def optout_url(base_url: str, token: str) -> str:
    """The objection page URL of *token* (from :func:`new_link_token`) under *base_url*.

    :returns: e.g. ``"https://track.example.com:8443/optout/<token>"``.
    :raises ValueError: when *token* is not well formed.
    """
    if not is_well_formed_token(token):
        raise ValueError(f"not a token: {token!r}")
    return to_ascii_url(f"{base_url.rstrip('/')}{OPTOUT_PATH_PREFIX}{token}")
