"""The downstream side: aiosmtpd's SMTP protocol, with what a relay for Postfix needs.

:class:`RelaySMTP` differs from aiosmtpd's ``SMTP`` only where it must:

- clients outside ``allowed_clients`` get ``554 5.7.1`` and are disconnected
  before the greeting;
- MAIL and RCPT parameters are parsed here (:mod:`.parameters`), because
  aiosmtpd upper-cases their values and refuses the DSN ones (RFC 3461);
- AUTH is not offered, and refused with 502;
- aiosmtpd's own replies get enhanced status codes (RFC 2034), since we
  advertise ENHANCEDSTATUSCODES;
- every command and reply is copied to the session's transcript when capture
  is on, and the handler hears when the connection is lost;
- unexpected exceptions reply ``451 4.3.0`` and are logged, never echoed;
- STARTTLS inside a mail transaction gets ``503 5.5.1`` and over TLS already
  ``554 5.5.1``, as Postfix answers; an accepted STARTTLS first closes the
  session's upstream connection, since RFC 3207 §4.2 has both sides start
  afresh and aiosmtpd gives the TLS layer a new session;
- the limits a hostile client meets (below).

Limits
------
- ``max_connections`` (:class:`ConnectionSlots`): a connection beyond it gets
  ``421 4.3.2`` instead of the greeting and is closed (RFC 5321 §3.1); the
  refusals are counted and logged at most once per :data:`REFUSAL_LOG_INTERVAL_S`.
- ``client_timeout_s``: a client silent that long gets ``421 4.4.2`` and is
  disconnected (RFC 5321 §4.5.3.2); an open transaction is aborted upstream.
- Command lines over 512 octets (RFC 5321 §4.5.3.1.4; more after EHLO for the
  SIZE and SMTPUTF8 parameters) get ``500 5.5.2`` and the connection stays usable.
- A command argument holding CR, LF or another control character gets
  ``501 5.5.2`` and is never forwarded (RFC 5321 §2.3.8).
- A payload over ``max_message_bytes`` (``552 5.3.4``, RFC 1870 §6.3) or with a
  line over 1000 octets (``500 5.5.2``, RFC 5321 §4.5.3.1.6) is refused after
  the end of data, and its upstream transaction is aborted with RSET: the
  upstream never sees DATA for it.

SMTP smuggling
--------------
(SEC Consult, "SMTP Smuggling", December 2023; CVE-2023-51764/51765/51766.)
A message may end only with ``<CRLF>.<CRLF>`` (RFC 5321 §4.1.1.4, §2.3.8):
aiosmtpd (>= 1.4.5, CVE-2024-27305) never ends DATA at ``<LF>.<LF>``,
``<LF>.<CRLF>``, ``<CR>.<CR>`` or any other bare-CR/LF variant, so what follows
such a sequence stays part of the one message.  Bare CR and bare LF inside the
payload are then rewritten to CRLF by the handler before anything else sees the
message (Postfix 3.9's default, ``smtpd_forbid_bare_newline = normalize``,
extended to bare CR), and the upstream client dot-stuffs every line: the
upstream receives one message whose lines all end in CRLF, in which a smuggled
``.`` line arrives as ``..``, so not even an upstream that honours bare-LF
endings can be made to see a second transaction.  We normalize rather than
reject (Postfix's ``reject`` mode) because our client is a trusted Postfix,
whose mail must not bounce for line endings that a local program wrote.

The handler (:mod:`.handler`) does the relaying.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.smtp import SMTP, Session, syntax

from smtp_tracker.errors import CommandRejected
from smtp_tracker.smtp import replies
from smtp_tracker.smtp.parameters import parse_mail_parameters, parse_rcpt_parameters
from smtp_tracker.smtp.transcript import CLIENT_SAID, WE_SAID_TO_CLIENT, Transcript

if TYPE_CHECKING:
    from smtp_tracker.smtp.handler import RelayHandler
    from smtp_tracker.smtp.transaction import Transaction
    from smtp_tracker.smtp.upstream import UpstreamSession

__all__ = [
    "REFUSAL_LOG_INTERVAL_S",
    "ConnectionSlots",
    "RelaySMTP",
    "RelaySession",
    "client_allowed",
]

log = logging.getLogger("smtp_tracker.smtpd")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Seconds between two log lines about connections refused for ``max_connections``.
REFUSAL_LOG_INTERVAL_S = 10.0

#: C0 controls and DEL: never in a command argument (RFC 5321 §2.3.8, §4.1.2).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: aiosmtpd's stock replies, given the enhanced status codes RFC 2034 §3 asks for.
_STOCK_REPLIES = {
    "500 Error: bad syntax": "500 5.5.2 syntax error",
    "500 Command line too long": "500 5.5.2 command line too long",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 line too long (RFC 5321 §4.5.3.1.6)",
    "500 Error: strict ASCII mode": "500 5.5.2 non-ASCII data without SMTPUTF8",
    "552 Error: Too much mail data": replies.R552_MESSAGE_TOO_BIG,
    "503 Error: need RCPT command": replies.R503_NEED_RCPT,
    "503 Error: need MAIL command": replies.R503_NEED_MAIL,
    "503 Error: send HELO first": "503 5.5.1 send HELO or EHLO first",
    "501 Syntax: DATA": "501 5.5.4 syntax: DATA",
    "501 Syntax: RSET": "501 5.5.4 syntax: RSET",
    "501 Syntax: QUIT": "501 5.5.4 syntax: QUIT",
    "501 Syntax: EHLO hostname": "501 5.5.4 syntax: EHLO hostname",
    "501 Syntax: HELO hostname": "501 5.5.4 syntax: HELO hostname",
    "250 OK": replies.R250_OK,
    "221 Bye": replies.R221_BYE,
    "530 Must issue a STARTTLS command first": "530 5.7.0 must issue a STARTTLS command first",
    "554 Command refused due to lack of security": "554 5.7.0 command refused: TLS failed",
    "454 TLS not available": "454 4.7.0 TLS not available",
}
#: aiosmtpd's reply to an unknown command quotes it; ours does not.
_UNRECOGNIZED_PREFIX = '500 Error: command "'


def client_allowed(peer: Any, networks: Sequence[IPNetwork]) -> bool:
    """Whether a peer address (a socket's peername tuple) is inside ``networks``."""
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class ConnectionSlots:
    """How many downstream connections are served at once (``max_connections``).

    One instance is shared by every :class:`RelaySMTP` of a listener: a
    connection takes a slot when it is made and gives it back when it is lost;
    one that finds none free is refused with ``421 4.3.2``.

    :param limit: the most connections served at once (>= 1).
    :ivar active: connections holding a slot now.
    :ivar refused: connections refused since start.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.active = 0
        self.refused = 0
        self._logged_at = -REFUSAL_LOG_INTERVAL_S
        self._refused_unlogged = 0

    def take(self) -> bool:
        """Take a slot; False (and counted as refused) when all are taken."""
        if self.active >= self.limit:
            self.refused += 1
            self._refused_unlogged += 1
            return False
        self.active += 1
        return True

    def give_back(self) -> None:
        """Return a slot taken with :meth:`take`."""
        self.active -= 1

    def log_refusal(self, peer: Any) -> None:
        """Log a refusal, at most once per :data:`REFUSAL_LOG_INTERVAL_S` (a flood
        of connections must not become a flood of log lines)."""
        now = time.monotonic()
        if now - self._logged_at < REFUSAL_LOG_INTERVAL_S:
            return
        log.warning(
            "reject: connect from %s: too many connections (max_connections=%d); "
            "%d refused since the last report, %d in all",
            _peer_text(peer),
            self.limit,
            self._refused_unlogged,
            self.refused,
        )
        self._logged_at = now
        self._refused_unlogged = 0


class RelaySession(Session):
    """aiosmtpd's Session plus the relay's state for one connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.upstream: UpstreamSession | None = None
        self.transaction: Transaction | None = None
        self.transcript: Transcript | None = None
        self.transactions = 0


class RelaySMTP(SMTP):
    """One downstream connection; see the module docstring for what differs from aiosmtpd.

    :param handler: the :class:`~smtp_tracker.smtp.handler.RelayHandler`.
    :param allowed_clients: networks whose clients may connect (RFC 5321 §7.1).
    :param max_message_bytes: SIZE limit (RFC 1870), in bytes.
    :param client_timeout_s: idle timeout for the client, in seconds.
    :param keep_transcript: whether to copy the conversation for capture files.
    :param slots: the listener's ``max_connections`` slots; unlimited when None.
    """

    session: RelaySession | None

    def __init__(
        self,
        handler: RelayHandler,
        *,
        allowed_clients: Sequence[IPNetwork],
        max_message_bytes: int,
        client_timeout_s: float,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        keep_transcript: bool,
        slots: ConnectionSlots | None = None,
    ) -> None:
        super().__init__(
            handler,
            data_size_limit=max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="ESMTP smtp-tracker",
            tls_context=tls_context,
            require_starttls=False,
            timeout=client_timeout_s,
            auth_require_tls=True,
        )
        # aiosmtpd keeps these in a class attribute that every new connection clears
        # and every EHLO raises (RFC 1870 §3: +26 for SIZE); keep them per connection.
        base = self.command_size_limit
        self.command_size_limits: collections.defaultdict[str, int] = collections.defaultdict(
            lambda: base
        )
        self._allowed_clients = tuple(allowed_clients)
        self._max_message_bytes = max_message_bytes
        self._keep_transcript = keep_transcript
        self._client_timeout_s = client_timeout_s
        self._slots = slots
        self._holds_slot = False
        self._smtp_methods = {
            name: self._checked(name, method) for name, method in self._smtp_methods.items()
        }

    # -- session and access control --------------------------------------------

    def _create_session(self) -> RelaySession:
        session = RelaySession(self.loop)
        if self._keep_transcript:
            session.transcript = Transcript()
        return session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrade = self._original_transport is not None  # the TLS layer after STARTTLS
        super().connection_made(transport)
        if not upgrade and self._slots is not None:
            self._holds_slot = self._slots.take()

    async def _handle_client(self) -> None:
        assert self.session is not None
        if self._slots is not None and not self._holds_slot:
            self._slots.log_refusal(self.session.peer)
            await self.push(replies.R421_TOO_MANY_CONNECTIONS)
            assert self.transport is not None
            self.transport.close()
            return
        if not client_allowed(self.session.peer, self._allowed_clients):
            log.warning(
                "reject: connect from %s: client not in allowed_clients",
                _peer_text(self.session.peer),
            )
            await self.push(replies.R554_ACCESS_DENIED)
            assert self.transport is not None
            self.transport.close()
            return
        log.info("connect from %s", _peer_text(self.session.peer))
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        if self._holds_slot:
            self._holds_slot = False
            assert self._slots is not None
            self._slots.give_back()
        super().connection_lost(error)
        if session is not None:
            handler: RelayHandler = self.event_handler
            handler.schedule_disconnect(session)

    def extend_timeout(self, seconds: float) -> None:
        """Keep the client connection open while we wait on the upstream for ``seconds``."""
        self._reset_timeout(max(seconds, self._client_timeout_s))

    def _timeout_cb(self) -> None:
        """The client said nothing for ``client_timeout_s``: tell it so, then close."""
        transport = self.transport
        if transport is None:  # lost already; connection_lost did the rest
            return
        if not transport.is_closing():
            peer = _peer_text(self.session.peer) if self.session is not None else "?"
            log.info("%s: timeout after %g s without a command", peer, self._client_timeout_s)
            if self.session is not None and self.session.transcript is not None:
                self.session.transcript.add(WE_SAID_TO_CLIENT, replies.R421_TIMEOUT)
            self._writer.write(replies.R421_TIMEOUT.encode("ascii") + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    # -- transcript and replies ---------------------------------------------------

    def _checked(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        """Wrap a command: copy it to the transcript; refuse control characters in it."""

        async def call(arg: str | None) -> None:
            if self.session is not None and self.session.transcript is not None:
                self.session.transcript.add(CLIENT_SAID, name if arg is None else f"{name} {arg}")
            if arg is not None and _CONTROL.search(arg):
                await self.push(replies.R501_CONTROL_CHARACTER)
                return
            await method(arg)
            # The idle clock runs from our reply, not from the command: a reply
            # that waited on the upstream (extend_timeout) must not shorten it, nor
            # leave the longer wait in force for the next command.
            if self.transport is not None and not self.transport.is_closing():
                self._reset_timeout()

        return call

    async def push(self, status: AnyStr) -> None:
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        text = _STOCK_REPLIES.get(text, text)
        if text.startswith(_UNRECOGNIZED_PREFIX):
            text = replies.R500_UNRECOGNIZED
        if self.session is not None and self.session.transcript is not None:
            self.session.transcript.add(WE_SAID_TO_CLIENT, text)
        await super().push(text)

    async def handle_exception(self, error: Exception) -> str:
        peer = _peer_text(self.session.peer) if self.session is not None else "?"
        log.error("%s: unexpected error", peer, exc_info=error)
        if self.session is not None:
            handler: RelayHandler = self.event_handler
            await handler.abort_transaction(self.session, reason="internal error")
        return replies.R451_INTERNAL_ERROR

    # -- commands -----------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        envelope = self.envelope
        await super().smtp_DATA(arg or "")
        session = self.session
        refused = self.envelope is not envelope
        if session is not None and session.transaction is not None and refused:
            # aiosmtpd refused the payload itself (552 too big, 500 line too long) and
            # reset the envelope without calling handle_DATA: end the upstream's side.
            handler: RelayHandler = self.event_handler
            await handler.abort_transaction(session, reason="payload refused")

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """Refuse STARTTLS in a transaction or over TLS; otherwise end the upstream side first.

        RFC 3207 §4.2: after the handshake the server discards what it knew of
        the client, and aiosmtpd starts a new session; the old one's upstream
        connection (open since an earlier MAIL) is closed here with QUIT, so
        that nothing is left behind on the smarthost.
        """
        session = self.session
        if not arg and self.tls_context is not None and session is not None:
            if self._tls_protocol is not None:
                await self.push(replies.R554_TLS_ALREADY_ACTIVE)
                return
            in_transaction = self.envelope is not None and self.envelope.mail_from is not None
            if in_transaction or session.transaction is not None:
                await self.push(replies.R503_TRANSACTION_IN_PROGRESS)
                return
            handler: RelayHandler = self.event_handler
            await handler.close_session(session)
        await super().smtp_STARTTLS(arg or "")

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        await self.push(replies.R502_AUTH_NOT_OFFERED)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        syntax_error = "501 5.5.4 syntax: MAIL FROM:<address> [SP <mail-parameters>]"
        rest = self._strip_command_keyword("FROM:", arg or "")
        if rest is None:
            await self.push(syntax_error)
            return
        address, parameter_text = self._getaddr(rest)
        if address is None:
            await self.push("553 5.1.7 malformed address")
            return
        if not address or (parameter_text and not self.session.extended_smtp):
            await self.push(syntax_error)
            return
        if self.envelope.mail_from is not None:
            await self.push(replies.R503_NESTED_MAIL)
            return
        try:
            parameters = parse_mail_parameters(
                parameter_text or "", max_message_bytes=self._max_message_bytes
            )
        except CommandRejected as exc:
            await self.push(exc.reply)
            return
        if address == "<>":
            address = ""
        self.envelope.smtp_utf8 = parameters.smtputf8
        handler: RelayHandler = self.event_handler
        status = await handler.mail(self, self.session, self.envelope, address, parameters)
        await self.push(status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push(replies.R503_NEED_MAIL)
            return
        syntax_error = "501 5.5.4 syntax: RCPT TO:<address> [SP <mail-parameters>]"
        rest = self._strip_command_keyword("TO:", arg or "")
        if rest is None:
            await self.push(syntax_error)
            return
        address, parameter_text = self._getaddr(rest)
        if address is None:
            await self.push("553 5.1.3 malformed address")
            return
        if not address or address == "<>" or (parameter_text and not self.session.extended_smtp):
            await self.push(syntax_error)
            return
        try:
            parameters = parse_rcpt_parameters(parameter_text or "")
        except CommandRejected as exc:
            await self.push(exc.reply)
            return
        handler: RelayHandler = self.event_handler
        status = await handler.rcpt(self, self.session, self.envelope, address, parameters)
        await self.push(status)


def _peer_text(peer: Any) -> str:
    try:
        host, port = peer[0], peer[1]
    except (TypeError, IndexError):
        return "unknown"
    return f"[{host}]:{port}"
