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
- VRFY gets ``252 2.0.0``, EXPN ``502 5.5.1``, HELP ``214 2.0.0`` with the
  commands we implement, STARTTLS ``220 2.0.0``;
- the limits a hostile client meets (below).

The handler is anything with the :class:`RelayHooks` methods besides
aiosmtpd's ``handle_<VERB>`` hooks; this module never imports :mod:`.handler`
(aiosmtpd's protocol names its handler's hooks the same way).

Limits
------
- ``max_connections`` (:class:`~smtp_tracker.smtp.listener.ConnectionSlots`): a
  connection beyond it gets ``421 4.3.2`` instead of the greeting and is closed
  (RFC 5321 §3.1).
- ``client_timeout_s``: a client silent that long gets ``421 4.4.2`` and is
  disconnected (RFC 5321 §4.5.3.2); an open transaction is aborted upstream.
- Command lines over 512 octets (RFC 5321 §4.5.3.1.4; more after EHLO for the
  SIZE and SMTPUTF8 parameters) get ``500 5.5.2`` and the connection stays usable.
- A command argument holding CR, LF or another control character gets
  ``501 5.5.2`` and is never forwarded (RFC 5321 §2.3.8); a MAIL or RCPT path
  holding a TAB too (RFC 5321 §4.1.2; aiosmtplib would refuse to send it): that
  MAIL, or that recipient alone, is refused and the session goes on.
- A client that talks before our greeting, sends more after EHLO or HELO
  before our reply (RFC 2920 §3.1: EHLO ends a group; HELO allows no
  pipelining), or sends message content before our 354, gets ``554 5.5.0 Error:
  SMTP protocol synchronization`` and is disconnected, as Postfix does
  (``smtpd_forbid_unauth_pipelining``); PIPELINING after EHLO is kept.
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
import contextlib
import functools
import inspect
import ipaddress
import logging
import re
import ssl
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from warnings import warn

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    Envelope,
    _AuthMechAttr,
    login_always_fail,
    make_loop,
    syntax,
)

from smtp_tracker.errors import CommandRejected, SMTPReply
from smtp_tracker.smtp import replies
from smtp_tracker.smtp.parameters import (
    MailParameters,
    parse_mail_parameters,
    parse_rcpt_parameters,
    sendable,
)
from smtp_tracker.smtp.payload import DataState, read_payload
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.session import RelaySession
from smtp_tracker.smtp.transcript import CLIENT_SAID, WE_SAID_TO_CLIENT, Transcript

__all__ = [
    "RelayHooks",
    "RelaySMTP",
    "Slots",
    "client_allowed",
    "peer_text",
]

