"""The reports listener's app, assembled in one place: the JSON API, the logins, the dashboard.

``serve`` and ``reports`` (through :mod:`smtp_tracker.app`) and the tests build
it with :func:`build_reports_app`, so what the tests exercise is what runs.
Its middlewares, outermost first (:data:`MIDDLEWARE_ORDER`), once
:func:`~smtp_tracker.web.site.start_site` has added its own:

1. HTTP/1 only (``start_site``): an HTTP/0.9 request gets ``400`` before
   anything else looks at it;
2. the body deadline (:func:`~smtp_tracker.web.site.body_deadline`): a body
   must arrive within ``body_timeout_s`` (else ``408``), at most
   ``client_max_bytes`` (else ``413``);
3. the API's JSON errors (:mod:`.api`);
4. authentication (:mod:`.auth`): deny by default;
5. the pages' errors (:mod:`.dashboard`).

At most ``max_connections`` connections at once (``503`` beyond); the
headers of a request must arrive within ``header_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from aiohttp import web

from smtp_tracker.web.client_address import IPNetwork
from smtp_tracker.web.reports.api import ReportsStore, make_reports_app
from smtp_tracker.web.reports.auth import auth_middleware, install_auth
from smtp_tracker.web.reports.dashboard import install_dashboard
from smtp_tracker.web.reports.users import UserDirectory
from smtp_tracker.web.site import (
    BODY_TIMEOUT_S,
    CONNECTIONS_KEY,
    HEADER_TIMEOUT_S,
    ConnectionCap,
)

__all__ = ["CLIENT_MAX_BYTES", "MAX_CONNECTIONS", "MIDDLEWARE_ORDER", "build_reports_app"]

#: Largest request body the reports listener reads, in bytes (its forms are small).
CLIENT_MAX_BYTES: Final = 64 * 1024
#: Connections the reports listener serves at once (a few people's browsers and
#: scripts); one more gets ``503``.
MAX_CONNECTIONS: Final = 64

#: The names of the reports app's middlewares once started, outermost first.
MIDDLEWARE_ORDER: Final = (
    "_http_1_only",
    "read_body_in_time",
    "_json_errors",
    "auth_middleware",
    "_page_errors",
)


def build_reports_app(
    *,
    store: ReportsStore,
    token: str,
    users: UserDirectory,
    session_s: float,
    login_failures_per_min: int = 5,
    trusted_proxies: Sequence[IPNetwork] = (),
    header_timeout_s: float = HEADER_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
    client_max_bytes: int = CLIENT_MAX_BYTES,
    max_connections: int = MAX_CONNECTIONS,
) -> web.Application:
    """The reports listener's app (not started; start it with
    :func:`~smtp_tracker.web.site.start_site`).

    :param store: what the API and the pages read; the caller opens and closes it.
    :param token: the API bearer token
        (:func:`~smtp_tracker.web.reports.auth.load_reports_token`).
    :param users: who may log in to the pages.
    :param session_s: a session's lifetime, in seconds.
    :param login_failures_per_min: failed logins allowed per client address (IPv6:
        per /64) and per user name in any 60 seconds.
    :param trusted_proxies: networks whose ``X-Forwarded-For`` names the client.
    :param header_timeout_s: seconds a connection has to send a request's headers,
        and may stay idle between requests.
    :param body_timeout_s: seconds a request body has to arrive after its headers.
    :param client_max_bytes: largest request body read, in bytes.
    :param max_connections: connections served at once (``app[CONNECTIONS_KEY]``).
    :raises ValueError: when *max_connections* < 1.
    """
    app = make_reports_app(
        store=store,
        auth_middleware=auth_middleware,
        keepalive_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        client_max_bytes=client_max_bytes,
    )
    install_auth(
        app,
        token=token,
        users=users,
        session_s=session_s,
        login_failures_per_min=login_failures_per_min,
        trusted_proxies=trusted_proxies,
    )
    install_dashboard(app)
    app[CONNECTIONS_KEY] = ConnectionCap(max_connections)
    return app
