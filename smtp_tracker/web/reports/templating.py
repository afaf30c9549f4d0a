"""The reports site's page machinery: Jinja2 templates (autoescaped) and static files.

Templates live in ``smtp_tracker/web/reports/templates/`` and static files (one CSS
file, no JavaScript) in ``smtp_tracker/web/reports/static/``; both ship in the wheel.
:func:`setup_site` is idempotent, so :func:`~smtp_tracker.web.reports.auth.install_auth`
(the login page) and :func:`~smtp_tracker.web.reports.dashboard.install_dashboard`
can both call it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp_jinja2
import jinja2
from aiohttp import web

__all__ = [
    "STATIC_DIR",
    "STATIC_PREFIX",
    "CurrentSession",
    "current_session",
    "render",
    "setup_site",
]

#: Where the stylesheet lives in the package.
STATIC_DIR: Final = Path(__file__).parent / "static"
#: The URL path prefix of static files.
STATIC_PREFIX: Final = "/static/"

_STATIC_KEY: Final = web.AppKey("static_resource", web.AbstractResource)


class CurrentSession:
    """What a page needs of the signed-in session: the user and the form token.

    :param user: the user name.
    :param csrf_token: the value every state-changing form of this session carries.
    :param stamp: the user's password stamp at login (``UserDirectory.stamp``).
    """

    __slots__ = ("csrf_token", "stamp", "user")

    def __init__(self, user: str, csrf_token: str, stamp: str = "") -> None:
        self.user = user
        self.csrf_token = csrf_token
        self.stamp = stamp


#: The session of the request being handled (set by the auth middleware, which runs
#: in the same task as the handler), or ``None``.
current_session: Final[contextvars.ContextVar[CurrentSession | None]] = contextvars.ContextVar(
    "smtp_tracker_current_session", default=None
)


def setup_site(app: web.Application) -> web.AbstractResource:
    """Set up the template engine and the ``/static/`` route once; return that route.

    Autoescaping is on for every template; an undefined variable is an error
    (:class:`jinja2.StrictUndefined`), not an empty string.
    """
    if _STATIC_KEY in app:
        return app[_STATIC_KEY]
    environment = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("smtp_tracker.web.reports", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["utc"] = _utc_text
    environment.filters["thousands"] = _thousands
    environment.filters["percent"] = _percent
    resource = app.router.add_static(STATIC_PREFIX, STATIC_DIR, name="static")
    app[_STATIC_KEY] = resource
    return resource


def render(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
) -> web.Response:
    """Render *template* with *context*, plus ``session`` (a :class:`CurrentSession` or None)
    and ``nav`` (the current section of the site, ``""`` unless *context* says)."""
    values = {"session": current_session.get(), "nav": "", **context}
    return aiohttp_jinja2.render_template(template, request, values, status=status)


def _utc_text(moment: datetime | None) -> str:
    """``2026-11-21 10:00:00 UTC``, or an en dash for no time."""
    if moment is None:
        return "\u2013"  # en dash
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _thousands(number: int) -> str:
    return f"{number:,}".replace(",", "\u202f")  # narrow no-break space


def _percent(rate: float | None) -> str:
    """A rate in 0..1 as ``42.5 %``; an en dash when undefined (nothing tracked)."""
    if rate is None:
        return "\u2013"  # en dash
    return f"{rate * 100:.1f}\u00a0%"
