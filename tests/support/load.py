"""Load: mixed-size messages with numbered Message-IDs, injected into Postfix, counted at a sink.

Used by ``tests/e2e/test_load.py`` (1,000 messages) and ``bench/load.py``
(10,000).  Each message gets ``Message-ID: <load-N@bench.test>`` as its first
header field, so both ends count by Message-ID: what Postfix accepted (250 to
the end of DATA) against what reached the upstream.  The figures of a running
process (peak RSS, open file descriptors) come from ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests import corpus
from tests.mime import messages as build

__all__ = [
    "POSTFIX_LOAD_SETTINGS",
    "CountingSink",
    "Injected",
    "ProcessSampler",
    "fd_count",
    "inject",
    "load_message_id",
    "message_pool",
    "numbered",
    "status_kib",
]

#: main.cf for a Postfix under load: up to 50 connections to smtp-tracker from the start,
#: and no slowing down of its clients when the queue manager lags (``in_flow_delay``).
POSTFIX_LOAD_SETTINGS: dict[str, str | int | bool] = {
    "default_process_limit": 200,
    "smtp_destination_concurrency_limit": 50,
    "default_destination_concurrency_limit": 50,
    "initial_destination_concurrency": 50,
    "in_flow_delay": "0s",
}

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID_FIELD = re.compile(rb"^Message-ID[ \t]*:.*(?:\r?\n[ \t].*)*\r?\n", re.I | re.M)
_LOAD_ID = re.compile(rb"^Message-ID:[ \t]*<(load-\d+@bench\.test)>", re.I | re.M)


# -- messages ------------------------------------------------------------------------------


def _built_pool() -> list[bytes]:
    """Messages of 1 KB to 1 MB for when there is no corpus: HTML (QP, base64, 8bit) and
    text, mostly small, as mail is."""
    pool = [build.fixture(p.name) for p in sorted(build.FIXTURES.glob("*.eml"))]
    paragraph = "<p>Caf\u00e9 au lait, s'il vous pla\u00eet. " + "x" * 60 + "</p>\n"
    for size in (1_000, 10_000, 100_000, 1_000_000):
        page = "<html><body>" + paragraph * (size // len(paragraph) + 1) + "</body></html>"
        if size > 100_000:  # one large message
            pool.append(build.html_message(page, cte="quoted-printable"))
            continue
        for cte in ("quoted-printable", "base64", "8bit"):
            pool.append(build.html_message(page, cte=cte))
        pool.append(build.message(build.leaf("plain line\n" * (size // 11), ctype="text/plain")))
    return pool


def message_pool() -> list[bytes]:
    """The messages to draw from: the corpus (``eml/``, and ``html/`` wrapped) when
    ``SMTP_TRACKER_CORPUS`` is set, else fixtures and built messages of 1 KB to 1 MB."""
    pool = [p.read_bytes() for p in corpus.eml_paths()]
    encodings: tuple[corpus.Cte, ...] = ("quoted-printable", "base64", "8bit")
    for index, path in enumerate(corpus.html_paths()):
        cte = encodings[index % len(encodings)]
        pool.append(corpus.html_as_message(path.read_bytes(), charset="utf-8", cte=cte))
    return pool or _built_pool()


def numbered(pool: Sequence[bytes], count: int, *, seed: int = 0) -> list[tuple[str, bytes]]:
    """*count* messages drawn from *pool* (repeatable by *seed*), each with its own Message-ID.

    Any Message-ID field (and a leading mbox ``From `` line) is removed from the
    top-level header and ``Message-ID: <load-N@bench.test>`` put first; line
    endings become CRLF.

    :returns: ``(message_id, octets)`` pairs, ``message_id`` without angle brackets.
    """
    draw = random.Random(seed)
    out = []
    for n in range(count):
        data = draw.choice(pool)
        if data.startswith(b"From "):
            data = data.partition(b"\n")[2]
        end = _HEADER_END.search(data)
        cut = end.start() + 1 if end else len(data)
        head = _MESSAGE_ID_FIELD.sub(b"", data[:cut])
        message_id = f"load-{n}@bench.test"
        data = f"Message-ID: <{message_id}>\r\n".encode() + head + data[cut:]
        out.append((message_id, re.sub(rb"\r?\n", b"\r\n", data)))
    return out


def load_message_id(data: bytes) -> str | None:
    """The ``load-N@bench.test`` id of a message numbered by :func:`numbered`, or None
    (bounces and other notices carry their own Message-ID)."""
    end = _HEADER_END.search(data)
    match = _LOAD_ID.search(data, 0, end.start() + 2 if end else len(data))
    return match.group(1).decode() if match else None


# -- injecting -----------------------------------------------------------------------------


@dataclass
class Injected:
    """What the injection achieved: Message-IDs accepted (250 after DATA) and refused."""

    accepted: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    octets: int = 0
    started: float = 0.0
    finished: float = 0.0


async def inject(
    host: str,
    port: int,
    messages: Iterable[tuple[str, bytes]],
    *,
    connections: int,
    sender: str = "load@bench.test",
    recipient: str = "sink@sink.test",
    timeout_s: float = 120.0,
) -> Injected:
    """Send *messages* over *connections* concurrent SMTP sessions, each reused for many.

    A refused message (4xx/5xx) is recorded with the reply and not retried; a
    dropped session is reopened.
    """
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in messages:
        queue.put_nowait(item)
    result = Injected(started=time.monotonic())

    async def session() -> None:
        smtp: aiosmtplib.SMTP | None = None
        try:
            while not queue.empty():
                message_id, data = queue.get_nowait()
                if smtp is None or not smtp.is_connected:
                    smtp = aiosmtplib.SMTP(
                        hostname=host, port=port, start_tls=False, timeout=timeout_s
                    )
                    await smtp.connect()
                try:
                    await smtp.sendmail(sender, [recipient], data)
                except aiosmtplib.SMTPResponseException as exc:
                    result.refused[message_id] = f"{exc.code} {exc.message}"
                except aiosmtplib.SMTPRecipientsRefused as exc:
                    result.refused[message_id] = str(exc.recipients[0])
                else:
                    result.accepted.add(message_id)
                    result.octets += len(data)
        finally:
            if smtp is not None and smtp.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException):
                    await smtp.quit()

    await asyncio.gather(*(session() for _ in range(connections)))
    result.finished = time.monotonic()
    return result


# -- the sink ------------------------------------------------------------------------------


class CountingSink:
    """An aiosmtpd upstream that accepts everything (STARTTLS required, no AUTH) and
    counts numbered messages; nothing else of a message is kept.

    :ivar received: ``load-N`` Message-ID -> how many times it arrived.
    :ivar others: messages without such an id (Postfix's bounces and notices).
    :ivar last_at: ``time.monotonic()`` of the latest numbered arrival.
    """

    def __init__(self, tls_context: ssl.SSLContext, *, ids_file: Path | None = None) -> None:
        self.tls_context = tls_context
        self.received: Counter[str] = Counter()
        self.others = 0
        self.octets = 0
        self.last_at = 0.0
        self._ids_file = ids_file.open("a", encoding="ascii") if ids_file else None
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.content
        assert isinstance(data, bytes)
        message_id = load_message_id(data)
        if message_id is None:
            self.others += 1
        else:
            self.received[message_id] += 1
            self.octets += len(data)
            self.last_at = time.monotonic()
            if self._ids_file is not None:
                self._ids_file.write(message_id + "\n")
                self._ids_file.flush()
        return "250 2.0.0 Ok: counted"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; the port bound."""
        loop = asyncio.get_running_loop()

        def protocol() -> SMTP:
            smtp = SMTP(
                self,
                hostname="sink.test",
                tls_context=self.tls_context,
                require_starttls=True,
                decode_data=False,
                enable_SMTPUTF8=True,
                data_size_limit=64 * 1024 * 1024,
                ident="counting sink",
            )
            self._sessions.add(smtp)
            return smtp

        self._server = await loop.create_server(protocol, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for protocol in list(self._sessions):
                if protocol.transport is not None:
                    protocol.transport.close()
            await self._server.wait_closed()
        if self._ids_file is not None:
            self._ids_file.close()


# -- process figures -----------------------------------------------------------------------


def fd_count(pid: int) -> int:
    """How many file descriptors process *pid* has open."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def status_kib(pid: int, name: str) -> int:
    """A ``kB`` figure of ``/proc/PID/status``: ``VmHWM`` (peak RSS), ``VmRSS``, ..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0])
    raise KeyError(name)


class ProcessSampler:
    """Samples a process's open descriptors and RSS every *interval_s* until stopped.

    :ivar peak_fds: the most descriptors seen open.
    :ivar peak_rss_kib: the highest ``VmRSS`` seen (``VmHWM`` is exact: read it at the end).
    """

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_fds = 0
        self.peak_rss_kib = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            self.peak_fds = max(self.peak_fds, fd_count(self.pid))
            self.peak_rss_kib = max(self.peak_rss_kib, status_kib(self.pid, "VmRSS"))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()
