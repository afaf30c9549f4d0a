"""Prometheus metrics, scraped over HTTP from a relay that relays mail and serves pixels.

A real relay (:class:`~smtp_tracker.app.Application`) relays to the upstream
test server, the pixel endpoint serves HTTPS, and ``/metrics`` is fetched
before and after: each counter moves by exactly what was done in between, and
the text parses with :mod:`prometheus_client.parser`.
"""

from __future__ import annotations

import re
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, cast

import aiohttp
import aiosmtplib
import pytest

from smtp_tracker import __version__
from smtp_tracker.app import Application
from smtp_tracker.config import build_config
from smtp_tracker.errors import StartupError
from smtp_tracker.metrics import Metrics
from smtp_tracker.store.records import EventContext
from tests.support.metrics import Samples
from tests.support.metrics import scrape as scrape_metrics
from tests.support.relay import RelayFactory, tracking_over_tls
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

PIXEL = re.compile(rb"https://localhost:\d+/o/([A-Za-z0-9_-]{23})\.gif")
#: A well-formed token no message has.
UNKNOWN_TOKEN = "A" * 23


async def scrape(app: Application) -> tuple[Samples, str]:
    """``GET /metrics``: the samples by (name, labels), and the content type; every
    family is named ``smtp_tracker_*`` and given once."""
    assert app.metrics is not None and app.metrics.port is not None
    answer = await scrape_metrics(app.metrics.port)
    for name in answer.families:
        assert name.startswith("smtp_tracker_"), name
        assert answer.families.count(name) == 1, f"{name} appears twice"
    return answer.samples, answer.content_type


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def message(number: int, *, html: bool = True) -> bytes:
    kind = "text/html" if html else "text/plain"
    body = f"<html><body><p>message {number}</p></body></html>" if html else f"message {number}"
    return (
        "From: alice@example.org\r\nTo: bob@example.net\r\n"
        f"Subject: metrics {number}\r\nMessage-ID: <metrics-{number}@example.org>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: {kind}; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


async def send(
    app: Application, number: int, *, html: bool = True, to: str = "bob@example.net"
) -> None:
    host, port = app.smtp_address
    await aiosmtplib.send(
        message(number, html=html),
        sender="alice@example.org",
        recipients=[to],
        hostname=host,
        port=port,
        start_tls=False,
        timeout=30,
    )


async def fetch_pixel(app: Application, token: str, context: ssl.SSLContext) -> None:
    url = f"https://localhost:{app.pixel_port}/o/{token}.gif"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=context, headers={"User-Agent": "reader/1.0"}) as response,
    ):
        assert response.status == 200
        assert len(await response.read()) == 43


@pytest.fixture
async def metered(
    relay_factory: RelayFactory, cert_pem_path: Path, key_pem_path: Path
) -> Application:
    return await relay_factory(
        **tracking_over_tls(cert_pem_path, key_pem_path),
        metrics=True,
        metrics_listen="127.0.0.1:0",
        max_events_per_token_client_per_min=2,
        # a connection per session: the counts below follow each session's own
        # connect, TLS and AUTH (the pool's metrics: tests/smtp/test_pool.py)
        upstream_pool_size=0,
    )


