"""Fuzz target for the pixel and reports listeners' request headers: raw bytes, checked invariants.

Run from the repository root::

    python -m fuzz.http_headers_target --runs 20000
    python -m fuzz.http_headers_target --runs 20000 --seed 4   # repeat a run

Both listeners run as ``serve`` runs them (:func:`smtp_tracker.web.public.make_pixel_app`
and :func:`smtp_tracker.web.reports.build_reports_app`, each started with
:func:`smtp_tracker.web.site.start_site`), on 127.0.0.1 over plain HTTP (the
header parsing is the same as over TLS), with short timeouts so that a request
left incomplete costs a fraction of a second.  Each input is one request, drawn
by Hypothesis: a method and a path of the listener's routes (or raw bytes),
header fields whose names and values are raw bytes (``Authorization``,
``Cookie``, ``User-Agent``, ``X-Forwarded-For``, ``Content-Type``,
``Content-Length``, ``Transfer-Encoding`` and others, values not UTF-8,
control bytes, bare CR or LF, obs-fold), sometimes a raw line, sometimes a body.
It is sent on its own connection while a legitimate pixel ``GET`` for a known
token (a *neighbour*) is made at the same time, and :meth:`Listeners.check`
asserts:

* never a 500 (no 5xx at all): every response line is ``HTTP/1.x`` with a
  status below 500, or the server closed the connection without an answer
  (a request it never saw complete);
* never a traceback: no log record at error level or above, none carrying
  exception information, in any logger (asyncio's "exception was never
  retrieved" included);
* never a lost neighbour: the neighbour got the GIF, and its open was
  recorded (the event writer counts no failed or dropped event).

The short run in the suite is ``tests/web/test_fuzz_http_headers.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from smtp_tracker.store import MessageRecord, SqliteStore
from smtp_tracker.store.writer import EventWriter
from smtp_tracker.web.public import TRANSPARENT_GIF, WRITER_KEY, make_pixel_app
from smtp_tracker.web.reports import UserDirectory, build_reports_app
from smtp_tracker.web.reports.users import add_user
from smtp_tracker.web.site import start_site

__all__ = [
    "HttpCase",
    "Listeners",
    "LogRecorder",
    "http_cases",
    "main",
]

#: Tracking ids of the messages the store holds (23 URL-safe characters, as the relay makes).
KNOWN_TOKENS = ("A" * 22 + "A", "B" * 22 + "A", "C" * 22 + "A")
#: Seconds the harness's listeners give a request's headers, and its body.
HEADER_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 0.2
#: Seconds one check may take before the harness itself is deemed stuck.
CHECK_TIMEOUT_S = 30.0

_USER = "alice"
_PASSWORD = "correct horse battery staple"  # noqa: S105 - the harness's own user
_TOKEN = "fuzz-api-token-" + "x" * 32

# -- inputs ---------------------------------------------------------------------------------

_PIXEL_TARGETS = [
    *(f"/o/{token}.gif".encode() for token in KNOWN_TOKENS),
    b"/o/unknown.gif",
    b"/c/" + b"A" * 43,
    b"/healthz",
    b"/",
]
_REPORTS_TARGETS = [
    b"/",
    b"/login",
    b"/login?next=/messages",
    b"/logout",
    b"/messages",
    b"/messages/x",
    b"/api/stats",
    b"/api/messages",
    b"/api/messages/x",
    b"/api/export.csv",
    b"/api/openapi.json",
    b"/static/style.css",
]
_METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"]
_NAMES = [
    b"Authorization",
    b"Cookie",
    b"User-Agent",
    b"X-Forwarded-For",
    b"Content-Type",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Content-Encoding",
    b"Host",
    b"Connection",
    b"Expect",
    b"Upgrade",
    b"Accept",
    b"Accept-Encoding",
    b"Accept-Language",
    b"Referer",
    b"Origin",
    b"Range",
    b"If-None-Match",
    b"X-Requested-With",
]
_VALUE_SEEDS = [
    b"Bearer " + _TOKEN.encode(),
    b"Bearer ",
    b"Basic YWxpY2U6c2VjcmV0",
    b"__Host-smtp-tracker-session=",
    b"__Host-smtp-tracker-login=",
    b"application/x-www-form-urlencoded",
    b"application/x-www-form-urlencoded; charset=",
    b"multipart/form-data; boundary=",
    b"text/plain; charset=utf-8",
    b"chunked",
    b"gzip",
    b"deflate, br",
    b"100-continue",
    b"websocket",
    b"keep-alive",
    b"close",
    b"-1",
    b"0",
    b"99999999999999999999",
    b"127.0.0.1, ::1, [2001:db8::1]:80",
    b"Mozilla/5.0",
    b"\xff\xfe",
    b"\xc3(",
    b"\xed\xa0\x80",  # a UTF-8-encoded surrogate
    b"\x00",
    b"\x7f",
    b"\t",
    b"%ff%fe",
    b"=",
    b";",
    b",",
    b'"',
]


@dataclass(frozen=True)
class HttpCase:
    """One request for one listener: *listener* is ``"pixel"`` or ``"reports"``."""

    listener: str
    request: bytes

    def __repr__(self) -> str:
        return f"HttpCase({self.listener!r}, {self.request!r})"


#: Header name characters aiohttp accepts (an RFC 9110 §5.6.2 token).
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _field_bytes(data: bytes) -> bytes:
    """*data* less the bytes a field value may not hold (RFC 9110 §5.5: CTLs but HTAB)."""
    return bytes(c for c in data if (c >= 0x20 and c != 0x7F) or c == 0x09)


def _value(*, wild: bool) -> st.SearchStrategy[bytes]:
    piece = st.one_of(
        st.sampled_from(_VALUE_SEEDS),
        st.binary(max_size=24),
        st.text(max_size=12).map(lambda text: text.encode("utf-8", "surrogatepass")),
    )
    value = st.lists(piece, max_size=4).map(b"".join)
    if not wild:
        return value.map(_field_bytes)
    return value.flatmap(
        lambda v: st.sampled_from(
            [v.replace(b"\r", b"").replace(b"\n", b""), v, v + b"\r\n " + v]  # obs-fold
        )
    )


def _header(*, wild: bool) -> st.SearchStrategy[bytes]:
    name: st.SearchStrategy[bytes] = st.one_of(
        st.sampled_from(_NAMES),
        st.binary(min_size=1, max_size=12).map(
            lambda b: bytes(_TOKEN_CHARS[c % len(_TOKEN_CHARS)] for c in b)
        ),
    )
    separator = st.sampled_from([b": ", b":", b":\t"])
    if wild:
        name = name | st.binary(min_size=1, max_size=16).map(lambda b: b.replace(b":", b""))
        separator = separator | st.sampled_from([b" : ", b": \x00", b"::"])
    return st.tuples(name, separator, _value(wild=wild)).map(b"".join)


@st.composite
def http_cases(draw: st.DrawFn) -> HttpCase:
    """A request for the pixel or the reports listener (the module docstring).

    Half the requests are *tame*: a route's method and path, header names that
    are tokens and values without control bytes (but not UTF-8, surrogates
    and all), so they pass aiohttp's parser and reach the apps; the other half
    are *wild* (any bytes in the request line, names and values, bare CR and
    LF, obs-fold, a raw line), which the parser mostly refuses.
    """
    listener = draw(st.sampled_from(["pixel", "reports"]))
    wild = draw(st.booleans())
    targets = _PIXEL_TARGETS if listener == "pixel" else _REPORTS_TARGETS
    method: st.SearchStrategy[bytes] = st.sampled_from(_METHODS)
    target: st.SearchStrategy[bytes] = st.sampled_from(targets)
    version: st.SearchStrategy[bytes] = st.sampled_from([b" HTTP/1.1", b" HTTP/1.0"])
    if wild:
        method |= st.binary(min_size=1, max_size=8)
        target |= st.binary(max_size=24)
        version |= st.sampled_from([b"", b" HTTP/2", b" HTTP/1.1 x"])
    headers = draw(st.lists(_header(wild=wild), max_size=8))
    if wild and draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), draw(st.binary(max_size=40)))
    body = draw(st.one_of(st.just(b""), st.binary(max_size=64)))
    if body:  # announced (bytes after the request would be read as a second request)
        headers.append(b"Content-Length: %d" % len(body))
    request_line = draw(method) + b" " + draw(target) + draw(version)
    lines = [request_line, b"Host: localhost", *headers, b"Connection: close"]
    return HttpCase(listener, b"\r\n".join([*lines, b"", b""]) + body)


# -- the harness ----------------------------------------------------------------------------


class LogRecorder(logging.Handler):
    """Keeps every record at error level or above, and any record with exception info."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info is not None:
            self.bad.append(record)

    @contextlib.contextmanager
    def installed(self) -> Iterator[LogRecorder]:
        """Attached to the root logger, which lets everything through, while in use."""
        root = logging.getLogger()
        level = root.level
        root.addHandler(self)
        root.setLevel(logging.DEBUG)
        try:
            yield self
        finally:
            root.removeHandler(self)
            root.setLevel(level)


