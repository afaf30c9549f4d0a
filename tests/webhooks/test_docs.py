"""docs/webhooks.md's receiver, run as a new user would: it verifies and prints an open.

Its Python blocks are taken from the page as written (only the secret's path
and the port are changed), so the page cannot drift from what works.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from smtp_tracker.webhooks.signing import secret_key, signature_headers
from tests.support.waiting import wait_until
from tests.webhooks.conftest import Tracked, fetch, pixels, send

PAGE = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"
MAIL_CLIENT = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_documented_receiver_verifies_and_prints_an_open(
    tracked_relay: Tracked,
    upstream: Any,
    secret_file: Path,
    client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    (code,) = [block for block in python_blocks() if block.startswith("# receiver.py")]
    port = free_port()
    code = code.replace("/etc/smtp-tracker/webhook.secret", str(secret_file))
    code = code.replace("8080", str(port))
    script = tmp_path / "receiver.py"
    script.write_text(code, encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE
    )
    lines: list[str] = []

    async def read() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            lines.append(raw.decode())

    reader = asyncio.create_task(read())
    try:
        app = await tracked_relay(
            webhooks=[
                {
                    "url": f"http://127.0.0.1:{port}/",
                    "secret_file": str(secret_file),
                    "allow_plain_http": True,
                }
            ]
        )
        await send(app, 1, sessions=1)
        await upstream.wait_for_transactions(1, timeout_s=20)
        await fetch(pixels(upstream), client_ssl_context, user_agent=MAIL_CLIENT)
        await wait_until(lambda: len(lines) >= 2, timeout_s=30, message="nothing printed")
    finally:
        process.kill()
        await process.wait()
        await reader
    relayed, opened = lines[:2]
    assert relayed.startswith("message.relayed ")
    assert re.fullmatch(r"message\.opened [A-Za-z0-9_-]{23} human\n", opened), opened
    assert app.webhooks is not None and app.webhooks.counters.total("failed") == 0


def test_the_documented_check_without_a_library() -> None:
    (code,) = [block for block in python_blocks() if "def verified(" in block]
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # noqa: S102 - the documentation's own example
    verified = namespace["verified"]
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"type":"message.opened"}'
    headers = signature_headers(secret_key(secret), "msg_1", int(time.time()), body)
    assert verified(secret, headers, body)
    assert not verified(secret, headers, body + b" ")
    stale = signature_headers(secret_key(secret), "msg_1", int(time.time()) - 600, body)
    assert not verified(secret, stale, body)
