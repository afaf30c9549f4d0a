"""Authentication of the reports listener: a bearer token for the API, logins for the pages.

Deny by default: every route of the reports app needs credentials except the
login page and the static stylesheet, so a route added later cannot be left
open by mistake.

``/api/...``
    ``Authorization: Bearer TOKEN`` (RFC 6750 §2.1), compared in constant
    time with the token file's contents.  Without it: ``401`` with a JSON body
    and ``WWW-Authenticate: Bearer realm="smtp-tracker reports"`` (with
    ``error="invalid_token"`` when a token was given, RFC 6750 §3).

Every other path
    A session cookie, set by ``POST /login`` for a user of the users file
    (:mod:`.users`).  Without a valid one: ``303`` to ``/login?next=PATH``.
    Sessions live in memory (a server restart signs everyone out), keyed by
    the SHA-256 of the cookie's 256-bit random value, and end after
    ``reports_session_s``, at ``POST /logout``, or when the user is removed or
    given a new password.  While the users cannot be read (a PostgreSQL store
    down: :attr:`.users.UserDirectory.unavailable`) pages and logins answer
    ``503`` with ``Retry-After``, and sessions are kept.
    The cookie is ``Secure; HttpOnly; SameSite=Strict; Path=/`` with the
    ``__Host-`` name prefix (RFC 6265bis §4.1.3.2: no Domain, so no other host
    can set or read it).

CSRF
    Every state-changing request to a page (any method but GET and HEAD) must
    carry the session's CSRF token in the form field ``csrf_token``; else
    ``403``.  The login form, which has no session yet, carries a token that
    must equal the one in a short-lived ``__Host-`` cookie (double submit).

Failed logins
    At most ``login_failures_per_min`` per client address (per /64 for IPv6)
    and per user name in any 60 seconds; beyond that ``POST /login`` answers ``429`` with
    ``Retry-After`` (RFC 6585 §4) without checking the password.  The memory
    used is bounded (least recently failed keys are forgotten first).

Every response
    ``Content-Security-Policy: default-src 'self'`` (and no framing, no
    foreign form targets), ``X-Content-Type-Options: nosniff``,
    ``Referrer-Policy: no-referrer``, ``X-Frame-Options: DENY``,
    ``Cache-Control: no-store`` (except static files).  No CORS headers, ever.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import stat
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlencode, urlsplit

from aiohttp import hdrs, web
from multidict import MultiDictProxy

from smtp_tracker.errors import StartupError
from smtp_tracker.web.client_address import IPNetwork, parse_address, request_client_address
from smtp_tracker.web.reports.api import API_PREFIX
from smtp_tracker.web.reports.templating import CurrentSession, current_session, render, setup_site
from smtp_tracker.web.reports.users import UserDirectory

__all__ = [
    "AUTH_KEY",
    "CSRF_FIELD",
    "LOGIN_CSRF_COOKIE",
    "REPORTS_TOKEN_MIN_CHARS",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "AuthState",
    "FailureLimiter",
    "SessionStore",
    "auth_middleware",
    "install_auth",
    "load_reports_token",
    "safe_next",
]

log = logging.getLogger(__name__)

#: The session cookie.
SESSION_COOKIE: Final = "__Host-smtp-tracker-session"
#: The login form's double-submit cookie.
LOGIN_CSRF_COOKIE: Final = "__Host-smtp-tracker-login"
#: The form field holding the CSRF token.
CSRF_FIELD: Final = "csrf_token"
#: Shortest bearer token accepted from the token file, in characters.
REPORTS_TOKEN_MIN_CHARS: Final = 32
#: Headers set on every response of the reports listener.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

_REALM: Final = 'Bearer realm="smtp-tracker reports"'
_LOGIN_CSRF_MAX_AGE_S: Final = 3600
_NEXT_MAX_CHARS: Final = 2048
_FIELD_MAX_CHARS: Final = 1024
_SAFE_PATH_CHARS: Final = "/?&=%:;@+,!$'()*~-._"
_UNAVAILABLE_RETRY_S: Final = 5
_LOGIN_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


def load_reports_token(path: Path) -> str:
    """The API bearer token: the contents of *path*, without surrounding whitespace.

    Logs a warning (never the token) when group or others may read or write the file.

    :raises StartupError: when the file cannot be read, or holds fewer than
        :data:`REPORTS_TOKEN_MIN_CHARS` characters or characters outside
        printable ASCII (RFC 6750 §2.1 ``b64token`` is ASCII).
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise StartupError(f"reports_token_file: cannot read {path} ({reason})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "reports_token_file: %s is readable by group or others; run: chmod 600 %s", path, path
        )
    if len(token) < REPORTS_TOKEN_MIN_CHARS:
        raise StartupError(
            f"reports_token_file: {path} holds fewer than {REPORTS_TOKEN_MIN_CHARS} characters; "
            "put a long random token in it (e.g. the output of: openssl rand -base64 32)"
        )
    if not all("!" <= char <= "~" for char in token):
        raise StartupError(
            f"reports_token_file: {path} must hold one token of printable ASCII, no spaces"
        )
    return token


