"""Tracking tokens and pixel URLs.

A tracking id is ``secrets.token_urlsafe(17)``: 136 random bits in the URL-safe
base64 alphabet (RFC 4648 §5) without padding, 23 characters, drawn again when
it would start with ``-`` (so that ``smtp-tracker show ID`` never mistakes one
for an option); what is left is over 135.9 bits, above the 128 asked for.  The
23rd character carries only 4 bits (the other 2 are zero), so it is one of
``AEIMQUYcgkosw048``; :func:`is_well_formed_token` checks exactly that.
"""

from __future__ import annotations

import re
import secrets

__all__ = ["PIXEL_PATH_PREFIX", "is_well_formed_token", "new_tracking_id", "pixel_url"]

#: The pixel URL path is ``/o/<tracking_id>.gif``.
PIXEL_PATH_PREFIX = "/o/"

_TOKEN_BYTES = 17
_TOKEN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}[AEIMQUYcgkosw048]")


def new_tracking_id() -> str:
    """A fresh random tracking id (23 URL-safe characters, not starting with ``-``)."""
    while (token := secrets.token_urlsafe(_TOKEN_BYTES)).startswith("-"):
        pass
    return token


def is_well_formed_token(value: str) -> bool:
    """Whether *value* could have come from :func:`new_tracking_id`."""
    return _TOKEN_RE.fullmatch(value) is not None


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
