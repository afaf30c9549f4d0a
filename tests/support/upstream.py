"""The upstream test server: an aiosmtpd smarthost in the test's event loop.

It plays the smarthost smtp-tracker relays to: STARTTLS (required by default),
AUTH PLAIN/LOGIN after TLS (required by default), the usual ESMTP extensions,
replies with enhanced status codes (RFC 3463) like a real MTA, and a record of
everything it received. Each test scripts faults with ``@pytest.mark.upstream``;
the keywords are the fields of :class:`UpstreamOptions`.

What aiosmtpd's stock :class:`~aiosmtpd.smtp.SMTP` does differently, and why
:class:`_SmarthostSMTP` overrides it:

* ``smtp_MAIL`` upper-cases the parameters, refuses the null reverse-path and
  answers DSN parameters with 555; ``smtp_RCPT`` refuses every parameter. Ours
  keep each ``KEYWORD=value`` exactly as received (RFC 3461 ``ENVID``/``ORCPT``
  values are case-sensitive) and accept SIZE, BODY, SMTPUTF8, RET, ENVID,
  NOTIFY and ORCPT when the matching extension is advertised.
* ``smtp_DATA`` is rewritten to drop the connection part-way or after the
  payload, and to delay or replace the final reply.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
)

__all__ = [
    "PASSWORD",
    "USER",
    "Transaction",
    "UpstreamOptions",
    "UpstreamServer",
    "options_from_markers",
    "upstream_factory",
]

USER = "relay-user"
PASSWORD = "relay-pass"

#: ESMTP parameter → the :class:`UpstreamOptions` flag advertising its extension.
_PARAMETER_FLAG = {
    "SIZE": "advertise_size",
    "BODY": "advertise_8bitmime",
    "SMTPUTF8": "advertise_smtputf8",
    "RET": "advertise_dsn",
    "ENVID": "advertise_dsn",
    "NOTIFY": "advertise_dsn",
    "ORCPT": "advertise_dsn",
}
_MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"})
_RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})
#: Commands a client may send before STARTTLS when it is required (RFC 3207 §4).
_ALLOWED_BEFORE_STARTTLS = frozenset({"EHLO", "HELO", "NOOP", "QUIT", "STARTTLS", "RSET"})
_PATH = re.compile(
    r"^(?P<keyword>FROM|TO):\s*<(?P<address>[^<>]*)>(?P<parameters>.*)$", re.IGNORECASE | re.DOTALL
)
#: aiosmtpd's own reply texts, given the enhanced code a real MTA would add.
_ENHANCED = {
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "503 Error: send HELO first": "503 5.5.1 Error: send HELO/EHLO first",
    "503 Error: send EHLO first": "503 5.5.1 Error: send HELO/EHLO first",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "503 Already authenticated": "503 5.5.1 Error: already authenticated",
}


@dataclass(frozen=True, kw_only=True)
class UpstreamOptions:
    """How the upstream behaves; ``@pytest.mark.upstream(**options)`` sets these per test.

    Reply strings are whole SMTP replies, code first: ``"451 4.3.0 try again later"``.

    :ivar starttls: offer STARTTLS at all.
    :ivar require_starttls: refuse other commands before TLS with 530 5.7.0.
    :ivar cert: ``"trusted"`` (issued by the session CA) or ``"untrusted"``
        (issued by another CA, fails verification).
    :ivar auth_required: refuse MAIL, RCPT, DATA before AUTH with 530 5.7.0
        (AUTH is only offered after TLS).
    :ivar auth_ok: accept the test user's password; when false every AUTH gets 535 5.7.8.
    :ivar refuse: nothing listens on the port (connections refused) until ``start()``.
    :ivar greeting: a greeting other than 220: sent, then the connection is closed.
    :ivar starttls_reply: the reply to STARTTLS instead of 220 (no handshake follows).
    :ivar mail_reply: the reply to every MAIL instead of 250 (a 2xx still opens the transaction).
    :ivar rcpt_replies: recipient address → the reply to its RCPT instead of 250.
    :ivar data_command_reply: the reply to the DATA command instead of 354.
    :ivar data_reply: the reply after the payload instead of ``250 2.0.0 Ok: queued as …``;
        a transaction is recorded only when this reply is 2xx.
    :ivar drop_during_data: close the connection after the first line of the payload.
    :ivar drop_after_data: read the whole payload, then close without replying.
    :ivar stop_after_transactions: after accepting this many messages in all, stop
        listening and drop every connection (an upstream going away mid-delivery).
    :ivar delay_s: command → seconds to wait before handling it (so before its reply);
        ``"CONNECT"`` delays the greeting, ``"EOM"`` the reply after the payload.
    :ivar advertise_size: and the other ``advertise_*`` flags: put the extension in
        the EHLO reply (its parameters are refused with 555 5.5.4 when off).
    :ivar size_limit: the SIZE advertised and enforced, in bytes.
    :ivar hostname: the name in the greeting and the EHLO reply.
    """

    starttls: bool = True
    require_starttls: bool = True
    cert: Literal["trusted", "untrusted"] = "trusted"
    auth_required: bool = True
    auth_ok: bool = True
    refuse: bool = False
    greeting: str | None = None
    starttls_reply: str | None = None
    mail_reply: str | None = None
    rcpt_replies: Mapping[str, str] = field(default_factory=dict)
    data_command_reply: str | None = None
    data_reply: str | None = None
    drop_during_data: bool = False
    drop_after_data: bool = False
    stop_after_transactions: int | None = None
    delay_s: Mapping[str, float] = field(default_factory=dict)
    advertise_size: bool = True
    advertise_8bitmime: bool = True
    advertise_smtputf8: bool = True
    advertise_pipelining: bool = True
    advertise_enhancedstatuscodes: bool = True
    advertise_dsn: bool = True
    size_limit: int = 10 * 1024 * 1024
    hostname: str = "upstream.test"

    def __post_init__(self) -> None:
        if self.cert not in ("trusted", "untrusted"):
            raise ValueError(f"upstream cert must be 'trusted' or 'untrusted', not {self.cert!r}")
        replies: dict[str, str | None] = {
            name: getattr(self, name)
            for name in (
                "greeting",
                "starttls_reply",
                "mail_reply",
                "data_command_reply",
                "data_reply",
            )
        }
        replies.update({f"rcpt_replies[{a!r}]": r for a, r in self.rcpt_replies.items()})
        for name, reply in replies.items():
            if reply is not None and not re.match(r"^[2-5]\d\d[ -]", reply):
                raise ValueError(f"upstream {name} must be an SMTP reply, not {reply!r}")


def options_from_markers(markers: Sequence[Any]) -> UpstreamOptions:
    """Merge ``upstream`` markers, closest first (function over class over module).

    :param markers: as from ``request.node.iter_markers("upstream")``.
    :raises TypeError: a marker has positional arguments or an unknown keyword.
    """
    merged: dict[str, Any] = {}
    for marker in reversed(list(markers)):
        if marker.args:
            raise TypeError(f"@pytest.mark.upstream takes keywords only, got {marker.args!r}")
        merged.update(marker.kwargs)
    known = {f.name for f in dataclasses.fields(UpstreamOptions)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise TypeError(
            f"unknown @pytest.mark.upstream option(s) {unknown}; known: {sorted(known)}"
        )
    return UpstreamOptions(**merged)


@dataclass(frozen=True)
class Transaction:
    """One message the upstream accepted (its final reply was 2xx).

    :ivar mail_from: the reverse-path without angle brackets; ``""`` for ``<>`` (a bounce).
    :ivar mail_options: MAIL parameters exactly as received, e.g. ``["SIZE=300", "RET=HDRS"]``.
    :ivar rcpt_tos: the accepted recipients, in order.
    :ivar rcpt_options: per accepted recipient, its RCPT parameters as received.
    :ivar data: the payload after dot-unstuffing (RFC 5321 §4.5.2), CRLF line ends kept.
    :ivar tls: STARTTLS had been done on this connection.
    :ivar auth_user: the user name that authenticated, or ``None``.
    :ivar helo: the EHLO/HELO name the client gave last.
    :ivar queue_id: the id in ``250 2.0.0 Ok: queued as <queue_id>``.
    """

    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    data: bytes
    tls: bool
    auth_user: str | None
    helo: str | None
    queue_id: str


@dataclass
class _Pending:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_options: list[list[str]] = field(default_factory=list)


class _Handler:
    """aiosmtpd hooks: EHLO keywords, plain replies, AUTH check, no exception text leaked."""

    def __init__(self, server: UpstreamServer) -> None:
        self._server = server

    async def handle_EHLO(
        self,
        smtp: _SmarthostSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        options = self._server.options
        session.host_name = hostname
        keywords = []
        if options.advertise_size:
            keywords.append(f"SIZE {options.size_limit}")
        if options.advertise_8bitmime:
            keywords.append("8BITMIME")
        if options.advertise_smtputf8:
            keywords.append("SMTPUTF8")
        if options.advertise_pipelining:
            keywords.append("PIPELINING")
        if smtp.tls_context is not None and not smtp.is_tls:
            keywords.append("STARTTLS")
        if smtp.is_tls:
            keywords.append("AUTH PLAIN LOGIN")
        if options.advertise_enhancedstatuscodes:
            keywords.append("ENHANCEDSTATUSCODES")
        if options.advertise_dsn:
            keywords.append("DSN")
        lines = [options.hostname, *keywords]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_RSET(self, smtp: _SmarthostSMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"

    async def handle_NOOP(
        self, smtp: _SmarthostSMTP, session: Session, envelope: Envelope, arg: str | None
    ) -> str:
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, smtp: _SmarthostSMTP, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        if not isinstance(error, TLSSetupException):  # a client refusing our certificate
            self._server.errors.append(error)
        return "451 4.3.0 upstream test server error (see upstream.errors)"

    def authenticate(
        self, smtp: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        server = self._server
        ok = (
            server.options.auth_ok
            and isinstance(auth_data, LoginPassword)
            and auth_data.login == server.user.encode()
            and auth_data.password == server.password.encode()
        )
        if ok:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Error: authentication failed"
        )


class _SmarthostSMTP(SMTP):
    """aiosmtpd's protocol with the overrides described in the module docstring."""

    def __init__(self, server: UpstreamServer, tls_context: ssl.SSLContext | None) -> None:
        self._server = server
        self._pending: _Pending | None = None
        #: done once the connection is gone (its socket closed)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # aiosmtpd keeps these limits in a class attribute that every new SMTP() clears
        # and every EHLO raises: one per connection, so the relay's server is not touched.
        self.command_size_limits: dict[str, int] = collections.defaultdict(
            lambda: SMTP.command_size_limit
        )
        options = server.options
        handler = _Handler(server)
        super().__init__(
            handler,
            data_size_limit=options.size_limit,
            enable_SMTPUTF8=True,
            hostname=options.hostname,
            ident="ESMTP smtp-tracker test smarthost",
            tls_context=tls_context,
            require_starttls=False,  # done in _wrapped, with an enhanced code
            auth_required=options.auth_required,
            auth_require_tls=True,
            authenticator=handler.authenticate,
            loop=asyncio.get_running_loop(),
        )
        self._smtp_methods = {
            name: self._wrapped(name, method) for name, method in self._smtp_methods.items()
        }

    # -- state --------------------------------------------------------------------------

    @property
    def is_tls(self) -> bool:
        """STARTTLS has been done on this connection."""
        return self._tls_protocol is not None

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self._pending = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the TLS upgrade of a known connection
            self._server.connections.add(self)
            self._server.accepted += 1
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._server.connections.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)
        super().connection_lost(error)

    def drop(self) -> None:
        """Close the connection at once: no reply, no TLS close_notify, and nothing
        already received is read as commands (aiosmtpd's loop ends on ``transport is None``)."""
        transport, self.transport = self.transport, None
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        elif transport is not None:
            transport.close()

    # -- recording ----------------------------------------------------------------------

    def _wrapped(self, command: str, method: Any) -> Any:
        async def run(arg: str | None) -> None:
            self._server.transcript.append(
                "AUTH <redacted>"
                if command == "AUTH"
                else command
                if arg is None
                else f"{command} {arg}"
            )
            await self._delay(command)
            options = self._server.options
            if (
                options.require_starttls
                and self.tls_context is not None
                and not self.is_tls
                and command not in _ALLOWED_BEFORE_STARTTLS
            ):
                await self.push("530 5.7.0 Must issue a STARTTLS command first")
                return
            await method(arg)

        return run

    async def _delay(self, what: str) -> None:
        delay = self._server.options.delay_s.get(what)
        if delay:
            await asyncio.sleep(delay)

    async def push(self, status: str | bytes) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        text = _ENHANCED.get(text, text)
        self._server.transcript.append(text)
        await super().push(text)

    # -- greeting and STARTTLS ----------------------------------------------------------

    async def _handle_client(self) -> None:
        await self._delay("CONNECT")
        greeting = self._server.options.greeting
        if greeting is not None:
            await self.push(greeting)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_context is None:
            await self.push("502 5.5.1 Error: command not implemented")
            return
        if self.is_tls:
            await self.push("554 5.5.1 Error: TLS already active")
            return
        reply = self._server.options.starttls_reply
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_STARTTLS(arg)

    # -- the transaction ----------------------------------------------------------------

    def _parse(
        self, keyword: str, arg: str | None, allowed: frozenset[str]
    ) -> tuple[str, list[str]] | str:
        """``(address, parameters)`` from ``FROM:<a> P=v ...``, or the error reply."""
        match = _PATH.match(arg or "")
        if match is None or match["keyword"].upper() != keyword:
            return f"501 5.5.4 Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>"
        parameters = match["parameters"].split()
        options = self._server.options
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            name = name.upper()
            flag = _PARAMETER_FLAG.get(name)
            if name not in allowed or flag is None or not getattr(options, flag):
                return f"555 5.5.4 Unsupported option: {parameter}"
            if name == "BODY" and value.upper() not in ("7BIT", "8BITMIME"):
                return f"501 5.5.4 Bad BODY parameter: {parameter}"
            if name == "SIZE":
                if not value.isdigit():
                    return f"501 5.5.4 Bad message size syntax: {parameter}"
                if int(value) > options.size_limit:
                    return "552 5.3.4 Message size exceeds fixed limit"
        return match["address"], parameters

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        if self._pending is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        parsed = self._parse("FROM", arg, _MAIL_PARAMETERS)
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        address, parameters = parsed
        reply = self._server.options.mail_reply or "250 2.1.0 Ok"
        if reply.startswith("2"):
            self._pending = _Pending(mail_from=address, mail_options=parameters)
        await self.push(reply)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        pending = self._pending
        if pending is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        parsed = self._parse("TO", arg, _RCPT_PARAMETERS)
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        address, parameters = parsed
        reply = self._server.options.rcpt_replies.get(address, "250 2.1.5 Ok")
        if reply.startswith("2"):
            pending.rcpt_tos.append(address)
            pending.rcpt_options.append(parameters)
        await self.push(reply)

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        pending = self._pending
        if pending is None or not pending.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        options = self._server.options
        if options.data_command_reply is not None:
            self._pending = None
            await self.push(options.data_command_reply)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = await self._read_payload(drop_after_first_line=options.drop_during_data)
        if data is None or options.drop_after_data:
            self._pending = None
            self.drop()
            return
        await self._delay("EOM")
        self._pending = None
        if len(data) > options.size_limit:
            await self.push("552 5.3.4 Message size exceeds fixed limit")
            return
        queue_id = self._server.next_queue_id()
        reply = options.data_reply or f"250 2.0.0 Ok: queued as {queue_id}"
        if reply.startswith("2"):
            assert self.session is not None
            auth = self.session.auth_data if self.session.authenticated else None
            await self._server.record(
                Transaction(
                    mail_from=pending.mail_from,
                    mail_options=pending.mail_options,
                    rcpt_tos=pending.rcpt_tos,
                    rcpt_options=pending.rcpt_options,
                    data=data,
                    tls=self.is_tls,
                    auth_user=auth.login.decode() if isinstance(auth, LoginPassword) else None,
                    helo=self.session.host_name,
                    queue_id=queue_id,
                )
            )
        await self.push(reply)
        limit = options.stop_after_transactions
        if limit is not None and len(self._server.transactions) >= limit:
            self._server.stop_soon()

    async def _read_payload(self, *, drop_after_first_line: bool) -> bytes | None:
        """The payload up to ``CRLF.CRLF``, dot-unstuffed; ``None`` when dropped part-way.

        Lines longer than the reader's limit are kept whole, as received.
        """
        lines: list[bytes] = []
        fragments: list[bytes] = []
        while True:
            try:
                chunk = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as overrun:
                fragments.append(await self._reader.readexactly(overrun.consumed))
                continue
            except asyncio.IncompleteReadError:
                return None
            line = b"".join([*fragments, chunk])
            fragments.clear()
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)
            if drop_after_first_line:
                return None


