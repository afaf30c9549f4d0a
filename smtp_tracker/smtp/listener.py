"""The SMTP listener: the listening socket, its connection slots, and a graceful stop.

What aiosmtpd keeps in its ``Controller``, for our :class:`~.server.RelaySMTP`
and :class:`~.handler.RelayHandler`: :meth:`Listener.start` binds the address
and serves each connection with a new protocol; :meth:`Listener.stop` stops
accepting, lets transactions in flight finish (up to a grace period), tells
every session still open ``421 4.3.2`` (RFC 5321 §3.8) and closes it, and
waits for the clean-ups.  ``max_connections`` is kept by :class:`ConnectionSlots`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import ssl
import time
import weakref
from collections.abc import Sequence
from typing import Any

from smtp_tracker.smtp import replies
from smtp_tracker.smtp.handler import RelayHandler
from smtp_tracker.smtp.server import RelaySMTP, peer_text

__all__ = ["GOODBYE_TIMEOUT_S", "REFUSAL_LOG_INTERVAL_S", "ConnectionSlots", "Listener"]

log = logging.getLogger("smtp_tracker.smtpd")

#: Seconds between two log lines about connections refused for ``max_connections``.
REFUSAL_LOG_INTERVAL_S = 10.0
#: Seconds :meth:`Listener.stop` waits to hand a session its ``421`` at shutdown:
#: a client that does not read must not hold up the exit.
GOODBYE_TIMEOUT_S = 2.0


class ConnectionSlots:
    """How many downstream connections are served at once (``max_connections``).

    One instance is shared by every :class:`~.server.RelaySMTP` of a listener: a
    connection takes a slot when it is made and gives it back when it is lost;
    one that finds none free is refused with ``421 4.3.2`` (RFC 5321 §3.1); the
    refusals are counted and logged at most once per :data:`REFUSAL_LOG_INTERVAL_S`.

    :param limit: the most connections served at once (>= 1).
    :raises ValueError: when ``limit`` is below 1.
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
            peer_text(peer),
            self.limit,
            self._refused_unlogged,
            self.refused,
        )
        self._logged_at = now
        self._refused_unlogged = 0


class Listener:
    """Serves downstream SMTP connections on one address with one handler.

    :param handler: the relay handler every connection shares.
    :param host: the address to bind (a name, an IPv4 or IPv6 literal).
    :param port: the port to bind; 0 picks a free one (see :attr:`address`).
    :param allowed_clients: networks whose clients may connect (RFC 5321 §7.1).
    :param slots: the ``max_connections`` slots its connections share.
    :param max_message_bytes: SIZE limit (RFC 1870), in bytes.
    :param client_timeout_s: idle timeout for a client, in seconds.
    :param hostname: our name, in the greeting.
    :param tls_context: offered with STARTTLS (RFC 3207); none when None.
    :param keep_transcript: copy each conversation for capture files.
    :param protocol: the protocol class each connection gets (:class:`~.lmtp.LmtpSMTP`
        for the LMTP listener).
    :param reuse_port: bind with ``SO_REUSEPORT``, beside the other workers
        (:mod:`smtp_tracker.workers`).
    """

    def __init__(
        self,
        handler: RelayHandler,
        *,
        host: str,
        port: int,
        allowed_clients: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
        slots: ConnectionSlots,
        max_message_bytes: int,
        client_timeout_s: float,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        keep_transcript: bool,
        protocol: type[RelaySMTP] = RelaySMTP,
        reuse_port: bool = False,
    ) -> None:
        self.handler = handler
        self._reuse_port = reuse_port
        self._host = host
        self._port = port
        #: a new connection's protocol, but for its slots
        self._new_protocol = functools.partial(
            protocol,
            handler,
            allowed_clients=tuple(allowed_clients),
            max_message_bytes=max_message_bytes,
            client_timeout_s=client_timeout_s,
            hostname=hostname,
            tls_context=tls_context,
            keep_transcript=keep_transcript,
        )
        #: the ``max_connections`` slots, shared by this listener's connections
        self.slots = slots
        self._server: asyncio.Server | None = None
        self._protocols: weakref.WeakSet[RelaySMTP] = weakref.WeakSet()

    def _protocol(self) -> RelaySMTP:
        protocol = self._new_protocol(slots=self.slots)
        self._protocols.add(protocol)
        return protocol

    @property
    def protocols(self) -> list[RelaySMTP]:
        """The connections being served now (one protocol each)."""
        return list(self._protocols)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) bound (port 0 resolved).

        :raises RuntimeError: before :meth:`start`.
        """
        if self._server is None:
            raise RuntimeError("the SMTP listener is not started")
        sockname: Any = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def started(self) -> bool:
        """Whether :meth:`start` bound the address."""
        return self._server is not None

    async def start(self) -> None:
        """Bind the address and start serving.

        :raises OSError: when the address cannot be bound (in use, not ours).
        """
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, reuse_port=self._reuse_port or None
        )

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let transactions in flight finish, then close every session.

        New connections are refused at once (the listening socket is closed).
        Transactions that outlast ``grace_s``, and idle sessions, are told
        ``421 4.3.2`` (RFC 5321 §3.8, RFC 3463 X.3.2 "System not accepting
        network messages") and closed; their clients keep the message and
        retry.  A transaction cut short is closed upstream without QUIT, which
        would wait behind its command and might end in a delivery.  Bounded:
        ``grace_s`` plus :data:`GOODBYE_TIMEOUT_S` per client that does not read.

        :param grace_s: seconds to wait for transactions in flight.
        """
        server = self._server
        if server is not None:
            server.close()
        handler = self.handler
        if not await handler.wait_idle(grace_s):
            log.warning(
                "stopping with %d transactions unfinished; the client will retry",
                handler.active_transactions,
            )
        for protocol in list(self._protocols):
            session = protocol.session
            unfinished = session is not None and session.transaction is not None
            transport = protocol.transport  # None once the client is gone, even mid-push
            if transport is not None:
                with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
                    async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                        await protocol.push(replies.R421_SHUTTING_DOWN)
                transport.close()
            # connection_lost runs on a later turn of the loop; close the upstream now
            if session is not None:
                await handler.close_session(session, quit_upstream=not unfinished)
        if server is not None:
            await server.wait_closed()
        await handler.drain()
