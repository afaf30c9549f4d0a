"""Relay fixtures: smtp-tracker started in the test's loop, pointed at the upstream.

Imported by the conftest of each test folder that relays mail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_tracker.app import Application
from smtp_tracker.config import PASSWORD_ENV, build_config

RelayFactory = Callable[..., Awaitable[Application]]


@pytest.fixture
async def relay_factory(
    upstream: Any, ca_pem_path: Path, tmp_path: Path
) -> AsyncIterator[RelayFactory]:
    """Start smtp-tracker on 127.0.0.1 port 0 relaying to ``upstream``; keys may be overridden.

    A key given as None is left at the config's default; ``app_options`` are
    :class:`Application`'s own keyword arguments (``smtp``, the prune schedule).
    """
    started: list[Application] = []

    async def make(*, app_options: dict[str, Any] | None = None, **overrides: Any) -> Application:
        values: dict[str, Any] = {
            "upstream": upstream.address,
            "upstream_ca_file": str(ca_pem_path),
            "upstream_user": upstream.user,
            "listen": "127.0.0.1:0",
            "hostname": "relay.test",
            "data_dir": str(tmp_path / "data"),
            "tracking": False,
            "pixel": False,
            "reports": False,
            "upstream_connect_timeout_s": 5.0,
            "upstream_command_timeout_s": 5.0,
            "upstream_data_timeout_s": 5.0,
        }
        values.update(overrides)
        values = {k: v for k, v in values.items() if v is not None}
        config = build_config(values, {}, environ={PASSWORD_ENV: upstream.password})
        app = Application(config, **(app_options or {}))
        await app.start()
        started.append(app)
        return app

    yield make
    for app in started:
        await app.stop(grace_s=5.0)


def tracking_over_tls(cert_pem_path: Path, key_pem_path: Path) -> dict[str, Any]:
    """:func:`relay_factory` keys: tracking on, the pixel endpoint on ``127.0.0.1:0``.

    The relay is ``localhost`` with the test certificate (STARTTLS and HTTPS).
    """
    return {
        "tracking": True,
        "pixel": True,
        "pixel_listen": "127.0.0.1:0",
        "hostname": "localhost",
        "tls_cert": str(cert_pem_path),
        "tls_key": str(key_pem_path),
    }


@pytest.fixture
async def relay(relay_factory: RelayFactory) -> Application:
    """smtp-tracker with the defaults of :func:`relay_factory`."""
    return await relay_factory()


@pytest.fixture
async def client(relay: Application) -> AsyncIterator[aiosmtplib.SMTP]:
    """A downstream SMTP client (plays Postfix) connected to ``relay``, EHLO done."""
    host, port = relay.smtp_address
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20)
    await smtp.connect()
    await smtp.ehlo(hostname="postfix.test")
    yield smtp
    if smtp.is_connected:
        try:
            await smtp.quit()
        except aiosmtplib.SMTPException:
            smtp.close()
