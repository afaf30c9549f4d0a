"""The upstream side: one aiosmtplib connection, driven in step with a downstream session.

:class:`UpstreamSession` opens the connection (EHLO, STARTTLS as configured,
EHLO again, AUTH when a user is set), forwards MAIL, each RCPT and DATA as
they come, and hands back the upstream's :class:`Reply`.  Between
transactions the connection may be kept for another downstream session
(:mod:`.pool`).
Failures that are not the upstream's verdict on the message (refused, timed
out, TLS, AUTH, dropped) raise an :class:`~smtp_tracker.errors.UpstreamError`
whose reply is a 4xx with an enhanced status code, so Postfix keeps the
message and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtplib

from smtp_tracker.errors import (
    CommandRejected,
    UpstreamAuthError,
    UpstreamError,
    UpstreamTLSError,
    UpstreamUnavailable,
)
from smtp_tracker.smtp import replies
from smtp_tracker.smtp.parameters import sendable
from smtp_tracker.smtp.payload import wire_pieces
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.transcript import NOTE, UPSTREAM_SAID, WE_SAID_TO_UPSTREAM, Transcript

__all__ = ["UpstreamObserver", "UpstreamSession", "UpstreamSettings", "filter_parameters"]

log = logging.getLogger("smtp_tracker.relay")

#: ESMTP parameters and the extension the upstream must advertise to receive them.
#: RFC 1870 (SIZE), RFC 6152 (BODY), RFC 6531 (SMTPUTF8), RFC 3461 §4 (DSN).
_PARAMETER_EXTENSION = {
    "SIZE": "size",
    "BODY": "8bitmime",
    "SMTPUTF8": "smtputf8",
    "RET": "dsn",
    "ENVID": "dsn",
    "NOTIFY": "dsn",
    "ORCPT": "dsn",
}


def _translate(exc: BaseException) -> UpstreamError:
    """Map an aiosmtplib/ssl/OS exception to the UpstreamError we reply with."""
    if isinstance(exc, UpstreamError):
        return exc
    cause = exc.__cause__
    if isinstance(exc, ssl.SSLError) or isinstance(cause, ssl.SSLError):
        return UpstreamTLSError(replies.R451_UPSTREAM_TLS_FAILED)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return UpstreamUnavailable(replies.R451_UPSTREAM_TIMEOUT)
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return UpstreamUnavailable(replies.R451_UPSTREAM_UNAVAILABLE)
    return UpstreamUnavailable(replies.R451_UPSTREAM_LOST)


def filter_parameters(parameters: Sequence[str], extensions: dict[str, str]) -> list[str]:
    """Keep the ESMTP parameters whose extension the upstream advertised.

    Parameters are never invented and never altered; one whose extension the
    upstream lacks is left out (RFC 5321 §4.1.1.11: a client must not use an
    extension the server did not advertise).

    :param parameters: ``KEYWORD=value`` strings as the client sent them.
    :param extensions: the upstream's EHLO keywords, lower-case, as aiosmtplib keeps them.
    """
    kept = []
    for parameter in parameters:
        keyword = parameter.partition("=")[0].upper()
        extension = _PARAMETER_EXTENSION.get(keyword)
        if extension is not None and extension in extensions:
            kept.append(parameter)
    return kept


class UpstreamObserver(Protocol):
    """What an :class:`UpstreamSession` reports as it goes (for :mod:`smtp_tracker.metrics`)."""

    def connected(self, seconds: float) -> None:
        """TCP connect, implicit TLS and the greeting took ``seconds``."""

    def connect_failed(self, error: UpstreamError) -> None:
        """Opening the connection failed with ``error`` (TLS, AUTH, unavailable)."""

    def replied(self, command: str, code: int, seconds: float) -> None:
        """The upstream answered ``command`` (MAIL, RCPT, DATA) with ``code`` in ``seconds``."""


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
    """How to reach the upstream smarthost.

    :ivar tls: ``"starttls"`` (required: never falls back to plaintext, RFC 3207),
        ``"implicit"`` (TLS from the first byte, RFC 8314 §3.3) or ``"none"``.
    :ivar tls_context: client context, verification on unless the admin said otherwise.
    :ivar connect_timeout_s: TCP connect, TLS handshake and greeting, in seconds.
    :ivar command_timeout_s: each command's reply, in seconds (RFC 5321 §4.5.3.2
        suggests 5 minutes for MAIL and RCPT).
    :ivar data_timeout_s: the reply to the end of data, in seconds (RFC 5321
        §4.5.3.2.6 suggests 10 minutes).
    """

    host: str
    port: int
    tls: str
    tls_context: ssl.SSLContext | None
    helo_name: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 30.0
    command_timeout_s: float = 300.0
    data_timeout_s: float = 600.0
    #: told of connect times, connect failures and reply times (none: nobody)
    observer: UpstreamObserver | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """``host:port`` as it appears in logs (``relay=``)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class UpstreamSession:
    """One connection to the upstream, opened on demand and reused across transactions.

    Not safe for concurrent use: one downstream session drives it, one command at
    a time (:class:`~.pool.ConnectionPool` lends it to one transaction at a time).
    """

    def __init__(self, settings: UpstreamSettings, transcript: Transcript | None = None) -> None:
        self._settings = settings
        #: where the conversation is copied (capture), or None; a pooled connection
        #: takes the transcript of the session it is lent to
        self.transcript = transcript
        self._client: aiosmtplib.SMTP | None = None
        #: the upstream said 421 (closing the connection, RFC 5321 §3.8): never reused
        self.closing = False

    @property
    def settings(self) -> UpstreamSettings:
        """How this connection reaches its upstream."""
        return self._settings

    @property
    def is_open(self) -> bool:
        """Whether a usable connection is open now."""
        return self._client is not None and self._client.is_connected

    @property
    def reusable(self) -> bool:
        """Open, and the upstream never said 421 on it: it may carry another transaction."""
        return self.is_open and not self.closing

    @property
    def extensions(self) -> dict[str, str]:
        """The upstream's EHLO keywords (lower-case) → parameters; empty when closed."""
        return dict(self._client.esmtp_extensions) if self._client is not None else {}

    def _note(self, direction: str, text: str) -> None:
        if self.transcript is not None:
            self.transcript.add(direction, text)

    def _note_reply(self, code: int, message: str) -> None:
        if code == 421:
            self.closing = True
        if self.transcript is not None:
            for line in message.split("\n") or [""]:
                self.transcript.add(UPSTREAM_SAID, f"{code} {line}")

    def _observe_reply(self, command: str, code: int, started: float) -> None:
        if self._settings.observer is not None:
            self._settings.observer.replied(command, code, time.monotonic() - started)

    async def ensure_open(self) -> None:
        """Connect, say EHLO, STARTTLS and AUTH as configured, unless already open.

        :raises UpstreamTLSError: STARTTLS required but not offered, refused, or the
            handshake or certificate verification failed (4.7.4 / 4.7.5).
        :raises UpstreamAuthError: the upstream refused our credentials (4.7.8).
        :raises UpstreamUnavailable: refused, unresolvable, timed out, or the greeting
            was not 220 (4.4.x, or the upstream's own code made temporary).
        """
        if self.is_open:
            return
        await self.close()
        settings = self._settings
        client = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            local_hostname=settings.helo_name,
            timeout=settings.command_timeout_s,
            use_tls=settings.tls == "implicit",
            start_tls=False,
            tls_context=settings.tls_context,
        )
        self._note(NOTE, f"connecting to {settings.label} (tls={settings.tls})")
        observer = settings.observer
        started = time.monotonic()
        try:
            greeting = await client.connect(timeout=settings.connect_timeout_s)
            if observer is not None:
                observer.connected(time.monotonic() - started)
            self._note_reply(greeting.code, greeting.message)
            await self._ehlo(client)
            if settings.tls == "starttls":
                await self._starttls(client)
            if settings.user is not None:
                await self._login(client)
        except aiosmtplib.SMTPConnectResponseError as exc:
            client.close()
            self._note_reply(exc.code, exc.message)
            reply = Reply.from_upstream(exc.code, exc.message, command="CONNECT").as_transient()
            error: UpstreamError = UpstreamUnavailable(reply)
            if observer is not None:
                observer.connect_failed(error)
            raise error from exc
        except UpstreamError as exc:
            client.close()
            if observer is not None:
                observer.connect_failed(exc)
            raise
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            error = _translate(exc)
            if observer is not None:
                observer.connect_failed(error)
            self._note(NOTE, f"failed: {type(exc).__name__}")
            log.warning("upstream %s: %s (%s)", settings.label, error.reply.text, _describe(exc))
            raise error from exc
        self._client = client

    async def _ehlo(self, client: aiosmtplib.SMTP) -> None:
        self._note(WE_SAID_TO_UPSTREAM, f"EHLO {self._settings.helo_name}")
        try:
            response = await client.ehlo()
        except aiosmtplib.SMTPHeloError as exc:
            self._note_reply(exc.code, exc.message)
            reply = Reply.from_upstream(exc.code, exc.message, command="EHLO").as_transient()
            raise UpstreamUnavailable(reply) from exc
        self._note_reply(response.code, response.message)

    async def _starttls(self, client: aiosmtplib.SMTP) -> None:
        settings = self._settings
        if not client.supports_extension("starttls"):
            log.warning("upstream %s: STARTTLS required but not offered", settings.label)
            raise UpstreamTLSError(replies.R451_UPSTREAM_STARTTLS_MISSING)
        self._note(WE_SAID_TO_UPSTREAM, "STARTTLS")
        try:
            response = await client.starttls(
                tls_context=settings.tls_context, server_hostname=settings.host
            )
        except aiosmtplib.SMTPResponseException as exc:
            self._note_reply(exc.code, exc.message)
            log.warning("upstream %s: STARTTLS refused: %s", settings.label, exc.code)
            reply = Reply.from_upstream(exc.code, exc.message, command="STARTTLS").as_transient()
            raise UpstreamTLSError(reply) from exc
        except (ssl.SSLError, ssl.CertificateError) as exc:
            log.warning("upstream %s: TLS handshake failed: %s", settings.label, _describe(exc))
            raise UpstreamTLSError(replies.R451_UPSTREAM_TLS_FAILED) from exc
        self._note_reply(response.code, response.message)
        self._note(NOTE, f"TLS established ({client.get_transport_info('cipher')[0]})")
        await self._ehlo(client)

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        settings = self._settings
        assert settings.user is not None
        self._note(WE_SAID_TO_UPSTREAM, "AUTH <redacted>")
        try:
            response = await client.login(settings.user, settings.password or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            self._note_reply(exc.code, exc.message)
            log.warning(
                "upstream %s: AUTH as %s refused: %s", settings.label, settings.user, exc.code
            )
            raise UpstreamAuthError(replies.R451_UPSTREAM_AUTH_FAILED) from exc
        except aiosmtplib.SMTPResponseException as exc:
            self._note_reply(exc.code, exc.message)
            raise UpstreamAuthError(replies.R451_UPSTREAM_AUTH_FAILED) from exc
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            raise
        except aiosmtplib.SMTPException as exc:
            # aiosmtplib says so when the upstream offers no AUTH (or none we know).
            log.warning("upstream %s: AUTH not possible: %s", settings.label, exc)
            raise UpstreamAuthError(replies.R451_UPSTREAM_AUTH_FAILED) from exc
        self._note_reply(response.code, response.message)

    async def _command(self, command: str, argument: bytes, parameters: Sequence[str]) -> Reply:
        client = self._client
        if client is None or not client.is_connected:
            raise UpstreamUnavailable(replies.R451_UPSTREAM_LOST)
        words = [argument, *(p.encode("utf-8", "surrogateescape") for p in parameters)]
        if not all(sendable(word) for word in words):
            # aiosmtplib would refuse it (ValueError); the connection stays as it was
            self._note(NOTE, f"{command} not sent: control character in its argument")
            raise CommandRejected(replies.R501_CONTROL_CHARACTER)
        self._note(WE_SAID_TO_UPSTREAM, f"{command} {b' '.join(words).decode('utf-8', 'replace')}")
        started = time.monotonic()
        try:
            response = await client.execute_command(command.encode("ascii"), *words)
        except ValueError as exc:
            # an argument aiosmtplib refuses before writing anything: the
            # connection is intact, so only this command fails
            self._note(NOTE, f"{command} not sent: {type(exc).__name__}")
            log.warning("upstream %s: %s not sent: %s", self._settings.label, command, exc)
            raise CommandRejected(replies.R451_INTERNAL_ERROR) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            error = _translate(exc)
            self._note(NOTE, f"failed: {type(exc).__name__}")
            log.warning("upstream %s: %s: %s", self._settings.label, command, _describe(exc))
            raise error from exc
        self._note_reply(response.code, response.message)
        self._observe_reply(command, response.code, started)
        return Reply.from_upstream(response.code, response.message, command=command)

    async def mail(self, reverse_path: str, parameters: Sequence[str]) -> Reply:
        """Send ``MAIL FROM:<reverse_path>`` with the parameters the upstream supports.

        :param reverse_path: the address without angle brackets; ``""`` for the null
            reverse-path (RFC 5321 §4.5.5).
        :returns: the upstream's reply, whatever its code.
        :raises UpstreamError: the connection could not be opened or was lost (4xx).
        """
        await self.ensure_open()
        kept = filter_parameters(parameters, self.extensions)
        path = b"FROM:<" + reverse_path.encode("utf-8", "surrogateescape") + b">"
        return await self._command("MAIL", path, kept)

    async def rcpt(self, forward_path: str, parameters: Sequence[str]) -> Reply:
        """Send ``RCPT TO:<forward_path>``; see :meth:`mail`.

        :raises UpstreamError: the connection was lost or timed out (4xx).
        """
        kept = filter_parameters(parameters, self.extensions)
        path = b"TO:<" + forward_path.encode("utf-8", "surrogateescape") + b">"
        return await self._command("RCPT", path, kept)

    async def data(self, content: bytes, *, head: bytes = b"") -> Reply:
        """Send DATA and the message; return the upstream's final reply.

        After the 354 the message goes out in windows of
        :data:`~smtp_tracker.smtp.payload.WIRE_CHUNK_BYTES`, as
        :func:`~smtp_tracker.smtp.payload.wire_pieces` makes them, each written
        once the transport has room: bare CR and LF become CRLF (RFC 5321
        §2.3.8), a line's leading dot is doubled (§4.5.2), and ``CRLF.CRLF``
        ends it (§4.1.1.4); the same octets aiosmtplib's ``data()`` writes,
        without its two regular expressions over the payload and without a
        whole copy of the message in its wire form or in the transport's
        buffer (issue 15).  An empty message is sent empty, as Postfix relays
        one: DATA, then the end-of-data line alone.

        :param content: the message bytes, header and body, CRLF line ends.
        :param head: header fields sent before ``content`` (our trace field),
            so that ``head + content`` need not be built.
        :returns: the upstream's reply to DATA when not 354, else its reply to the
            end of data, whatever its code.
        :raises UpstreamError: the connection was lost or timed out during DATA (4xx).
        """
        client = self._client
        if client is None or not client.is_connected:
            raise UpstreamUnavailable(replies.R451_UPSTREAM_LOST)
        self._note(WE_SAID_TO_UPSTREAM, f"DATA ({len(head) + len(content)} bytes)")
        started = time.monotonic()
        try:
            response = await self._send_data(client, content, head)
        except aiosmtplib.SMTPDataError as exc:
            self._note_reply(exc.code, exc.message)
            self._observe_reply("DATA", exc.code, started)
            return Reply.from_upstream(exc.code, exc.message, command="DATA")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            self._note(NOTE, f"failed: {type(exc).__name__}")
            log.warning("upstream %s: DATA: %s", self._settings.label, _describe(exc))
            raise _translate(exc) from exc
        self._note_reply(response.code, response.message)
        self._observe_reply("DATA", response.code, started)
        return Reply.from_upstream(response.code, response.message, command="DATA")

    async def _send_data(
        self, client: aiosmtplib.SMTP, content: bytes, head: bytes
    ) -> aiosmtplib.SMTPResponse:
        """DATA, and after 354 the message in its wire form; the final reply.

        What aiosmtplib's ``SMTPProtocol.execute_data_command`` does, with our
        :func:`wire_pieces`: the protocol's command lock is held from DATA to the
        final reply, so that no other command (a QUIT from :meth:`close`) is
        written in between; the DATA write is followed by ``read_response`` with
        no await in between, so the reply is expected before it can arrive, and
        before the message is written the reply to it is marked as expected, as
        aiosmtplib does, so that a reply sent early (while the transport drains
        between two pieces) is kept for ``read_response``, not dropped as
        unsolicited.  The pieces and the final reply are each bounded by the
        data timeout (an upstream that stops reading times out).  A 421
        leaves the connection open, as ``data()`` does (:attr:`closing` keeps it
        from being reused); a lost connection or a timeout is the caller's to
        close.  ``tests/test_private_attribute_canaries.py`` watches the
        attributes used here that aiosmtplib does not document.

        :raises aiosmtplib.SMTPDataError: the upstream answered DATA other than 354,
            or the message other than 250.
        :raises aiosmtplib.SMTPServerDisconnected: the connection was lost.
        :raises aiosmtplib.SMTPReadTimeoutError: no reply within the data timeout.
        """
        timeout = self._settings.data_timeout_s
        protocol = client.protocol
        lock = protocol._command_lock if protocol is not None else None
        if protocol is None or lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        async with lock:
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != aiosmtplib.SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            protocol._response_pending = True
            async with asyncio.timeout(timeout):
                for piece in wire_pieces(content, head=head):
                    protocol.write(piece)
                    await protocol._drain_helper()  # room in the transport's buffer
            response = await protocol.read_response(timeout=timeout)
        if response.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def rset(self, timeout_s: float | None = None) -> bool:
        """Abort the upstream transaction (RFC 5321 §4.1.1.5); close the connection on failure.

        Also the check that a kept connection still works (:mod:`.pool`).

        :param timeout_s: seconds to wait for the reply (default: the command timeout).
        :returns: True when the upstream answered 250: no transaction is open on
            the connection and it may carry the next; False when it is closed or
            answered otherwise (the caller closes it).
        """
        client = self._client
        if client is None or not client.is_connected:
            return False
        self._note(WE_SAID_TO_UPSTREAM, "RSET")
        try:
            if timeout_s is None:
                response = await client.rset()
            else:
                response = await client.rset(timeout=timeout_s)
        except aiosmtplib.SMTPResponseException as exc:
            self._note_reply(exc.code, exc.message)
            return False
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self._note(NOTE, f"RSET failed: {type(exc).__name__}; closing")
            client.close()
            return False
        self._note_reply(response.code, response.message)
        return response.code == aiosmtplib.SMTPStatus.completed

    async def close(self) -> None:
        """Say QUIT (briefly) and close; never raises."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if client.is_connected:
                self._note(WE_SAID_TO_UPSTREAM, "QUIT")
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    await client.quit(timeout=5.0)
        finally:
            # also when cancelled: a client that hangs up right after its own QUIT
            # cancels the hook that is waiting here for the upstream's 221
            client.close()

    def abort(self) -> None:
        """Close at once, without QUIT; never raises.

        For a transaction cut short (shutdown after the grace period): a QUIT
        would wait behind the command in progress, and the upstream would read
        it as the end of a transaction it may then accept.
        """
        client, self._client = self._client, None
        if client is not None:
            self._note(NOTE, "closed without QUIT")
            client.close()


def _describe(exc: BaseException) -> str:
    """A short description for the log (never for an SMTP reply)."""
    parts = [f"{type(exc).__name__}: {exc}"]
    if exc.__cause__ is not None:
        parts.append(f"{type(exc.__cause__).__name__}: {exc.__cause__}")
    return "; ".join(parts)