def safe_next(target: str | None) -> str:
    """*target* if it is a path on this site (``/messages?q=x``), else ``/``.

    Refuses anything a browser could take to another origin: absolute URLs,
    scheme-relative ``//host``, backslashes (``/\\host``), control characters.
    """
    if not target or len(target) > _NEXT_MAX_CHARS:
        return "/"
    if not target.startswith("/") or target.startswith("//"):
        return "/"
    if "\\" in target or any(ord(char) < 0x20 or ord(char) == 0x7F for char in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return quote(target, safe=_SAFE_PATH_CHARS)


@dataclass(slots=True)
class _Session:
    user: str
    csrf_token: str
    expires_at: float  # time.monotonic()
    stamp: str = ""  # the user's password stamp at login


class SessionStore:
    """Server-side sessions in memory, keyed by the SHA-256 of the cookie value.

    :param lifetime_s: a session's lifetime from login, in seconds.
    :param max_sessions: most sessions held; beyond it the oldest ends.
    :param clock: monotonic seconds (tests replace it).
    """

    def __init__(
        self,
        *,
        lifetime_s: float,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lifetime_s = lifetime_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, user: str, *, stamp: str = "") -> tuple[str, CurrentSession]:
        """Start a session for *user* whose password has *stamp*; return the cookie value
        and the session."""
        self._purge()
        while len(self._sessions) >= self._max:
            self._sessions.popitem(last=False)
        token = secrets.token_urlsafe(32)
        expires_at = self._clock() + self.lifetime_s
        session = _Session(user, secrets.token_urlsafe(32), expires_at, stamp)
        self._sessions[_digest(token)] = session
        return token, CurrentSession(session.user, session.csrf_token, session.stamp)

    def get(self, token: str | None) -> CurrentSession | None:
        """The live session whose cookie value is *token*, or ``None``."""
        if not token or len(token) > 128:
            return None
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._sessions[key]
            return None
        return CurrentSession(session.user, session.csrf_token, session.stamp)

    def end(self, token: str | None) -> None:
        """End the session whose cookie value is *token*, if any."""
        if token:
            self._sessions.pop(_digest(token), None)

    def end_user(self, user: str) -> int:
        """End every session of *user*; return how many."""
        keys = [key for key, session in self._sessions.items() if session.user == user]
        for key in keys:
            del self._sessions[key]
        return len(keys)

    def _purge(self) -> None:
        now = self._clock()
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if session.expires_at > now:  # insertion order is expiry order (fixed lifetime)
                break
            del self._sessions[key]


class FailureLimiter:
    """Counts failures per key in a sliding window; says how long a key must wait.

    :param max_failures: failures allowed per key within *window_s*.
    :param window_s: the window, in seconds.
    :param max_keys: most keys remembered (least recently failed are forgotten).
    :param clock: monotonic seconds (tests replace it).
    """

    def __init__(
        self,
        *,
        max_failures: int,
        window_s: float = 60.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after_s(self, key: str) -> float:
        """Seconds until *key* may try again; 0 when it may now."""
        times = self._failures.get(key)
        if times is None:
            return 0.0
        now = self._clock()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0.0
        if len(times) < self.max_failures:
            return 0.0
        return times[0] + self.window_s - now

    def record(self, key: str) -> None:
        """Count one failure of *key*."""
        times = self._failures.pop(key, None)
        if times is None:
            times = deque(maxlen=self.max_failures)
        times.append(self._clock())
        self._failures[key] = times  # most recently failed last
        while len(self._failures) > self._max_keys:
            self._failures.popitem(last=False)

    def forgive(self, key: str) -> None:
        """Take back the latest failure of *key* (it was an attempt that succeeded)."""
        times = self._failures.get(key)
        if times:
            times.pop()
            if not times:
                del self._failures[key]


@dataclass(slots=True)
class AuthState:
    """What the auth middleware and the login routes share (``app[AUTH_KEY]``)."""

    token: bytes
    users: UserDirectory
    sessions: SessionStore
    limiter: FailureLimiter
    trusted_proxies: tuple[IPNetwork, ...]
    public: frozenset[web.AbstractResource]


#: The app's authentication state.
AUTH_KEY: Final = web.AppKey("auth", AuthState)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install_auth(
    app: web.Application,
    *,
    token: str,
    users: UserDirectory,
    session_s: float,
    login_failures_per_min: int = 5,
    trusted_proxies: Sequence[IPNetwork] = (),
) -> None:
    """Put every route of *app* behind authentication; add ``/login`` and ``/logout``.

    *app* runs :func:`auth_middleware` before its routes: give it to
    :func:`~smtp_tracker.web.reports.api.make_reports_app` (``auth_middleware=``);
    when *app* does not have it yet, it is put first in its middlewares.

    :param token: the API bearer token (:func:`load_reports_token`).
    :param users: who may log in to the pages.
    :param session_s: a session's lifetime, in seconds.
    :param login_failures_per_min: failed logins allowed per client address (IPv6:
        per /64) and per user name in any 60 seconds.
    :param trusted_proxies: networks whose ``X-Forwarded-For`` names the client
        (for the per-address limit).
    """
    static = setup_site(app)
    login = app.router.add_resource("/login", name="login")
    login.add_route(hdrs.METH_GET, _login_page)
    login.add_route(hdrs.METH_HEAD, _login_page)
    login.add_route(hdrs.METH_POST, _login)
    app.router.add_post("/logout", _logout, name="logout")
    app[AUTH_KEY] = AuthState(
        token=token.encode(),
        users=users,
        sessions=SessionStore(lifetime_s=session_s),
        limiter=FailureLimiter(max_failures=login_failures_per_min),
        trusted_proxies=tuple(trusted_proxies),
        public=frozenset({login, static}),
    )
    if auth_middleware not in app.middlewares:
        app.middlewares.insert(0, auth_middleware)
    app.on_response_prepare.append(_security_headers)


@web.middleware
async def auth_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Let a request through only with the credentials its route needs (module docstring).

    Needs ``app[AUTH_KEY]`` (:func:`install_auth`).
    """
    state = request.app[AUTH_KEY]
    if request.match_info.route.resource in state.public:
        current_session.set(state.sessions.get(request.cookies.get(SESSION_COOKIE)))
        return await handler(request)
    if request.path == API_PREFIX.rstrip("/") or request.path.startswith(API_PREFIX):
        return await _check_bearer(request, handler, state)
    cookie = request.cookies.get(SESSION_COOKIE)
    session = state.sessions.get(cookie)
    if session is not None:
        await state.users.refresh()
        if state.users.unavailable is not None:  # the store's users cannot be read
            return _unavailable(request)
        stamp = state.users.stamp(session.user)
        if stamp is None:  # removed
            state.sessions.end_user(session.user)
            session = None
        elif not _same(stamp, session.stamp):  # signed in with a password since replaced
            state.sessions.end(cookie)
            session = None
    if session is None:
        query = {"next": request.rel_url.raw_path_qs} if request.path != "/" else {}
        location = "/login" + (f"?{urlencode(query)}" if query else "")
        raise web.HTTPSeeOther(location=location)
    if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
        form = await _form(request)
        sent = form.get(CSRF_FIELD)
        if not isinstance(sent, str) or not _same(sent, session.csrf_token):
            return _forbidden(request)
    current_session.set(session)
    return await handler(request)


async def _check_bearer(
    request: web.Request, handler: _Handler, state: AuthState
) -> web.StreamResponse:
    scheme, _, credentials = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return _unauthorized("a bearer token is required", challenge=_REALM)
    if not hmac.compare_digest(_raw(credentials.strip()), state.token):
        log.debug("reports: refused an API request with a wrong bearer token")
        return _unauthorized(
            "the bearer token is not valid", challenge=f'{_REALM}, error="invalid_token"'
        )
    return await handler(request)


def _unauthorized(message: str, *, challenge: str) -> web.Response:
    return web.json_response(
        {"error": message},
        status=401,
        headers={hdrs.WWW_AUTHENTICATE: challenge},
    )


def _unavailable(request: web.Request) -> web.Response:
    """``503``: the users cannot be read (the store is down), so no session is trusted
    now; the session is kept for when they can be (:class:`.users.UserDirectory`)."""
    response = render(
        request,
        "error.html",
        {
            "title": "Unavailable",
            "message": "The list of users cannot be read now (the store does not answer). "
            "Try again in a moment.",
        },
        status=503,
    )
    response.headers[hdrs.RETRY_AFTER] = str(_UNAVAILABLE_RETRY_S)
    return response


def _forbidden(request: web.Request) -> web.Response:
    return render(
        request,
        "error.html",
        {
            "title": "Form expired",
            "message": "This form is out of date or did not come from this site. "
            "Go back, reload the page and try again.",
        },
        status=403,
    )


async def _login_page(request: web.Request) -> web.StreamResponse:
    target = safe_next(request.query.get("next"))
    if current_session.get() is not None:
        raise web.HTTPSeeOther(location=target)
    return _login_form(request, target=target, error=None, status=200)


def _login_form(
    request: web.Request,
    *,
    target: str,
    error: str | None,
    status: int,
    username: str = "",
    headers: dict[str, str] | None = None,
) -> web.Response:
    # One value per browser: a login page loaded meanwhile (another tab, a redirected
    # favicon request) must not invalidate the form already shown.
    csrf = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not _LOGIN_TOKEN.fullmatch(csrf):
        csrf = secrets.token_urlsafe(32)
    response = render(
        request,
        "login.html",
        {"csrf_token": csrf, "next": target, "error": error, "username": username},
        status=status,
    )
    _set_cookie(response, LOGIN_CSRF_COOKIE, csrf, max_age_s=_LOGIN_CSRF_MAX_AGE_S)
    response.headers.update(headers or {})
    return response


async def _login(request: web.Request) -> web.StreamResponse:
    state = request.app[AUTH_KEY]
    form = await _form(request)
    sent = form.get(CSRF_FIELD)
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not isinstance(sent, str) or not cookie or not _same(sent, cookie):
        return _forbidden(request)
    target = safe_next(_text(form.get("next")))
    username = _text(form.get("username")).strip()
    sent_password = form.get("password")
    password = sent_password if isinstance(sent_password, str) else ""
    client = request_client_address(request, state.trusted_proxies)
    keys = (f"address:{_address_key(client)}", f"user:{username.casefold()}")
    await state.users.refresh()  # before the limiter: no await between its check and count
    if state.users.unavailable is not None:  # no login on a stale copy of the users
        return _login_form(
            request,
            target=target,
            username=username,
            error="Logins are unavailable: the list of users cannot be read. Try again soon.",
            status=503,
            headers={hdrs.RETRY_AFTER: str(_UNAVAILABLE_RETRY_S)},
        )
    wait_s = max(state.limiter.retry_after_s(key) for key in keys)
    if wait_s > 0:
        seconds = max(1, math.ceil(wait_s))
        return _login_form(
            request,
            target=target,
            username=username,
            error=f"Too many failed logins. Try again in {seconds} seconds.",
            status=429,
            headers={hdrs.RETRY_AFTER: str(seconds)},
        )
    # Counted as a failure before the (slow) check, so that attempts sent in parallel
    # are counted too; forgiven if the password is right.
    for key in keys:
        state.limiter.record(key)
    stamp = await state.users.check(username, password) if username and password else None
    if stamp is None:
        # like Postfix's "SASL LOGIN authentication failed", for fail2ban; never the password
        log.warning(
            "reports: login failed for user=%s from [%s]", _printable(username), client or "unknown"
        )
        return _login_form(
            request,
            target=target,
            username=username,
            error="Wrong user name or password.",
            status=200,
        )
    for key in keys:
        state.limiter.forgive(key)
    state.sessions.end(request.cookies.get(SESSION_COOKIE))  # never reuse a session id
    token, _ = state.sessions.create(username, stamp=stamp)
    log.info("reports: user=%s logged in from [%s]", _printable(username), client or "unknown")
    response = _see_other(target)
    _set_cookie(response, SESSION_COOKIE, token, max_age_s=int(state.sessions.lifetime_s))
    _set_cookie(response, LOGIN_CSRF_COOKIE, "", max_age_s=0)  # used up
    return response


async def _logout(request: web.Request) -> web.StreamResponse:
    # the middleware checked the session and its CSRF token
    request.app[AUTH_KEY].sessions.end(request.cookies.get(SESSION_COOKIE))
    response = _see_other("/login")
    _set_cookie(response, SESSION_COOKIE, "", max_age_s=0)
    return response


async def _form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """The request's form fields.

    :raises aiohttp.web.HTTPBadRequest: when the body cannot be decoded (bytes that are
        not in its charset, an unknown charset, a malformed multipart body); logged at
        debug level, as a client's mistake.
    """
    try:
        return await request.post()
    except (ValueError, LookupError) as exc:  # UnicodeDecodeError is a ValueError
        log.debug("reports: refused a form that cannot be decoded (%s)", type(exc).__name__)
        raise web.HTTPBadRequest() from None


def _see_other(location: str) -> web.Response:
    """A 303 to *location* (a local path) that can carry cookies."""
    return web.Response(status=303, headers={hdrs.LOCATION: location})


def _set_cookie(response: web.StreamResponse, name: str, value: str, *, max_age_s: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age_s,
        path="/",
        secure=True,
        httponly=True,
        samesite="Strict",
    )


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith("/static/"):
        response.headers[hdrs.CACHE_CONTROL] = "no-store"
    for name in [name for name in response.headers if name.lower().startswith("access-control-")]:
        del response.headers[name]


def _same(sent: str, expected: str) -> bool:
    return hmac.compare_digest(_raw(sent), _raw(expected))


def _raw(text: str) -> bytes:
    """*text* as UTF-8, lone surrogates included: aiohttp decodes header bytes that are not
    UTF-8 to surrogates (``surrogateescape``), which plain ``encode()`` refuses."""
    return text.encode("utf-8", "surrogatepass")


def _printable(text: str) -> str:
    """*text* with control and non-ASCII characters escaped, at most 64 of them, for a log line."""
    escaped = text[:64].encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)


def _text(value: object) -> str:
    return value[:_FIELD_MAX_CHARS] if isinstance(value, str) else ""


def _address_key(client: str | None) -> str:
    """The address failed logins are counted under: an IPv6 client's /64 (RFC 4291 §2.5.1:
    one host's or LAN's prefix, whose interface identifiers it picks freely), else the address."""
    ip = parse_address(client) if client else None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip) if ip is not None else "-"


def _digest(token: str) -> bytes:
    return hashlib.sha256(_raw(token)).digest()
