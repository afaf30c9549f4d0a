"""Canaries for the private parts of aiosmtpd, aiosmtplib and aiohttp we build on.

``pyproject.toml`` gives those libraries lower bounds only; the lock file
pins what CI runs, and CI's second, non-blocking run takes the newest
releases.  A release that renames or reshapes one of these attributes fails
here first, with the name, instead of somewhere deep in a relay test.

* aiosmtpd: ``smtp_tracker/smtp/server.py`` subclasses :class:`aiosmtpd.smtp.SMTP`
  (the DATA reader, command checks, PIPELINING synchronisation, HELP, STARTTLS),
  and sets the attributes ``SMTP.__init__`` would set itself, with its command,
  AUTH and hook tables found once per class (issue 15): an instance made that
  way must hold what aiosmtpd's own ``__init__`` gives it, attribute by attribute.
* aiosmtplib: ``smtp_tracker/smtp/upstream.py`` writes DATA and the message on
  the client's ``protocol`` (``write``, ``read_response(timeout=)``), holding its
  ``_command_lock`` as ``execute_data_command`` does, marking the reply as
  expected (``_response_pending``) before the message and waiting for room in
  the transport (``_drain_helper``) between its pieces (issue 15).
* aiohttp: ``smtp_tracker/web/site.py`` starts its own protocol factory with the
  runner's handler arguments (connection cap, TLS handshake timeout).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import ssl
import types
import weakref
from typing import Any

import aiosmtplib
import pytest
from aiohttp import web, web_server
from aiosmtpd.smtp import SMTP
from aiosmtplib.protocol import SMTPProtocol

from smtp_tracker.smtp.handler import RelayHandler
from smtp_tracker.smtp.lmtp import LmtpHandler, LmtpSMTP
from smtp_tracker.smtp.server import RelaySMTP
from smtp_tracker.smtp.upstream import UpstreamSettings

#: aiosmtpd.smtp.SMTP methods we call or override, with the parameters we pass.
SMTP_METHODS = {
    "_call_handler_hook": ["command"],
    "_getaddr": ["arg"],
    "_reset_timeout": ["duration"],
    "_set_post_data_state": [],
    "_strip_command_keyword": ["keyword", "arg"],
    "_syntax_available": ["method"],
    "_timeout_cb": [],
}

#: attributes an SMTP instance has once it is made (set in __init__/connection_made).
SMTP_INSTANCE_ATTRIBUTES = [
    "_handle_hooks",
    "_handler_coroutine",
    "_original_transport",
    "_reader",
    "_smtp_methods",
    "_timeout_duration",
    "_timeout_handle",
    "_tls_protocol",
    "_writer",
]


@pytest.mark.parametrize(("name", "parameters"), sorted(SMTP_METHODS.items()))
def test_aiosmtpd_smtp_keeps_the_method(name: str, parameters: list[str]) -> None:
    method = getattr(SMTP, name, None)
    assert callable(method), f"aiosmtpd.smtp.SMTP.{name} is gone"
    names = [p for p in inspect.signature(method).parameters if p != "self"]
    assert names[: len(parameters)] == parameters, f"SMTP.{name}{inspect.signature(method)}"


async def test_aiosmtpd_smtp_instances_keep_their_attributes() -> None:
    class Handler:
        pass

    smtp = SMTP(Handler())
    missing = [name for name in SMTP_INSTANCE_ATTRIBUTES if not hasattr(smtp, name)]
    # _reader/_writer/_handler_coroutine appear at connection_made in some releases:
    # look for them in the source instead of on an unconnected instance.
    source = inspect.getsource(SMTP)
    missing = [name for name in missing if f"self.{name}" not in source]
    assert missing == []
    assert isinstance(smtp._smtp_methods, dict) and "DATA" in smtp._smtp_methods


class _HandlerWithAuth:
    """A handler with its own AUTH mechanism and a per-instance hook."""

    def __init__(self) -> None:
        self.handle_NOOP = self._noop

    async def _noop(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return "250 OK"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return responses

    async def auth_CRAM__MD5(self, server: Any, args: list[str]) -> Any:
        return None


def _same(stock: Any, ours: Any, stock_owner: SMTP, our_owner: SMTP) -> bool:
    """Whether an attribute value of ``ours`` is what aiosmtpd gave ``stock``.

    Objects made per instance (the stream reader and its future) match by type;
    methods bound to the instance match by function (ours may wrap aiosmtpd's).
    """
    if isinstance(stock, types.MethodType):
        if not isinstance(ours, types.MethodType):
            return False
        function = ours.__func__
        function = getattr(function, "__wrapped__", function)
        if stock.__self__ is stock_owner:
            return ours.__self__ is our_owner and function is stock.__func__
        return ours.__self__ is stock.__self__ and function is stock.__func__
    if type(stock) is not type(ours):
        return False
    if isinstance(stock, dict):
        return list(stock) == list(ours) and all(
            _same(stock[key], ours[key], stock_owner, our_owner) for key in stock
        )
    if isinstance(stock, tuple):
        return len(stock) == len(ours) and all(
            _same(a, b, stock_owner, our_owner) for a, b in zip(stock, ours, strict=True)
        )
    if isinstance(stock, asyncio.StreamReader):
        return repr(stock) == repr(ours)  # its limit
    if isinstance(stock, asyncio.Future | weakref.ref | collections.deque):
        return True  # made per instance: compared by type
    return bool(stock == ours)


@pytest.mark.parametrize("case", ["relay", "relay-tls", "lmtp", "handler-auth"])
async def test_relay_smtp_sets_what_aiosmtpd_init_sets(case: str) -> None:
    """RelaySMTP does SMTP.__init__'s work itself (issue 15): the same attributes, same values."""
    settings = UpstreamSettings(
        host="127.0.0.1", port=25, tls="none", tls_context=None, helo_name="relay.test"
    )
    protocol: type[RelaySMTP] = LmtpSMTP if case == "lmtp" else RelaySMTP
    handler: Any = {
        "lmtp": lambda: LmtpHandler(upstream=settings, hostname="relay.test"),
        "handler-auth": _HandlerWithAuth,
    }.get(case, lambda: RelayHandler(upstream=settings, hostname="relay.test"))()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) if case == "relay-tls" else None
    for _ in range(2):  # the second instance takes the tables found for the first
        ours = protocol(
            handler,
            allowed_clients=(),
            max_message_bytes=12345,
            client_timeout_s=7.0,
            hostname="relay.test",
            tls_context=context,
            keep_transcript=False,
        )
        stock = protocol.__new__(protocol)
        SMTP.__init__(
            stock,
            handler,
            data_size_limit=12345,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname="relay.test",
            ident="ESMTP smtp-tracker",
            tls_context=context,
            require_starttls=False,
            timeout=7.0,
            auth_require_tls=True,
        )
        missing = sorted(set(vars(stock)) - set(vars(ours)))
        assert missing == []
        different = [
            name
            for name, value in vars(stock).items()
            if not _same(value, vars(ours)[name], stock, ours)
        ]
        assert different == []
    assert set(ours._smtp_methods) >= {"DATA", "EHLO", "MAIL", "RCPT", "HELP", "QUIT"}
    if case == "handler-auth":
        assert list(ours._handle_hooks) == ["EHLO", "NOOP"]
        assert ours._auth_methods["CRAM-MD5"].is_builtin is False