@dataclass
class Listeners:
    """Both listeners on a private event loop, for synchronous Hypothesis tests.

    Use as a context manager; :meth:`check` runs one case.

    :param data_dir: where the store and the users file live (a new temporary
        directory when ``None``).
    """

    data_dir: Path | None = None
    checked: int = 0
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _ports: dict[str, int] = field(default_factory=dict)
    _writer: EventWriter | None = None
    _logs: LogRecorder = field(default_factory=LogRecorder)
    _temporary: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Listeners:
        if self.data_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="http-fuzz-")
            self.data_dir = Path(self._temporary.name)
        self._log_context = self._logs.installed()
        self._log_context.__enter__()
        self._loop.run_until_complete(self._start(self.data_dir))
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._loop.run_until_complete(self._stack.aclose())
            self._loop.close()
        finally:
            self._log_context.__exit__(None, None, None)
            if self._temporary is not None:
                self._temporary.cleanup()

    async def _start(self, data_dir: Path) -> None:
        store = await self._stack.enter_async_context(
            await SqliteStore.open(data_dir / "data", ip_policy="full")
        )
        for token in KNOWN_TOKENS:
            await store.record_message(_message(token))
        users_path = data_dir / "users.json"
        if not users_path.exists():
            add_user(users_path, _USER, _PASSWORD)
        pixel = make_pixel_app(store=store, keepalive_timeout_s=HEADER_TIMEOUT_S)
        reports = build_reports_app(
            store=store,
            token=_TOKEN,
            users=await UserDirectory.open(users_path),
            session_s=600.0,
            login_failures_per_min=1_000_000,  # a 429 is fine, but it hides the login path
            header_timeout_s=HEADER_TIMEOUT_S,
            body_timeout_s=BODY_TIMEOUT_S,
        )
        for name, app in (("pixel", pixel), ("reports", reports)):
            runner, port = await start_site(app, host="127.0.0.1", port=0, ssl_context=None)
            self._stack.push_async_callback(runner.cleanup)
            self._ports[name] = port
        self._writer = pixel[WRITER_KEY]

    def check(self, case: HttpCase) -> None:
        """Send *case* beside a neighbour's pixel open; assert the module's invariants.

        :raises AssertionError: when one does not hold.
        """
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._check(case), CHECK_TIMEOUT_S))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n  for {case!r}") from None

    async def _check(self, case: HttpCase) -> None:
        writer = self._writer
        assert writer is not None
        failed, dropped, recorded = writer.failed, writer.dropped, writer.recorded
        self._logs.bad.clear()
        self.checked += 1
        neighbour_agent = f"neighbour-{self.checked}".encode()
        neighbour = (
            b"GET /o/" + KNOWN_TOKENS[0].encode() + b".gif HTTP/1.1\r\nHost: localhost\r\n"
            b"User-Agent: " + neighbour_agent + b"\r\nConnection: close\r\n\r\n"
        )
        hostile, friendly = await asyncio.gather(
            _exchange(self._ports[case.listener], case.request),
            _exchange(self._ports["pixel"], neighbour),
        )
        if hostile:
            status_line = hostile.split(b"\r\n", 1)[0]
            assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ", b"HTTP/0.9 ")), hostile[:200]
            status = int(status_line.split(b" ", 2)[1])
            assert status < 500, f"{status}: {hostile[:300]!r}"
        assert friendly.startswith(b"HTTP/1.1 200 "), friendly[:200]
        assert friendly.endswith(TRANSPARENT_GIF), friendly[-60:]
        # every open offered so far is written (or refused as unknown) before judging
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            while writer.pending or writer.offered != (  # noqa: ASYNC110 - no event to wait on
                writer.recorded + writer.unknown + writer.dropped + writer.failed
            ):
                await asyncio.sleep(0.005)
        assert (writer.failed, writer.dropped) == (failed, dropped), repr(writer)
        assert writer.recorded > recorded, f"the neighbour's open was not recorded: {writer!r}"
        await asyncio.sleep(0)  # let a task that failed be collected and logged
        bad = [_describe(record) for record in self._logs.bad]
        assert not bad, "\n".join(bad)


