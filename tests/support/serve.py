"""``smtp-tracker serve`` as a real process relaying to the upstream test server.

For the tests that signal or kill the process (SIGTERM drain, SIGKILL under
load) or that need a file system of its own under the data directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smtp_tracker.config import PASSWORD_ENV
from tests.support.process import Running, launch

__all__ = ["launch_serve", "tracking_args"]


async def launch_serve(
    upstream: Any, ca_pem_path: Path, data_dir: Path, *extra: str, port: int = 0
) -> Running:
    """Start ``serve`` on ``127.0.0.1:port`` (0: any) relaying to ``upstream``.

    Tracking and the pixel endpoint are off unless ``extra`` turns them on;
    ``extra`` flags come last, so they override these.

    :param port: the SMTP port; give the old one to restart on the same port.
    :raises AssertionError: the process ended before it listened.
    """
    env = dict(os.environ, **{PASSWORD_ENV: upstream.password})
    return await launch(
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream.address,
        "--upstream-ca-file",
        str(ca_pem_path),
        "--upstream-user",
        upstream.user,
        "--data-dir",
        str(data_dir),
        "--hostname",
        "relay.test",
        "--no-tracking",
        "--no-pixel",
        "--no-reports",
        *extra,
        env=env,
        ready="listening for SMTP",
    )


def tracking_args(cert_pem_path: Path, key_pem_path: Path, *, pixel_base_url: str) -> list[str]:
    """``extra`` flags for :func:`launch_serve`: tracking on, pixel endpoint on ``127.0.0.1:0``.

    The process is ``localhost`` with the test certificate (STARTTLS and HTTPS);
    ``pixel_base_url`` goes into the messages, whether or not anything serves it.
    """
    return [
        "--hostname",
        "localhost",
        "--tls-cert",
        str(cert_pem_path),
        "--tls-key",
        str(key_pem_path),
        "--tracking",
        "--pixel",
        "--pixel-listen",
        "127.0.0.1:0",
        "--pixel-base-url",
        pixel_base_url,
    ]
