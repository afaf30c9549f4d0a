"""``smtp-tracker milter`` as a real process beside a private Postfix that calls it.

The milter and pixel ports are picked by binding port 0 and closing (the
milter's address must be written into Postfix's main.cf before it starts, and
the pixel's into ``pixel_base_url``); the race is accepted as in
:mod:`tests.support.postfix`.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from tests.support.postfix import free_port
from tests.support.process import Running, launch

__all__ = [
    "MilterProcess",
    "launch_milter",
    "milter_main_cf",
    "pixel_tokens",
    "postfix_queue_id",
    "send_to_postfix",
]

#: ``(Postfix) with ESMTP id 4Xyz...`` in the Received: field Postfix's smtpd adds,
#: ``(Postfix, from userid 0)`` + folded ``id 4Xyz...`` in the one pickup adds (sendmail).
_QUEUE_ID = re.compile(
    rb"\(Postfix(?:, from userid \d+)?\)(?: with E?SMTPS?A?)?\s+id ([0-9A-Za-z]+)"
)
PIXEL = re.compile(r"https://localhost:\d+/o/([A-Za-z0-9_-]{23})\.gif")


@dataclass
class MilterProcess:
    """A started ``smtp-tracker milter``: its milter port, pixel port and data directory."""

    running: Running
    milter_port: int
    pixel_port: int
    data_dir: Path
    args: tuple[str, ...]

    @property
    def log(self) -> str:
        return "".join(self.running.log)

    async def terminate(self) -> int:
        """SIGTERM, then wait for the exit (and the end of its log); the exit status."""
        self.running.process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.running.process.wait(), 60)
        await self.running.finish()
        return status

    async def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        self.running.process.kill()
        await self.running.finish()


async def launch_milter(
    data_dir: Path,
    cert_pem_path: Path,
    key_pem_path: Path,
    *extra: str,
    milter_port: int | None = None,
    pixel_port: int | None = None,
) -> MilterProcess:
    """Start ``smtp-tracker milter`` with tracking, the pixel endpoint (HTTPS, the test
    certificate for ``localhost``) and no reports listener; ``extra`` flags come last."""
    milter_port = milter_port or free_port()
    pixel_port = pixel_port or free_port()
    args = (
        "milter",
        "--milter-listen",
        f"127.0.0.1:{milter_port}",
        "--data-dir",
        str(data_dir),
        "--hostname",
        "localhost",
        "--tls-cert",
        str(cert_pem_path),
        "--tls-key",
        str(key_pem_path),
        "--tracking",
        "--pixel",
        "--pixel-listen",
        f"127.0.0.1:{pixel_port}",
        "--pixel-base-url",
        f"https://localhost:{pixel_port}",
        "--no-reports",
        *extra,
    )
    running = await launch(*args, env=dict(os.environ), ready="listening for milter connections")
    return MilterProcess(running, milter_port, pixel_port, data_dir, args)


def milter_main_cf(milter_port: int, *, default_action: str = "accept") -> dict[str, str]:
    """main.cf settings for smtpd (and sendmail-injected mail) to call the milter first."""
    milter = f"inet:127.0.0.1:{milter_port}"
    return {
        "smtpd_milters": milter,
        "non_smtpd_milters": milter,
        "milter_default_action": default_action,
        "milter_protocol": "6",
        "milter_connect_timeout": "5s",
    }


async def send_to_postfix(port: int, sender: str, recipients: list[str], data: bytes) -> None:
    """One message to Postfix's smtpd on ``127.0.0.1:port`` (plain SMTP, loopback)."""
    await aiosmtplib.send(
        data,
        sender=sender,
        recipients=recipients,
        hostname="127.0.0.1",
        port=port,
        start_tls=False,
        use_tls=False,
        timeout=60,
    )


def postfix_queue_id(data: bytes) -> str:
    """Postfix's queue id, from the Received: field its smtpd (or pickup) added."""
    match = _QUEUE_ID.search(data)
    assert match is not None, data[:2000]
    return match.group(1).decode()


def pixel_tokens(data: bytes) -> list[str]:
    """Tracking ids of pixel URLs in the message, searched in every decoded text part."""
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    tokens: list[str] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            tokens += PIXEL.findall(payload.decode("latin-1"))
    return tokens
