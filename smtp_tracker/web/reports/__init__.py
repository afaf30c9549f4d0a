"""The authenticated reports listener: the JSON API, the dashboard and their logins.

``app``
    :func:`build_reports_app`, the one place the listener's app is assembled.
``api``
    The JSON API (``/api/...``) and the read side it shares with the dashboard.
``auth``
    Bearer token for the API, logins and sessions for the pages, CSRF.
``dashboard``
    The pages (``/``, ``/messages``, ``/messages/{id}``).
``users``
    The users file (Argon2id hashes).
``openapi``
    The API's OpenAPI 3.1 description.
``templating``
    Jinja2 templates and the static stylesheet.
"""

from smtp_tracker.web.reports.api import REPORTS_STORE_KEY, ReportsStore, create_token_file
from smtp_tracker.web.reports.app import build_reports_app
from smtp_tracker.web.reports.auth import AUTH_KEY, load_reports_token
from smtp_tracker.web.reports.users import UserDirectory

__all__ = [
    "AUTH_KEY",
    "REPORTS_STORE_KEY",
    "ReportsStore",
    "UserDirectory",
    "build_reports_app",
    "create_token_file",
    "load_reports_token",
]