async def test_counters_move_by_what_was_relayed_and_fetched(
    metered: Application, upstream: UpstreamServer, client_ssl_context: ssl.SSLContext
) -> None:
    app = metered
    before, content_type = await scrape(app)
    assert content_type.startswith("text/plain; version=0.0.4")

    for number in (1, 2, 3):
        await send(app, number)
    await send(app, 4, html=False)
    upstream.configure(data_reply="451 4.3.0 try again later")
    with pytest.raises(aiosmtplib.SMTPDataError):
        await send(app, 5)
    upstream.configure(data_reply="554 5.7.1 rejected for policy reasons")
    with pytest.raises(aiosmtplib.SMTPDataError):
        await send(app, 6)
    upstream.configure(
        data_reply=None, rcpt_replies={"nobody@example.net": "550 5.1.1 no such user"}
    )
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(app, 7, to="nobody@example.net")
    upstream.configure(auth_ok=False)
    with pytest.raises(aiosmtplib.SMTPSenderRefused):
        await send(app, 8)
    upstream.configure(auth_ok=True, cert="untrusted")
    with pytest.raises(aiosmtplib.SMTPSenderRefused):
        await send(app, 9)
    upstream.configure(cert="trusted")

    delivered = await upstream.wait_for_transactions(4)
    tokens = {}
    for transaction in delivered:
        number = int(re.search(rb"Subject: metrics (\d+)", transaction.data).group(1))  # type: ignore[union-attr]
        found = PIXEL.search(transaction.data)
        if found is not None:
            tokens[number] = found.group(1).decode()
    assert sorted(tokens) == [1, 2, 3]
    for _ in range(3):  # the third is over the limit of 2 per token and client
        await fetch_pixel(app, tokens[1], client_ssl_context)
    await fetch_pixel(app, tokens[2], client_ssl_context)
    await fetch_pixel(app, UNKNOWN_TOKEN, client_ssl_context)
    writer = app.event_writer
    assert writer is not None
    await wait_until(
        lambda: writer.recorded + writer.unknown == 4 and writer.pending == 0,
        timeout_s=10,
        message=f"opens not written: {writer!r}",
    )
    await wait_until(
        lambda: app.connection_slots.active == 0,
        timeout_s=10,
        message="sessions still open",
    )

    after, _ = await scrape(app)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def moved_total(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    expected = {
        ("smtp_tracker_transactions_total", "outcome", "relayed"): 4,
        ("smtp_tracker_transactions_total", "outcome", "deferred"): 1,
        ("smtp_tracker_transactions_total", "outcome", "bounced"): 1,
        ("smtp_tracker_transactions_total", "outcome", "aborted"): 1,
        ("smtp_tracker_upstream_connect_failures_total", "reason", "auth"): 1,
        ("smtp_tracker_upstream_connect_failures_total", "reason", "tls"): 1,
        ("smtp_tracker_upstream_connect_failures_total", "reason", "unavailable"): 0,
        ("smtp_tracker_rewrites_total", "result", "tracked"): 5,
        ("smtp_tracker_rewrites_total", "result", "not_tracked"): 1,
        ("smtp_tracker_rewrites_total", "result", "failed_open"): 0,
        ("smtp_tracker_rewrites_total", "result", "timed_out"): 0,
        ("smtp_tracker_rewrites_total", "result", "busy"): 0,
        ("smtp_tracker_rewrites_not_tracked_total", "reason", "no-html-body"): 1,
        ("smtp_tracker_events_limited_total", "limit", "client"): 1,
        ("smtp_tracker_events_limited_total", "limit", "token"): 0,
        ("smtp_tracker_store_writes_failed_total", "what", "message"): 0,
        ("smtp_tracker_store_writes_failed_total", "what", "event"): 0,
    }
    for (name, label, label_value), count in expected.items():
        assert moved(name, **{label: label_value}) == count, (name, label_value)
    replies = {
        ("MAIL", "2xx"): 7,
        ("RCPT", "2xx"): 6,
        ("RCPT", "5xx"): 1,
        ("DATA", "2xx"): 4,
        ("DATA", "4xx"): 1,
        ("DATA", "5xx"): 1,
    }
    for (command, reply_class), count in replies.items():
        assert (
            moved("smtp_tracker_upstream_replies_total", command=command, **{"class": reply_class})
            == count
        )
    assert moved_total("smtp_tracker_upstream_replies_total") == sum(replies.values())
    # nine upstream connections, each greeted (two then failed STARTTLS or AUTH)
    assert moved("smtp_tracker_upstream_connect_seconds_count") == 9
    assert moved("smtp_tracker_upstream_reply_seconds_count", command="MAIL") == 7
    assert moved("smtp_tracker_upstream_reply_seconds_count", command="DATA") == 6
    assert moved("smtp_tracker_upstream_errors_total") == 2
    assert moved("smtp_tracker_events_offered_total") == 4
    assert moved("smtp_tracker_events_unknown_total") == 1
    assert moved("smtp_tracker_events_dropped_total") == 0
    assert moved_total("smtp_tracker_events_total", kind="open") == 3
    assert moved_total("smtp_tracker_events_total", kind="click") == 0
    assert value(after, "smtp_tracker_transactions_active") == 0
    assert value(after, "smtp_tracker_sessions_active") == 0
    assert value(after, "smtp_tracker_queue_depth", queue="events") == 0
    assert value(after, "smtp_tracker_queue_depth", queue="rewrite") == 0
    build = [labels for (name, labels) in after if name == "smtp_tracker_build_info"]
    assert len(build) == 1 and ("version", __version__) in build[0]


async def test_metrics_listen_only_on_its_address(
    metered: Application, client_ssl_context: ssl.SSLContext
) -> None:
    assert metered.metrics is not None
    port = metered.metrics.port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    for address in ("127.0.0.2", "127.1.2.3"):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=5).close()
    # and not on the pixel endpoint
    url = f"https://localhost:{metered.pixel_port}/metrics"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=client_ssl_context) as response,
    ):
        assert response.status == 404


