"""Canaries for the private parts of aiosmtpd and aiohttp we build on.

``pyproject.toml`` gives those libraries lower bounds only; the lock file
pins what CI runs, and CI's second, non-blocking run takes the newest
releases.  A release that renames or reshapes one of these attributes fails
here first, with the name, instead of somewhere deep in a relay test.

* aiosmtpd: ``smtp_tracker/smtp/server.py`` subclasses :class:`aiosmtpd.smtp.SMTP`
  (the DATA reader, command checks, PIPELINING synchronisation, HELP, STARTTLS).
* aiohttp: ``smtp_tracker/web/site.py`` starts its own protocol factory with the
  runner's handler arguments (connection cap, TLS handshake timeout).
"""

from __future__ import annotations

import inspect

import pytest
from aiohttp import web, web_server
from aiosmtpd.smtp import SMTP

#: aiosmtpd.smtp.SMTP methods we call or override, with the parameters we pass.
SMTP_METHODS = {
    "_call_handler_hook": ["command"],
    "_getaddr": ["arg"],
    "_reset_timeout": ["duration"],
    "_set_post_data_state": [],
    "_strip_command_keyword": ["keyword", "arg"],
    "_syntax_available": ["method"],
}

#: attributes an SMTP instance has once it is made (set in __init__/connection_made).
SMTP_INSTANCE_ATTRIBUTES = [
    "_handle_hooks",
    "_handler_coroutine",
    "_original_transport",
    "_reader",
    "_smtp_methods",
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
