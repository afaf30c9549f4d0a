"""The public, unauthenticated HTTPS listener: the pixel and click endpoints.

``pixel``
    :func:`make_pixel_app`, the app: ``/o/{token}.gif``, ``/c/{token}`` and ``/healthz``.
``click``
    The click endpoint (``/c/{token}``: 302 to a stored link).
``gif``
    The 43-byte transparent GIF.
``limits``
    :class:`EventLimiter`: how many opens and clicks are recorded per token and client.
"""

from smtp_tracker.web.public.click import CLICK_KEY, ClickEndpoint, LinkCache
from smtp_tracker.web.public.gif import GIF_CONTENT_TYPE, TRANSPARENT_GIF
from smtp_tracker.web.public.limits import EventLimiter
from smtp_tracker.web.public.pixel import (
    LIMITER_KEY,
    PIXEL_HEADERS,
    STORE_KEY,
    WRITER_KEY,
    make_pixel_app,
)

__all__ = [
    "CLICK_KEY",
    "GIF_CONTENT_TYPE",
    "LIMITER_KEY",
    "PIXEL_HEADERS",
    "STORE_KEY",
    "TRANSPARENT_GIF",
    "WRITER_KEY",
    "ClickEndpoint",
    "EventLimiter",
    "LinkCache",
    "make_pixel_app",
]
