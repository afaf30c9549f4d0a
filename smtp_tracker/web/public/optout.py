"""The objection page, on the pixel listener: ``/optout/{token}`` (issue 20).

Routes
    ``GET /optout/{token}``: a small page naming the recipients of the message
    whose footer carried the link (``disclosure_optout_link``), each with a
    button (several recipients: local parts cut, :func:`masked`).  It changes
    nothing: a link scanner or prefetcher that follows the link records
    nothing.  ``HEAD``: the same, without a body.

    ``POST /optout/{token}`` (the page's form): records ``denied`` for the
    chosen recipient (source ``optout-link``) and shows a confirmation.  The
    form carries a form token: ``NONCE.ISSUED.MAC``, an HMAC-SHA-256 under
    ``DATA_DIR/optout-form.key`` of the link token, a random nonce and the
    issue time.  A POST is refused (``403``, nothing recorded) when the token
    is missing, forged, made for another link, older than
    :data:`~smtp_tracker.store.consent.FORM_TTL_S` or already spent (each nonce
    is spent once, in the same transaction as the objection), or when an
    ``Origin`` header names another site.  Another site cannot read the page
    (same-origin policy), so it cannot get a form token: the form is CSRF-safe.

    Unknown, pruned or forgotten links: ``404`` with a page saying so.  A
    store that cannot be read or written: ``503``.

The URL holds only the link token (over 128 random bits, not guessable), no
address.  Responses are ``Cache-Control: no-store``, ``Referrer-Policy:
same-origin`` (the page links nowhere else), framed by nobody
(``frame-ancestors 'none'``), with a strict Content-Security-Policy (no
script at all).  The page's text and its template
(Jinja2, autoescaped) are configurable: ``optout_page_text``,
``optout_page_template``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jinja2
from aiohttp import hdrs, web

from smtp_tracker.errors import StoreError
from smtp_tracker.store.consent import FORM_TTL_S, ConsentRegistry
from smtp_tracker.tokens import OPTOUT_PATH_PREFIX, is_well_formed_token

__all__ = [
    "FORM_KEY_FILENAME",
    "OPTOUT_KEY",
    "OptoutPage",
    "add_optout_routes",
    "load_template",
    "make_form_token",
    "masked",
    "verify_form_token",
]

logger = logging.getLogger(__name__)

#: The HMAC key of the form tokens, in the data directory (mode 0600).
FORM_KEY_FILENAME: Final = "optout-form.key"
_TEMPLATE_DIR: Final = Path(__file__).parent / "templates"
_HEADERS: Final = {
    hdrs.CACHE_CONTROL: "no-store",
    # not no-referrer: with it browsers send "Origin: null" on the page's own POST
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}
_UNKNOWN = "This link is not known (any more). To object, write to the sender of the message."
_REFUSED = "This form has expired or was already used. Open the link in the message again."
_UNAVAILABLE = "This page is not available at the moment. Please try again in a few minutes."


def _mac(key: bytes, token: str, nonce: str, issued: int) -> str:
    digest = hmac.new(key, f"optout|{token}|{nonce}|{issued}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def make_form_token(key: bytes, token: str, *, now: float | None = None) -> str:
    """A fresh form token for the objection page of link *token*: ``NONCE.ISSUED.MAC``."""
    issued = int(time.time() if now is None else now)
    nonce = secrets.token_urlsafe(16)
    return f"{nonce}.{issued}.{_mac(key, token, nonce, issued)}"


def verify_form_token(
    key: bytes, token: str, form_token: str, *, now: float | None = None
) -> str | None:
    """The nonce of *form_token* when it was made with *key* for *token* in the last
    :data:`FORM_TTL_S` seconds; None otherwise (forged, altered, another link's, expired)."""
    parts = form_token.split(".")
    if len(parts) != 3 or not parts[1].isdigit() or len(form_token) > 200:
        return None
    nonce, issued_text, mac = parts
    issued = int(issued_text)
    current = time.time() if now is None else now
    if not current - FORM_TTL_S <= issued <= current + 60:
        return None
    if not hmac.compare_digest(mac, _mac(key, token, nonce, issued)):
        return None
    return nonce


def load_template(path: Path | None) -> jinja2.Template:
    """The page's template: *path* (``optout_page_template``) or the built-in one.

    :raises ValueError: when *path* cannot be read or is not a valid Jinja2 template.
    """
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent if path else _TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
    )
    try:
        return environment.get_template(path.name if path else "optout.html")
    except (OSError, jinja2.TemplateError) as exc:
        raise ValueError(f"cannot use {path} as the objection page template ({exc})") from None


@dataclass(frozen=True, slots=True)
class _Recipient:
    index: int
    address: str
    state: str | None


