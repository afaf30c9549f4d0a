"""Helpers of the consent tests: send HTML mail through a running relay, read the store raw."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import aiosmtplib

from smtp_tracker.store import DB_FILENAME
from tests.support.upstream import Transaction, UpstreamServer
from tests.support.waiting import wait_until

PIXEL = re.compile(rb"https?://[^/\s\"]+/o/([A-Za-z0-9_-]{23})\.gif")
CLICK = re.compile(rb"https?://[^/\s\"]+/c/([A-Za-z0-9_-]{23})")
OPTOUT = re.compile(rb"(https?://[^/\s\"]+/optout/([A-Za-z0-9_-]{23}))")
DESTINATION = "https://shop.example.com/offer?id=42"


def html_message(subject: str, *, link: str = DESTINATION) -> bytes:
    return (
        f"From: alice@example.org\r\nTo: undisclosed-recipients:;\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f'<html><body><p>{subject}</p><p><a href="{link}">the offer</a></p></body></html>\r\n'
    ).encode()


async def send(
    app: Any,
    upstream: UpstreamServer,
    subject: str,
    recipients: list[str],
    *,
    link: str = DESTINATION,
) -> Transaction:
    """Relay one HTML message to *recipients*; the transaction the upstream received."""
    host, port = app.smtp_address
    before = len(upstream.transactions)
    errors, _ = await aiosmtplib.send(
        html_message(subject, link=link),
        sender="alice@example.org",
        recipients=recipients,
        hostname=host,
        port=port,
        start_tls=False,
        timeout=30,
    )
    assert errors == {}
    received = await upstream.wait_for_transactions(before + 1)
    (transaction,) = [t for t in received if subject.encode() in t.data]
    return transaction


def rows(data_dir: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of *query* on the store, from a connection of the test's own."""
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


async def message_row(data_dir: Path, subject: str) -> tuple[Any, ...]:
    """(tracked, not_tracked_reason, recipients) of the message whose Message-ID has
    *subject*, once it is recorded (after the upstream's 2xx)."""
    query = "SELECT tracked, not_tracked_reason, recipients FROM messages WHERE message_id = ?"
    params = (f"<{subject.replace(' ', '-')}@example.org>",)
    await wait_until(
        lambda: len(rows(data_dir, query, params)) == 1, timeout_s=10, message="not recorded"
    )
    return rows(data_dir, query, params)[0]