async def test_metrics_off_by_default(relay: Application) -> None:
    assert relay.config.metrics is False
    assert relay.metrics is None
    assert relay.config.metrics_listen.host == "127.0.0.1"
    assert relay.config.metrics_listen.port == 9425


async def test_metrics_port_in_use_is_one_line(relay_factory: RelayFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as caught:
            await relay_factory(metrics=True, metrics_listen=f"127.0.0.1:{port}")
    assert str(caught.value) == (
        f"metrics_listen: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "is another process using it? Set metrics_listen, or --no-metrics"
    )


def test_metrics_listen_is_a_host_port_key() -> None:
    config = build_config({"metrics": True, "metrics_listen": "[::1]:9999"}, {}, environ={})
    assert (config.metrics_listen.host, config.metrics_listen.port) == ("::1", 9999)


CONF = Path(__file__).resolve().parents[2] / "conf"
SHIPPED = [
    CONF / "prometheus" / "smtp-tracker-rules.yml",
    CONF / "grafana" / "smtp-tracker-dashboard.json",
]


async def test_alert_rules_and_dashboard_name_only_metrics_we_serve(
    metered: Application, upstream: UpstreamServer, client_ssl_context: ssl.SSLContext
) -> None:
    await send(metered, 1)
    await send(metered, 2, html=False)  # so that a not-tracked reason has a series
    delivered, _ = await upstream.wait_for_transactions(2)
    found = PIXEL.search(delivered.data)
    assert found is not None
    await fetch_pixel(metered, found.group(1).decode(), client_ssl_context)
    writer = metered.event_writer
    assert writer is not None
    await wait_until(lambda: writer.recorded == 1, timeout_s=10, message="open not recorded")
    samples, _ = await scrape(metered)
    served = {name for name, _ in samples}
    for path in SHIPPED:
        named = set(re.findall(r"\bsmtp_tracker_\w+", path.read_text()))
        assert named, path
        assert named <= served, (path.name, sorted(named - served))


class Judged(NamedTuple):
    verdict: str
    reason: str
    signals: str | None


def test_counting_verdicts_passes_the_classifiers_answer_on_whole() -> None:
    answer = Judged("human", "ua:reader", '{"ua": "reader"}')
    metrics = Metrics(cast(Application, None))  # nothing is scraped here
    counted = metrics.counting_verdicts(lambda event: answer)
    now = datetime.now(UTC)
    event = EventContext(
        kind="click", at=now, client_address="192.0.2.1", user_agent="reader", relayed_at=now
    )
    assert counted(event) is answer
    assert counted(event) is answer
    assert metrics._verdicts.snapshot() == {("click", "human"): 2}
