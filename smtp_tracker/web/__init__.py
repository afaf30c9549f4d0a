"""The web side: the HTTPS pixel endpoint."""

from smtp_tracker.web.client_address import client_address
from smtp_tracker.web.public.gif import TRANSPARENT_GIF
from smtp_tracker.web.public.pixel import STORE_KEY, WRITER_KEY, make_pixel_app
from smtp_tracker.web.site import start_site

__all__ = [
    "STORE_KEY",
    "TRANSPARENT_GIF",
    "WRITER_KEY",
    "client_address",
    "make_pixel_app",
    "start_site",
]