class OptoutPage:
    """Handles ``/optout/{token}``; counters :attr:`shown`, :attr:`recorded`, :attr:`refused`.

    :param registry: the consent registry (objection links and states).
    :param form_key: the HMAC key of the form tokens (32 bytes).
    :param text: the explanation above the buttons (``optout_page_text``).
    :param template: the page's template (:func:`load_template`).
    """

    def __init__(
        self,
        *,
        registry: ConsentRegistry,
        form_key: bytes,
        text: str,
        template: jinja2.Template | None = None,
    ) -> None:
        self._registry = registry
        self._key = form_key
        self._text = text
        self._template = template or load_template(None)
        self.shown = 0
        self.recorded = 0
        self.refused = 0

    def _page(self, status: int, **context: Any) -> web.Response:
        body = self._template.render({"text": self._text, "recipients": (), **context})
        return web.Response(
            status=status, text=body, content_type="text/html", charset="utf-8", headers=_HEADERS
        )

    async def show(self, request: web.Request) -> web.Response:
        """``GET``/``HEAD``: the page; records nothing."""
        token = request.match_info["token"]
        if not is_well_formed_token(token):
            return self._page(404, error=_UNKNOWN)
        try:
            link = await self._registry.find_optout_link(token)
            states = await self._registry.states(link.recipients) if link else {}
        except StoreError as exc:
            logger.warning("objection page: cannot read the registry: %s", exc)
            return self._page(503, error=_UNAVAILABLE)
        if link is None:
            return self._page(404, error=_UNKNOWN)
        self.shown += 1
        shown = masked(link.recipients)
        recipients = [
            _Recipient(index, shown[index], states.get(address))
            for index, address in enumerate(link.recipients)
        ]
        return self._page(200, recipients=recipients, form_token=make_form_token(self._key, token))

    async def submit(self, request: web.Request) -> web.Response:
        """``POST``: records ``denied`` for the chosen recipient, or refuses (403)."""
        token = request.match_info["token"]
        if not is_well_formed_token(token):
            return self._page(404, error=_UNKNOWN)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not _same_origin(origin, request):
            self.refused += 1
            return self._page(403, error=_REFUSED)
        try:
            form = await request.post()
        except ValueError:
            self.refused += 1
            return self._page(403, error=_REFUSED)
        form_token = form.get("form_token")
        index_text = form.get("recipient")
        nonce = (
            verify_form_token(self._key, token, form_token) if isinstance(form_token, str) else None
        )
        if nonce is None or not isinstance(index_text, str) or not index_text.isdigit():
            self.refused += 1
            return self._page(403, error=_REFUSED)
        try:
            address = await self._registry.object_via_link(token, int(index_text), nonce)
            link = await self._registry.find_optout_link(token) if address else None
        except StoreError as exc:
            logger.warning("objection page: cannot record an objection: %s", exc)
            return self._page(503, error=_UNAVAILABLE)
        if address is None:
            self.refused += 1
            return self._page(403, error=_REFUSED)
        self.recorded += 1
        logger.info("objection recorded through the objection page of one message")
        others = link is not None and len(link.recipients) > 1
        if link is not None and others:
            address = masked(link.recipients)[link.recipients.index(address)]
        return self._page(200, done=address, others=others)


def masked(addresses: Sequence[str]) -> list[str]:
    """How the page names *addresses*: whole when there is one; else each local part
    cut to its first characters (as few as tell them apart) and ``***``.

    Everyone who has the message has its link, and the envelope of one
    transaction may hold Bcc recipients: with several, the page must not hand
    their addresses to the others; each still knows their own.
    """
    if len(addresses) <= 1:
        return list(addresses)
    for keep in range(1, max(len(a.rpartition("@")[0]) for a in addresses) + 1):
        shown = []
        for address in addresses:
            local, _, domain = address.rpartition("@")
            shown.append(f"{local[:keep]}***@{domain}" if len(local) > keep else address)
        if len(set(shown)) == len(shown):
            return shown
    return list(addresses)  # not reached: whole addresses differ


def _same_origin(origin: str, request: web.Request) -> bool:
    parsed = urllib.parse.urlsplit(origin)
    return bool(parsed.netloc) and parsed.netloc.lower() == request.host.lower()


#: The app's objection page; read its counters.
OPTOUT_KEY: Final = web.AppKey("optout_page", OptoutPage)


def add_optout_routes(app: web.Application, page: OptoutPage) -> OptoutPage:
    """Add ``GET``/``HEAD``/``POST /optout/{token}`` to the pixel app; ``app[OPTOUT_KEY]``."""
    app[OPTOUT_KEY] = page
    app.router.add_get(OPTOUT_PATH_PREFIX + "{token}", page.show)  # also HEAD
    app.router.add_post(OPTOUT_PATH_PREFIX + "{token}", page.submit)
    return page
