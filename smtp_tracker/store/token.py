"""Tracking tokens and pixel URLs.

A tracking id is ``secrets.token_urlsafe(16)``: 128 random bits in the URL-safe
base64 alphabet (RFC 4648 §5) without padding, 22 characters.  The 22nd
character carries only 2 bits (the other 4 are zero), so it is one of
``A``, ``Q``, ``g`` or ``w``; :func:`is_well_formed_token` checks exactly that.
"""

from __future__ import annotations

import re
import secrets

__all__ = ["PIXEL_PATH_PREFIX", "is_well_formed_token", "new_tracking_id", "pixel_url"]

#: The pixel URL path is ``/o/<tracking_id>.gif``.
PIXEL_PATH_PREFIX = "/o/"

_TOKEN_BYTES = 16
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")


def new_tracking_id() -> str:
    """A fresh random tracking id (22 URL-safe characters, 128 bits)."""
    return secrets.token_urlsafe(_TOKEN_BYTES)


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