async def test_aiohttp_server_keeps_its_handler_arguments() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web_server.Server(handler, lingering_time=1.0)
    assert server._kwargs == {"lingering_time": 1.0}
    assert callable(server.request_handler)


def test_aiohttp_sites_keep_runner_host_port_and_server() -> None:
    source = inspect.getsource(web.TCPSite) + inspect.getsource(web.BaseSite)
    for name in ("self._runner", "self._host", "self._port", "self._server"):
        assert name in source, f"aiohttp's TCPSite no longer sets {name}"


# aiosmtplib: smtp_tracker/smtp/upstream.py writes DATA and the message itself
# (issue 15) on the client's protocol, holding its command lock as
# SMTPProtocol.execute_data_command does.

#: aiosmtplib.protocol.SMTPProtocol methods UpstreamSession._send_data calls, with
#: the parameters it passes.
SMTP_PROTOCOL_METHODS = {"_drain_helper": [], "read_response": ["timeout"], "write": ["data"]}


@pytest.mark.parametrize(("name", "parameters"), sorted(SMTP_PROTOCOL_METHODS.items()))
def test_aiosmtplib_protocol_keeps_the_method(name: str, parameters: list[str]) -> None:
    method = getattr(SMTPProtocol, name, None)
    assert callable(method), f"aiosmtplib SMTPProtocol.{name} is gone"
    names = [p for p in inspect.signature(method).parameters if p != "self"]
    assert names == parameters, f"SMTPProtocol.{name}{inspect.signature(method)}"


def test_aiosmtplib_read_response_expects_the_reply_itself() -> None:
    """read_response marks a reply as expected before it waits: a reply that comes
    right after our write is kept, not dropped as unsolicited (aiosmtplib 5)."""
    source = inspect.getsource(SMTPProtocol.read_response)
    assert "self._response_pending = True" in source
    assert source.index("self._response_pending = True") < source.index("await ")


def test_aiosmtplib_data_marks_the_reply_as_expected_before_the_message() -> None:
    """What _send_data does before writing the message in pieces: set
    ``_response_pending``, which data_received reads to keep a reply, not drop it."""
    assert "self._response_pending = True" in inspect.getsource(SMTPProtocol.execute_data_command)
    assert "not self._response_pending" in inspect.getsource(SMTPProtocol.data_received)


def test_aiosmtplib_execute_data_command_holds_the_lock_for_the_whole_exchange() -> None:
    """What _send_data does in its place: one ``async with self._command_lock`` around
    DATA, the message and the final reply."""
    source = inspect.getsource(SMTPProtocol.execute_data_command)
    assert source.count("async with self._command_lock:") == 1
    inside = source.split("async with self._command_lock:", 1)[1]
    assert inside.count("self.write(") == 2 and inside.count("self.read_response(") == 2


async def test_aiosmtplib_client_has_its_protocol_and_command_lock() -> None:
    done = asyncio.Event()

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 canary.test ESMTP\r\n")
            await reader.read()
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        protocol = client.protocol
        assert isinstance(protocol, SMTPProtocol)
        assert isinstance(protocol._command_lock, asyncio.Lock)
        assert not protocol._command_lock.locked()
        client.close()
        assert client.protocol is None
        # the server's side ends (and closes its transport) before the loop does:
        # Python 3.11's wait_closed() does not wait for connection handlers
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        server.close()
        await server.wait_closed()