async def _exchange(port: int, request: bytes) -> bytes:
    """Send *request*; the final response (head and, by its Content-Length, body), or what
    came before the server closed; ``b""`` when it closed without answering."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                received = head
                if not head.startswith(b"HTTP/1.1 1"):  # 100 Continue: the answer follows
                    break
            length = _content_length(head, head_request=request.startswith(b"HEAD "))
            if length is None:  # chunked or to the close: read what comes
                received += await reader.read()
            else:
                received += await reader.readexactly(length)
        return received
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _content_length(head: bytes, *, head_request: bool) -> int | None:
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
    if head_request or status in (b"204", b"304"):
        return 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def _describe(record: logging.LogRecord) -> str:
    text = f"{record.levelname} {record.name}: {record.getMessage()}"
    if record.exc_info is not None and record.exc_info[1] is not None:
        text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
    return text


def _message(token: str) -> MessageRecord:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    return MessageRecord(
        tracking_id=token,
        queue_id=f"Q{token[:4]}",
        message_id=f"<{token}@example.org>",
        sender="alice@example.org",
        recipients=["bob@example.net"],
        size_bytes=100,
        received_at=now,
        relayed_at=now,
        upstream_reply="250 2.0.0 Ok",
        tracked=True,
    )


# -- the command line -----------------------------------------------------------------------


def _hypothesis_run(runs: int, seed: int | None) -> int:
    started = time.monotonic()
    with Listeners() as listeners:

        @settings(
            max_examples=runs,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(http_cases())
        def run(case: HttpCase) -> None:
            listeners.check(case)

        if seed is not None:
            run = hypothesis_seed(seed)(run)
        try:
            run()
        except AssertionError as exc:
            print(f"fuzz: FAILED after {listeners.checked} requests:\n{exc}", file=sys.stderr)
            return 1
        checked = listeners.checked
    elapsed = time.monotonic() - started
    print(f"fuzz: {checked} requests in {elapsed:.0f} s, no invariant broken")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; the exit status (0 no failure, 1 a failure, 2 usage)."""
    parser = argparse.ArgumentParser(
        prog="python -m fuzz.http_headers_target", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runs", type=int, default=20_000, help="requests to try")
    parser.add_argument("--seed", type=int, help="Hypothesis random seed, to repeat a run")
    args = parser.parse_args(argv)
    return _hypothesis_run(args.runs, args.seed)


if __name__ == "__main__":
    raise SystemExit(main())