class UpstreamServer:
    """The smarthost on ``127.0.0.1``, on a port of its own kept across stop/start.

    While stopped the port stays bound but not listening, so connections are
    refused and no other socket can take it before :meth:`start`.
    """

    def __init__(
        self,
        *,
        options: UpstreamOptions,
        tls_context: ssl.SSLContext,
        untrusted_tls_context: ssl.SSLContext,
        ca_file: Path,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.options = options
        self.host = host
        self.ca_file = ca_file
        self.user = USER
        self.password = PASSWORD
        #: messages accepted, in order
        self.transactions: list[Transaction] = []
        #: lines received (commands; AUTH as ``AUTH <redacted>``) and replies sent, in order
        self.transcript: list[str] = []
        #: exceptions raised inside the server (a bug in this module); checked at teardown
        self.errors: list[BaseException] = []
        self.connections: set[_SmarthostSMTP] = set()
        #: connections accepted since the start (TLS upgrades not counted again)
        self.accepted = 0
        self._stopping: set[asyncio.Task[None]] = set()
        self._tls_contexts = {"trusted": tls_context, "untrusted": untrusted_tls_context}
        self._server: asyncio.Server | None = None
        self._reserved: socket.socket | None = None
        self._changed = asyncio.Condition()
        self._queue_ids = 0
        self.port = self._reserve(port)

    @property
    def address(self) -> str:
        """``host:port`` as smtp-tracker's ``upstream`` setting takes it."""
        return f"{self.host}:{self.port}"

    @property
    def commands(self) -> list[str]:
        """The command lines of :attr:`transcript`, without the replies."""
        return [line for line in self.transcript if not line[:3].isdigit()]

    @property
    def is_serving(self) -> bool:
        return self._server is not None

    def configure(self, **changes: Any) -> None:
        """Change options from now on (new connections and later commands)."""
        self.options = dataclasses.replace(self.options, **changes)

    def _reserve(self, port: int) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, port))
        except OSError:
            sock.close()
            raise
        self._reserved = sock
        return int(sock.getsockname()[1])

    def _protocol(self) -> _SmarthostSMTP:
        options = self.options
        context = self._tls_contexts[options.cert] if options.starttls else None
        return _SmarthostSMTP(self, context)

    async def start(self) -> None:
        """Listen on :attr:`port` (again)."""
        if self._server is not None:
            return
        if self._reserved is None:
            self._reserve(self.port)
        sock, self._reserved = self._reserved, None
        assert sock is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, sock=sock)

    async def stop(self) -> None:
        """Stop listening and drop every open connection; the port stays reserved.

        Returns once every connection is gone: the sockets are closed on a later
        turn of the loop, and a test whose loop closes first leaks them.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self.connections)
        for connection in connections:
            connection.drop()
        await server.wait_closed()
        waiting = [c.lost for c in connections]
        waiting += [c._handler_coroutine for c in connections if c._handler_coroutine is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=5.0)
        self._reserve(self.port)

    def stop_soon(self) -> None:
        """:meth:`stop` in a task of its own (from inside a connection's handler)."""
        task = asyncio.get_running_loop().create_task(self.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """Stop and release the port."""
        for task in list(self._stopping):
            await task
        await self.stop()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    def next_queue_id(self) -> str:
        self._queue_ids += 1
        return f"UP{self._queue_ids:06X}"

    async def record(self, transaction: Transaction) -> None:
        async with self._changed:
            self.transactions.append(transaction)
            self._changed.notify_all()

    async def wait_for_transactions(
        self, count: int, *, timeout_s: float = 10.0
    ) -> list[Transaction]:
        """Wait until at least ``count`` messages were accepted; return all of them.

        :raises AssertionError: fewer arrived within ``timeout_s`` seconds.
        """
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: len(self.transactions) >= count), timeout_s
                )
            except TimeoutError:
                tail = "\n  ".join(self.transcript[-15:])
                raise AssertionError(
                    f"upstream accepted {len(self.transactions)} of {count} transaction(s) "
                    f"within {timeout_s:g} s; last lines:\n  {tail}"
                ) from None
        return list(self.transactions)

    def raise_errors(self) -> None:
        """Fail when the server itself raised (a bug here, not in what is tested)."""
        if self.errors:
            raise AssertionError(f"the upstream test server raised: {self.errors!r}")


# -- more than one upstream (failover, copies) ------------------------------------------------


@pytest.fixture
async def upstream_factory(
    server_ssl_context: ssl.SSLContext,
    untrusted_server_ssl_context: ssl.SSLContext,
    ca_pem_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[UpstreamServer]]]:
    """``await upstream_factory(start=True, **options)``: another smarthost on 127.0.0.1.

    Each is closed at teardown and fails the test if it raised itself.
    """
    made: list[UpstreamServer] = []

    async def make(*, start: bool = True, **options: Any) -> UpstreamServer:
        server = UpstreamServer(
            options=UpstreamOptions(**options),
            tls_context=server_ssl_context,
            untrusted_tls_context=untrusted_server_ssl_context,
            ca_file=ca_pem_path,
        )
        made.append(server)
        if start:
            await server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            await server.close()
    for server in made:
        server.raise_errors()