log = logging.getLogger("smtp_tracker.smtpd")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: C0 controls but TAB, and DEL: never in a command argument (RFC 5321 §2.3.8,
#: §4.1.2).  TAB is left to the MAIL and RCPT checks, which refuse it in a path
#: (:func:`~.parameters.sendable`) and take it as a space between parameters.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: aiosmtpd's stock replies, given the enhanced status codes RFC 2034 §3 asks for.
_STOCK_REPLIES: dict[str, Reply] = {
    "500 Error: bad syntax": replies.R500_SYNTAX_ERROR,
    "500 Command line too long": replies.R500_COMMAND_TOO_LONG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": replies.R500_LINE_TOO_LONG,
    "500 Error: strict ASCII mode": replies.R500_NON_ASCII,
    "552 Error: Too much mail data": replies.R552_MESSAGE_TOO_BIG,
    "503 Error: need RCPT command": replies.R503_NEED_RCPT,
    "503 Error: need MAIL command": replies.R503_NEED_MAIL,
    "503 Error: send HELO first": replies.R503_NEED_HELO,
    "501 Syntax: DATA": replies.R501_DATA_SYNTAX,
    "501 Syntax: RSET": replies.R501_RSET_SYNTAX,
    "501 Syntax: QUIT": replies.R501_QUIT_SYNTAX,
    "501 Syntax: EHLO hostname": replies.R501_EHLO_SYNTAX,
    "501 Syntax: HELO hostname": replies.R501_HELO_SYNTAX,
    "250 OK": replies.R250_OK,
    "221 Bye": replies.R221_BYE,
    "220 Ready to start TLS": replies.R220_READY_TO_START_TLS,
    "501 Syntax: STARTTLS": replies.R501_STARTTLS_SYNTAX,
    "530 Must issue a STARTTLS command first": replies.R530_STARTTLS_FIRST,
    "554 Command refused due to lack of security": replies.R554_TLS_FAILED,
    "454 TLS not available": replies.R454_TLS_NOT_AVAILABLE,
}
#: aiosmtpd's reply to an unknown command quotes it; ours does not.
_UNRECOGNIZED_PREFIX = '500 Error: command "'
#: Commands after which a client must wait for our reply: EHLO ends a pipelined
#: group (RFC 2920 §3.1) and HELO negotiates no pipelining at all.
_ENDS_GROUP = frozenset({"EHLO", "HELO", "LHLO"})
#: Turns of the event loop the greeting waits, so that input sent with the
#: connection is seen as sent before it (two suffice with asyncio's selector loop).
_TURNS_BEFORE_GREETING = 3
#: Seconds early the idle timer may run (the loop's clock resolution) and still time out.
_TIMER_SLACK_S = 0.001
#: Commands HELP does not list: AUTH is refused (502), EXPN is not implemented.
_NOT_LISTED = frozenset({"AUTH", "EXPN"})
#: The common MAIL/RCPT path, ``<dot-atom@domain>`` in ASCII, then the end or
#: blanks before a printable character other than a parenthesis (a comment, or
#: other white space, goes to the header parser's CFWS rules): what aiosmtpd's
#: ``_getaddr`` reads as the same address and rest (checked by property tests);
#: anything else goes to it.
_SIMPLE_PATH = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+(?=[!-'*-~])|\Z)"
)


def client_allowed(peer: Any, networks: Sequence[IPNetwork]) -> bool:
    """Whether a peer address (a socket's peername tuple) is inside ``networks``."""
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def peer_text(peer: Any) -> str:
    """A peer address for the log: ``[host]:port``, or ``unknown``."""
    try:
        host, port = peer[0], peer[1]
    except (TypeError, IndexError):
        return "unknown"
    return f"[{host}]:{port}"


class Slots(Protocol):
    """A listener's ``max_connections``, as each connection uses it
    (:class:`~smtp_tracker.smtp.listener.ConnectionSlots`)."""

    def take(self) -> bool:
        """Take a slot for a new connection; False when none is free."""
        ...

    def give_back(self) -> None:
        """Return the slot of a connection that is gone."""
        ...

    def log_refusal(self, peer: Any) -> None:
        """Log (at a bounded rate) that ``peer`` was refused for lack of a slot."""
        ...


class RelayHooks(Protocol):
    """What :class:`RelaySMTP` calls on its handler besides aiosmtpd's ``handle_<VERB>`` hooks.

    :class:`~smtp_tracker.smtp.handler.RelayHandler` implements it.
    """

    async def mail(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        reverse_path: str,
        parameters: MailParameters,
    ) -> SMTPReply:
        """MAIL FROM with a checked path and parameters; the reply to give."""
        ...

    async def rcpt(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        forward_path: str,
        parameters: tuple[str, ...],
    ) -> SMTPReply:
        """RCPT TO with a checked path and parameters; the reply to give."""
        ...

    async def abort_transaction(
        self, session: RelaySession, *, reason: str, reset_upstream: bool = True
    ) -> None:
        """End the session's unfinished transaction, if any."""
        ...

    async def close_session(self, session: RelaySession, *, quit_upstream: bool = True) -> None:
        """End the transaction, if any, and close the session's upstream connection."""
        ...

    def schedule_disconnect(self, session: RelaySession) -> None:
        """The client's connection is lost: clean up (in a task)."""
        ...

    async def settle(self, session: RelaySession) -> None:
        """Wait for what the session's last transaction still does after its reply."""
        ...


class RelaySMTP(SMTP):
    """One downstream connection; see the module docstring for what differs from aiosmtpd.

    :param handler: the handler (:class:`RelayHooks` and aiosmtpd's ``handle_<VERB>`` hooks).
    :param allowed_clients: networks whose clients may connect (RFC 5321 §7.1).
    :param max_message_bytes: SIZE limit (RFC 1870), in bytes.
    :param client_timeout_s: idle timeout for the client, in seconds.
    :param keep_transcript: whether to copy the conversation for capture files.
    :param slots: the listener's ``max_connections`` slots; unlimited when None.
    """

    session: RelaySession | None

    def __init__(
        self,
        handler: RelayHooks,
        *,
        allowed_clients: Sequence[IPNetwork],
        max_message_bytes: int,
        client_timeout_s: float,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        keep_transcript: bool,
        slots: Slots | None = None,
    ) -> None:
        self._aiosmtpd_init(handler, max_message_bytes, hostname, tls_context, client_timeout_s)
        self._hooks = handler
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
        self._greeted = False
        self._spoke_first = False
        #: lines of a multiline reply pushed before its last line (see :meth:`push`)
        self._held: list[str] = []

    def _aiosmtpd_init(
        self,
        handler: Any,
        max_message_bytes: int,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        """What aiosmtpd's ``SMTP.__init__`` does with our arguments, with its tables found once.

        aiosmtpd finds its command, AUTH and hook tables with ``inspect.getmembers``,
        ``dir`` and ``inspect.signature`` on every new connection: an eighth of the
        relay's CPU per message (issue 15).  They depend only on the two classes,
        so :func:`_tables_for` finds them once per pair and each connection binds
        them.  The same arguments as before: ``data_size_limit=max_message_bytes,
        enable_SMTPUTF8=True, decode_data=False, ident="ESMTP smtp-tracker",
        require_starttls=False, auth_require_tls=True`` and the defaults for the
        rest; ``tests/test_private_attribute_canaries.py`` checks that an instance
        made here has every attribute aiosmtpd's own ``__init__`` sets, with the
        same values, so that a new aiosmtpd release that changes them fails there.
        """
        self.__ident__ = "ESMTP smtp-tracker"
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = handler
        self.data_size_limit = max_message_bytes
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = tls_context
        if tls_context is not None:
            _warn_about_verification(tls_context)
        self.require_starttls = tls_context and False
        self._timeout_duration = timeout
        self._timeout_handle = None
        #: when the client's idle time runs out (loop time; see :meth:`_reset_timeout`)
        self._deadline = 0.0
        #: whether ``_timeout_handle`` is scheduled and has not run
        self._timer_pending = False
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._auth_callback = login_always_fail
        self._authenticator = None
        self._auth_required = False
        tables = _tables_for(type(self), handler)
        self._auth_methods = {
            mechanism: _AuthMechAttr(getattr(self if builtin else handler, name), builtin)
            for mechanism, (name, builtin) in tables.auth.items()
        }
        if _aiosmtpd_log.isEnabledFor(logging.INFO):
            _aiosmtpd_log.info(
                "Available AUTH mechanisms: "
                + " ".join(
                    m + "(builtin)" if impl.is_builtin else m
                    for m, impl in sorted(self._auth_methods.items())
                )
            )
        self._handle_hooks = {hook: getattr(handler, name) for hook, name in tables.hooks}
        self._ehlo_hook_ver = tables.ehlo_hook_ver
        self._smtp_methods = {
            command: types.MethodType(function, self) for command, function in tables.commands
        }
        self._enforce_call_limit = False

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

    def data_received(self, data: bytes) -> None:
        if not self._greeted:
            self._spoke_first = True
        super().data_received(data)

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
                peer_text(self.session.peer),
            )
            await self.push(replies.R554_ACCESS_DENIED)
            assert self.transport is not None
            self.transport.close()
            return
        log.info("connect from %s", peer_text(self.session.peer))
        # Bytes already waiting when we accepted are read on the loop's next turns
        # (asyncio registers the reader after connection_made): let them arrive.
        for _ in range(_TURNS_BEFORE_GREETING):
            await asyncio.sleep(0)
        if self._spoke_first:  # RFC 5321 §4.3.1: the client waits for our greeting
            await self._out_of_sync("CONNECT")
            return
        # aiosmtpd's _handle_client greets with no await before its write: input
        # that arrives from here on came after our greeting was sent.
        self._greeted = True
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        if self._holds_slot:
            self._holds_slot = False
            assert self._slots is not None
            self._slots.give_back()
        super().connection_lost(error)
        if session is not None:
            self._hooks.schedule_disconnect(session)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer: ``duration`` (default ``client_timeout_s``) from now.

        aiosmtpd cancels its timer and schedules a new one on each reset: per
        command its own, ours after the reply and the handler's
        :meth:`extend_timeout` (issue 15: a timer each).  Here the reset moves a
        deadline; the timer is scheduled anew only when the deadline comes before
        it, and a timer that fires before the deadline waits for the rest.
        """
        loop = self.loop
        self._deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if (
            self._timer_pending
            and handle is not None
            and not handle.cancelled()
            and handle.when() <= self._deadline
        ):
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = loop.call_at(self._deadline, self._timer_fired)
        self._timer_pending = True

    def _timer_fired(self) -> None:
        """The idle timer: wait again if the deadline moved on, else time out."""
        if self._deadline - self.loop.time() > _TIMER_SLACK_S:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timer_pending = False
        self._timeout_cb()

    def extend_timeout(self, seconds: float) -> None:
        """Keep the client connection open while we wait on the upstream for ``seconds``."""
        self._reset_timeout(max(seconds, self._client_timeout_s))

    def _timeout_cb(self) -> None:
        """The client said nothing for ``client_timeout_s``: tell it so, then close."""
        transport = self.transport
        if transport is None:  # lost already; connection_lost did the rest
            return
        if not transport.is_closing():
            peer = self._peer_text()
            log.info("%s: timeout after %g s without a command", peer, self._client_timeout_s)
            reply = str(replies.R421_TIMEOUT)
            self._transcribe(WE_SAID_TO_CLIENT, reply)
            self._writer.write(reply.encode("ascii") + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    # -- pipelining (RFC 2920) ----------------------------------------------------

    def _pending_input(self) -> int:
        """Bytes the client sent that no command has read yet.

        asyncio's StreamReader has no public peek; its ``_buffer`` is what
        aiosmtpd itself clears after STARTTLS (a canary test watches it).
        """
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        return len(buffer)

    async def _out_of_sync(self, after: str) -> None:
        """Refuse a client that did not wait for our reply, and close: Postfix's answer.

        RFC 5321 §4.3.1 (the greeting first), RFC 2920 §3.1 (EHLO and DATA end a
        pipelined group), RFC 5321 §4.1.1.4 (content only after 354).  Postfix
        3.9's ``smtpd_forbid_unauth_pipelining`` answers ``554 5.5.0`` and
        disconnects; the transaction, if any, is aborted upstream.
        """
        peer = self._peer_text()
        log.warning("reject: improper command pipelining after %s from %s", after, peer)
        with contextlib.suppress(ConnectionError):
            await self.push(replies.R554_PROTOCOL_SYNCHRONIZATION)
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()  # the command loop ends at its next await

    # -- transcript and replies ---------------------------------------------------

    def _peer_text(self) -> str:
        """The client, as the log names it; ``"?"`` before its session exists."""
        return peer_text(self.session.peer) if self.session is not None else "?"

    def _transcribe(self, direction: str, text: str) -> None:
        """Copy a line to the session's transcript, if it keeps one."""
        if self.session is not None and self.session.transcript is not None:
            self.session.transcript.add(direction, text)

    async def push(self, status: str | bytes | SMTPReply) -> None:
        """Send one reply line; aiosmtpd's own replies get their enhanced status codes.

        Nothing is written once the connection is closing (the client is gone,
        or we closed it after a last reply).  A line that says more lines of its
        reply follow (``250-``, RFC 5321 §4.2.1) is held and written with the
        reply's last line: aiosmtpd pushes an EHLO reply a line at a time, and
        each write is a system call (about half of them per relayed message; the
        client reads nothing of a reply before its last line anyway).

        :param status: a :class:`~.replies.Reply`, or a reply line (aiosmtpd's, a handler's).
        """
        if self.transport is None or self.transport.is_closing():
            return
        if not isinstance(status, str | bytes):
            text = str(status)
        else:
            text = status if isinstance(status, str) else status.decode("utf-8", "replace")
            stock = _STOCK_REPLIES.get(text)
            if stock is not None:
                text = str(stock)
            elif text.startswith(_UNRECOGNIZED_PREFIX):
                text = str(replies.R500_UNRECOGNIZED)
        self._transcribe(WE_SAID_TO_CLIENT, text)
        if text.rpartition("\n")[2][3:4] == "-":
            self._held.append(text)
            return
        if self._held:
            self._held.append(text)
            text = "\r\n".join(self._held)
            self._held.clear()
        await super().push(text)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an exception in its command loop: 451, logged, never echoed.

        A client gone where a command was due (end of stream, reset) is a
        disconnect, not an error: aiosmtpd cancels the loop on EOF, but a hook
        awaiting the upstream can lose that cancellation (Python 3.11's
        ``asyncio.wait_for``, in aiosmtplib, returns a reply that arrived with
        it), and the loop's next read then raises ``IncompleteReadError``.
        Postfix's ``smtp`` client does this after every QUIT
        (``smtp_skip_quit_response = yes``).

        :raises asyncio.CancelledError: after a disconnect, to end the loop.
        """
        peer = self._peer_text()
        if isinstance(error, asyncio.IncompleteReadError | ConnectionError):
            log.info("disconnect from %s", peer)
            if self.session is not None:
                await self._hooks.abort_transaction(
                    self.session, reason="disconnect", reset_upstream=False
                )
            if self.transport is not None:
                self.transport.close()
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()
            await asyncio.sleep(0)  # the cancellation is delivered here
        log.error("%s: unexpected error", peer, exc_info=error)
        if self.session is not None:
            await self._hooks.abort_transaction(self.session, reason="internal error")
        return str(replies.R451_INTERNAL_ERROR)

    # -- commands -----------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        envelope = self.envelope
        if (
            not arg
            and envelope is not None
            and envelope.rcpt_tos
            and self.session is not None
            and self.session.host_name
            and self._pending_input()
        ):
            await self._out_of_sync("DATA")  # content before our 354
            return
        await self._receive_data(arg or "")
        session = self.session
        refused = self.envelope is not envelope
        if session is not None and session.transaction is not None and refused:
            # aiosmtpd refused the payload itself (552 too big, 500 line too long) and
            # reset the envelope without calling handle_DATA: end the upstream's side.
            await self._hooks.abort_transaction(session, reason="payload refused")

    async def _receive_data(self, arg: str) -> None:
        """aiosmtpd's ``smtp_DATA`` with the payload read in chunks (:mod:`.payload`).

        The same checks, replies and hook calls in the same order; only the read
        differs, and :func:`~.payload.read_payload` gives the bytes and refusals
        aiosmtpd's line-by-line reader gives (issue 15).
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            payload = await read_payload(
                self._reader, size_limit=self.data_size_limit, line_limit=self.line_length_limit
            )
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if payload.state is not DataState.NOMINAL:
            too_long = payload.state is DataState.TOO_LONG
            await self.push(
                "500 Line too long (see RFC5321 4.5.3.1.6)"
                if too_long
                else "552 Error: Too much mail data"
            )
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = payload.content
        self.envelope.original_content = payload.content
        status: Any = MISSING
        if "DATA" in self._handle_hooks:
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

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
            await self._hooks.close_session(session)
        await super().smtp_STARTTLS(arg or "")

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        await self.push(replies.R502_AUTH_NOT_OFFERED)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str | None) -> None:
        """RFC 5321 §4.1.1.8: the commands we implement, or one command's syntax (214)."""
        listed = sorted(
            name
            for name, method in self._smtp_methods.items()
            if name not in _NOT_LISTED and self._syntax_available(method)
        )
        if not arg:
            await self.push(replies.R214_HELP.format(commands=" ".join(listed)))
            return
        name = arg.upper()
        if name not in listed:
            await self.push(replies.R501_HELP_UNKNOWN_COMMAND.format(commands=" ".join(listed)))
            return
        method: Any = self._smtp_methods[name]
        text: str = method.__smtp_syntax__
        if self.session is not None and self.session.extended_smtp:
            text += method.__smtp_syntax_extended__ or ""
        await self.push(replies.R214_SYNTAX.format(syntax=text))

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        """RFC 5321 §3.5.3: we cannot verify (the upstream decides at RCPT): 252."""
        await self.push(replies.R252_CANNOT_VRFY if arg else replies.R501_VRFY_SYNTAX)

    async def smtp_EXPN(self, arg: str | None) -> None:
        """RFC 5321 §3.5.2, §7.3: EXPN is not implemented (and not listed by HELP)."""
        await self.push(replies.R502_EXPN_NOT_IMPLEMENTED)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's ``_getaddr``: the address of a MAIL or RCPT path and the rest.

        The common ``<local@domain>`` is read with :data:`_SIMPLE_PATH`; aiosmtpd's
        reader (the ``email`` header parser, and a class defined on every call)
        took a fiftieth of the relay's CPU per message for the two paths (issue 15).

        :returns: ``(address, rest)``; ``(None, None)`` when it cannot be parsed.
        """
        match = _SIMPLE_PATH.match(arg)
        if match is None:
            address: str | None
            rest: str | None
            address, rest = super()._getaddr(arg)
            return address, rest
        found = match[1]
        if self.local_part_limit and len(found.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return found, arg[match.end() :]

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        rest = self._strip_command_keyword("FROM:", arg or "")
        if rest is None:
            await self.push(replies.R501_MAIL_SYNTAX)
            return
        address, parameter_text = self._getaddr(rest)
        if address is None:
            await self.push(replies.R553_MALFORMED_SENDER)
            return
        if not address or (parameter_text and not self.session.extended_smtp):
            await self.push(replies.R501_MAIL_SYNTAX)
            return
        if not sendable(address):
            await self.push(replies.R501_CONTROL_CHARACTER)
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
        reply = await self._hooks.mail(self, self.session, self.envelope, address, parameters)
        await self.push(reply)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push(replies.R503_NEED_MAIL)
            return
        rest = self._strip_command_keyword("TO:", arg or "")
        if rest is None:
            await self.push(replies.R501_RCPT_SYNTAX)
            return
        address, parameter_text = self._getaddr(rest)
        if address is None:
            await self.push(replies.R553_MALFORMED_RECIPIENT)
            return
        if not address or address == "<>" or (parameter_text and not self.session.extended_smtp):
            await self.push(replies.R501_RCPT_SYNTAX)
            return
        if not sendable(address):
            await self.push(replies.R501_CONTROL_CHARACTER)  # this recipient alone
            return
        try:
            parameters = parse_rcpt_parameters(parameter_text or "")
        except CommandRejected as exc:
            await self.push(exc.reply)
            return
        reply = await self._hooks.rcpt(self, self.session, self.envelope, address, parameters)
        await self.push(reply)


# -- aiosmtpd's per-connection tables, found once per class pair --------------------

#: aiosmtpd's logger (it logs the AUTH mechanisms of every new connection at INFO).
_aiosmtpd_log = logging.getLogger("mail.log")
#: Prefixes of the names aiosmtpd looks up on the protocol and the handler.
_INTROSPECTED = ("smtp_", "auth_", "handle_")

#: A command as the protocol's table holds it, before it is bound to a connection.
_Command = Callable[[RelaySMTP, str | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Tables:
    """What aiosmtpd's ``SMTP.__init__`` finds by introspection, by name.

    :ivar commands: ``(VERB, function)``: each ``smtp_VERB`` method, wrapped
        by :func:`_checked_command`, to be bound to a connection.
    :ivar auth: ``{mechanism: (attribute, builtin)}``: each ``auth_*`` method of
        the protocol (builtin) and then of the handler, in aiosmtpd's order.
    :ivar hooks: ``(hook, attribute)``: each ``handle_*`` method of the handler.
    :ivar ehlo_hook_ver: ``None`` (no ``handle_EHLO``), ``"old"`` (4 arguments)
        or ``"new"`` (5 arguments), as aiosmtpd decides it.
    """

    commands: tuple[tuple[str, _Command], ...]
    auth: dict[str, tuple[str, bool]]
    hooks: tuple[tuple[str, str], ...]
    ehlo_hook_ver: str | None


_TABLES: dict[tuple[type, type], _Tables] = {}


def _tables_for(protocol: type[RelaySMTP], handler: Any) -> _Tables:
    """The tables of ``protocol`` and ``handler``'s class, found on first use.

    A handler with hooks of its own (instance attributes named like them) gets
    tables found for it alone, as aiosmtpd would.  The protocol's commands are
    its methods as they are at first use: a method replaced on the class later
    (a test's monkeypatch) is not seen by new connections.
    """
    own = getattr(handler, "__dict__", None)
    if own and any(name.startswith(_INTROSPECTED) for name in own):
        return _introspect(protocol, handler)
    key = (protocol, type(handler))
    tables = _TABLES.get(key)
    if tables is None:
        tables = _TABLES[key] = _introspect(protocol, handler)
    return tables


def _introspect(protocol: type[RelaySMTP], handler: Any) -> _Tables:
    """aiosmtpd 1.4's look-ups in ``SMTP.__init__``, on the protocol class.

    :raises RuntimeError: a ``handle_EHLO`` that takes neither 4 nor 5
        arguments (aiosmtpd's own refusal).
    """
    auth: dict[str, tuple[str, bool]] = {}
    for owner, builtin in ((protocol, True), (handler, False)):
        for name in dir(owner):
            if name.startswith("auth_"):
                method = getattr(owner, name)
                default = name.replace("auth_", "").replace("__", "-")
                auth[getattr(method, "__auth_mechanism_name__", default)] = (name, builtin)
    hooks = tuple(
        (name.replace("handle_", ""), name) for name in dir(handler) if name.startswith("handle_")
    )
    ehlo_hook_ver: str | None = None
    ehlo_name = dict(hooks).get("EHLO")
    ehlo_hook = getattr(handler, ehlo_name) if ehlo_name is not None else None
    if ehlo_hook is not None:
        arguments = len(inspect.signature(ehlo_hook).parameters)
        if arguments == 4:
            ehlo_hook_ver = "old"
            warn(
                "Use the 5-argument handle_EHLO() hook instead of "
                "the 4-argument handle_EHLO() hook; "
                "support for the 4-argument handle_EHLO() hook will be "
                "removed in version 2.0",
                DeprecationWarning,
                stacklevel=4,
            )
        elif arguments == 5:
            ehlo_hook_ver = "new"
        else:
            raise RuntimeError("Unsupported EHLO Hook")
    commands = tuple(
        (
            name.replace("smtp_", ""),
            _checked_command(name.replace("smtp_", ""), getattr(protocol, name)),
        )
        for name in dir(protocol)
        if name.startswith("smtp_")
    )
    return _Tables(commands, auth, hooks, ehlo_hook_ver)


def _checked_command(name: str, method: _Command) -> _Command:
    """Wrap a command: copy it to the transcript; refuse control characters in it.

    ``functools.wraps`` keeps aiosmtpd's ``@syntax`` attributes, which HELP reads
    (through the bound method).
    """

    @functools.wraps(method)
    async def call(self: RelaySMTP, arg: str | None) -> None:
        self._transcribe(CLIENT_SAID, name if arg is None else f"{name} {arg}")
        if arg is not None and _CONTROL.search(arg):
            await self.push(replies.R501_CONTROL_CHARACTER)
            return
        if name in _ENDS_GROUP and self._pending_input():
            await self._out_of_sync(name)
            return
        if self.session is not None and self.session.recording is not None:
            await self._hooks.settle(self.session)
        await method(self, arg)
        # The idle clock runs from our reply, not from the command: a reply
        # that waited on the upstream (extend_timeout) must not shorten it, nor
        # leave the longer wait in force for the next command.
        if self.transport is not None and not self.transport.is_closing():
            self._reset_timeout()

    return call


def _warn_about_verification(context: ssl.SSLContext) -> None:
    """aiosmtpd's warnings about a server context that asks for client certificates."""
    if context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
        _aiosmtpd_log.warning(
            "tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
            "this might cause client connection problems"
        )
    elif context.check_hostname:
        _aiosmtpd_log.warning(
            "tls_context.check_hostname == True; this might cause client connection problems"
        )
