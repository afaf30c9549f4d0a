"""The web side: two HTTPS listeners on aiohttp.

``site``
    :func:`~smtp_tracker.web.site.start_site` runs an app beside the SMTP server in
    the same loop, with the limits every listener has (timeouts, a connection cap,
    a fixed answer to malformed requests).
``client_address``
    Which address a request came from, believing ``X-Forwarded-For`` from trusted
    proxies only.
``public/``
    The unauthenticated listener: the pixel (opens) and click endpoints.
``reports/``
    The authenticated reports listener: the JSON API, the logins and the dashboard
    (:func:`smtp_tracker.web.reports.build_reports_app`).

This package re-exports what the pixel listener's callers use; the reports listener
is imported from :mod:`smtp_tracker.web.reports` (it needs Jinja2 and Argon2).
"""

from smtp_tracker.web.client_address import client_address, request_client_address
from smtp_tracker.web.public import STORE_KEY, TRANSPARENT_GIF, WRITER_KEY, make_pixel_app
from smtp_tracker.web.site import start_site

__all__ = [
    "STORE_KEY",
    "TRANSPARENT_GIF",
    "WRITER_KEY",
    "client_address",
    "make_pixel_app",
    "request_client_address",
    "start_site",
]
