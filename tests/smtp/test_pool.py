"""Upstream connections kept and reused across downstream sessions (issue 15, smtp/pool.py).

The upstream is the aiosmtpd smarthost of tests/support/upstream.py with
STARTTLS and AUTH required (unless a test says otherwise); it counts the
connections it accepted and records every command line, so each test counts
connects, EHLOs, AUTHs, RSETs and QUITs there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from pathlib import Path
from typing import Any

import pytest

from smtp_tracker.app import Application
from smtp_tracker.smtp.pool import ConnectionPool, PoolKey
from smtp_tracker.smtp.upstream import UpstreamSettings
from tests.smtp.test_hostile import Raw
from tests.support.upstream import UpstreamServer, upstream_factory
from tests.support.waiting import wait_until

__all__ = ["upstream_factory"]

OK_REPLIES = ("250 ", "354 ")


async def session(address: tuple[str, int], numbers: list[int]) -> list[str]:
    """One downstream session: EHLO, a transaction per number, QUIT; every reply's last line."""
    client = await Raw.open(address)
    try:
        said = [await client.reply()]
        client.writer.write(b"EHLO postfix.test\r\n")
        said.append((await client.lines())[-1])
        for number in numbers:
            said += await transaction(client, number)
        said.append(await client.command("QUIT"))
    finally:
        await client.close()
    return said


async def transaction(client: Raw, number: int) -> list[str]:
    """MAIL, RCPT, DATA and a short message on ``client``; the four replies."""
    said = [
        await client.command("MAIL FROM:<alice@example.org>"),
        await client.command(f"RCPT TO:<bob{number}@example.net>"),
        await client.command("DATA"),
    ]
    client.writer.write(f"Subject: pool {number}\r\n\r\nhello {number}\r\n.\r\n".encode())
    said.append(await client.reply(timeout_s=20))
    return said


def only_positive(said: list[str]) -> bool:
    """Every reply the client heard was 2xx or 354 (the greeting and QUIT's 221 too)."""
    return all(line[:1] in ("2", "3") for line in said) and all(
        line.startswith(OK_REPLIES)
        for line in said
        if not line.startswith(("220 ", "221 ", "250-", "250 "))
    )


def count(upstream: UpstreamServer, verb: str) -> int:
    return sum(1 for line in upstream.commands if line.split(" ", 1)[0].upper() == verb)


def kept(relay: Application) -> int:
    assert relay.upstreams is not None
    return relay.upstreams.pool.stats(relay.upstreams.first.settings).idle


# -- one connection for many sessions ---------------------------------------------------------


async def test_sequential_sessions_share_one_upstream_connection_with_rset_between(
    relay: Application, upstream: UpstreamServer
) -> None:
    for number in range(5):
        said = await session(relay.smtp_address, [number])
        assert only_positive(said), said
    await upstream.wait_for_transactions(5)
    await wait_until(lambda: count(upstream, "RSET") == 5, timeout_s=10, message="the 5th RSET")
    # one connect, one TLS handshake, one AUTH for five downstream sessions
    assert upstream.accepted == 1
    assert (count(upstream, "EHLO"), count(upstream, "STARTTLS")) == (2, 1)
    assert count(upstream, "AUTH") == 1 and count(upstream, "QUIT") == 0
    # an RSET after each transaction, before the next MAIL
    verbs = [line.split(" ", 1)[0] for line in upstream.commands]
    assert [v for v in verbs if v in ("MAIL", "RSET")] == ["MAIL", "RSET"] * 5
    assert [t.rcpt_tos for t in upstream.transactions] == [
        [f"bob{n}@example.net"] for n in range(5)
    ]
    assert all(t.tls and t.auth_user == upstream.user for t in upstream.transactions)
    assert relay.upstreams is not None
    stats = relay.upstreams.pool.stats(relay.upstreams.first.settings)
    assert (stats.idle, stats.reuses) == (1, 4)


async def test_one_session_s_transactions_and_rset_keep_the_connection(
    relay: Application, upstream: UpstreamServer
) -> None:
    """The client's own RSET in the middle of a transaction, answered 250, gives it back."""
    client = await Raw.open(relay.smtp_address)
    try:
        await client.reply()
        client.writer.write(b"EHLO postfix.test\r\n")
        await client.lines()
        assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
        assert await client.command("RSET") == "250 2.0.0 OK"
        assert only_positive(await transaction(client, 1))
    finally:
        await client.close()
    await upstream.wait_for_transactions(1)
    assert upstream.accepted == 1
    assert not any(line.startswith("503") for line in upstream.transcript)


async def test_the_metrics_show_kept_connections_and_reuses(
    relay_factory: Any, upstream: UpstreamServer
) -> None:
    relay = await relay_factory(metrics=True, metrics_listen="127.0.0.1:0")
    assert relay.metrics is not None
    for number in range(3):
        await session(relay.smtp_address, [number])
    await wait_until(lambda: kept(relay) == 1, timeout_s=10, message="the connection kept")
    labels = f'role="upstream",upstream="{upstream.address}"'
    scraped = relay.metrics.exposition().decode()
    assert f"smtp_tracker_upstream_pool_idle{{{labels}}} 1.0" in scraped
    assert f"smtp_tracker_upstream_pool_reuses_total{{{labels}}} 2.0" in scraped


@pytest.mark.upstream(auth_required=False)
async def test_copies_keep_their_connections_too(
    upstream: UpstreamServer, upstream_factory: Any, relay_factory: Any
) -> None:
    copy = await upstream_factory(auth_required=False)
    relay = await relay_factory(copies=[{"upstream": copy.address}], upstream_user=None)
    for number in range(3):
        assert only_positive(await session(relay.smtp_address, [number]))
    await upstream.wait_for_transactions(3)
    await copy.wait_for_transactions(3)
    assert (upstream.accepted, copy.accepted) == (1, 1)
    await wait_until(lambda: count(copy, "RSET") == 3, timeout_s=10, message="the copy's RSETs")
    assert relay.upstreams is not None
    copy_health = relay.upstreams.copy_targets[0].health
    assert relay.upstreams.pool.stats(copy_health.settings).reuses == 2
    assert copy_health.carried == 3


# -- connections found dead, 421, the client gone --------------------------------------------


async def test_an_idle_connection_the_upstream_closed_is_replaced_unseen(
    relay: Application, upstream: UpstreamServer
) -> None:
    assert only_positive(await session(relay.smtp_address, [1]))
    await wait_until(lambda: kept(relay) == 1, timeout_s=10, message="the connection kept")
    for connection in list(upstream.connections):  # the upstream's own idle timeout
        connection.drop()
    await wait_until(lambda: not upstream.connections, timeout_s=10, message="dropped")
    said = await session(relay.smtp_address, [2])
    assert only_positive(said), said
    await upstream.wait_for_transactions(2)
    assert upstream.accepted == 2
    assert relay.upstreams is not None
    health = relay.upstreams.first
    assert health.up and health.failed == 0


class CuttingProxy:
    """A TCP proxy to the upstream that can cut its current connections at their next
    bytes from the relay: a kept connection the upstream closed just as the relay
    sent MAIL on it (the relay had not seen the close yet)."""

    def __init__(self, upstream: UpstreamServer) -> None:
        self._upstream = upstream
        self._doomed: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.cut = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def doom_current(self) -> None:
        self._doomed |= self._open

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            self._upstream.host, self._upstream.port
        )
        self._open.add(writer)
        back = asyncio.ensure_future(self._pipe(up_reader, writer, None))
        self._tasks.add(back)
        try:
            await self._pipe(reader, up_writer, writer)
        finally:
            self._open.discard(writer)
            up_writer.close()
            writer.close()
            await back

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        doom_key: asyncio.StreamWriter | None,
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if doom_key is not None and doom_key in self._doomed:
                    self.cut += 1
                    return
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                writer.close()
            await self._server.wait_closed()
        for task in self._tasks:
            with contextlib.suppress(ConnectionError):
                await task


async def test_a_kept_connection_dead_at_mail_moves_the_transaction_to_a_new_one(
    relay_factory: Any, upstream: UpstreamServer
) -> None:
    proxy = CuttingProxy(upstream)
    address = await proxy.start()
    try:
        relay = await relay_factory(upstream=address)
        assert only_positive(await session(relay.smtp_address, [1]))
        await wait_until(lambda: kept(relay) == 1, timeout_s=10, message="the connection kept")
        proxy.doom_current()
        said = await session(relay.smtp_address, [2])
        assert only_positive(said), said
        assert proxy.cut == 1  # MAIL went out on the kept connection and was lost there
        await upstream.wait_for_transactions(2)
        assert upstream.accepted == 2
        assert relay.upstreams is not None
        assert relay.upstreams.first.up and relay.upstreams.first.failed == 0
        await relay.stop(grace_s=5.0)
    finally:
        await proxy.close()


async def test_a_kept_connection_idle_past_the_check_bound_is_checked_with_rset(
    relay: Application, upstream: UpstreamServer
) -> None:
    assert relay.upstreams is not None
    relay.upstreams.pool.check_after_s = 0.0  # every kept connection counts as idle long
    for number in range(2):
        assert only_positive(await session(relay.smtp_address, [number]))
    await wait_until(lambda: count(upstream, "RSET") == 3, timeout_s=10, message="3 RSETs")
    verbs = [line.split(" ", 1)[0] for line in upstream.commands]
    # given back (RSET), checked before reuse (RSET), then the second MAIL
    assert [v for v in verbs if v in ("MAIL", "RSET")] == ["MAIL", "RSET", "RSET", "MAIL", "RSET"]
    assert upstream.accepted == 1


async def test_a_kept_connection_failing_its_check_is_replaced_unseen(
    relay_factory: Any, upstream: UpstreamServer
) -> None:
    proxy = CuttingProxy(upstream)
    address = await proxy.start()
    try:
        relay = await relay_factory(upstream=address)
        assert relay.upstreams is not None
        relay.upstreams.pool.check_after_s = 0.0
        assert only_positive(await session(relay.smtp_address, [1]))
        await wait_until(lambda: kept(relay) == 1, timeout_s=10, message="the connection kept")
        proxy.doom_current()
        said = await session(relay.smtp_address, [2])
        assert only_positive(said), said
        assert proxy.cut == 1  # the check (RSET) was cut; MAIL went to a new connection
        assert count(upstream, "MAIL") == 2
        await upstream.wait_for_transactions(2)
        assert upstream.accepted == 2
        assert relay.upstreams.first.up and relay.upstreams.first.failed == 0
        await relay.stop(grace_s=5.0)
    finally:
        await proxy.close()


async def test_a_421_final_reply_closes_the_connection_instead_of_keeping_it(
    relay: Application, upstream: UpstreamServer
) -> None:
    upstream.configure(data_reply="421 4.3.2 closing, try again later")
    said = await session(relay.smtp_address, [1])
    assert said[-2].startswith("421 "), said
    upstream.configure(data_reply=None)
    assert only_positive(await session(relay.smtp_address, [2]))
    await upstream.wait_for_transactions(1)
    assert upstream.accepted == 2  # the first connection was not used again
    await wait_until(lambda: len(upstream.connections) == 1, timeout_s=10, message="closed")


async def test_a_421_to_rcpt_closes_the_connection_after_the_transaction(
    relay: Application, upstream: UpstreamServer
) -> None:
    upstream.configure(rcpt_replies={"bob1@example.net": "421 4.3.2 going away"})
    client = await Raw.open(relay.smtp_address)
    try:
        await client.reply()
        client.writer.write(b"EHLO postfix.test\r\n")
        await client.lines()
        assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
        assert (await client.command("RCPT TO:<bob1@example.net>")).startswith("421 ")
        assert await client.command("RSET") == "250 2.0.0 OK"
        assert only_positive(await transaction(client, 2))
    finally:
        await client.close()
    await upstream.wait_for_transactions(1)
    assert upstream.accepted == 2


async def test_a_client_gone_mid_transaction_closes_the_connection(
    relay: Application, upstream: UpstreamServer
) -> None:
    client = await Raw.open(relay.smtp_address)
    await client.reply()
    client.writer.write(b"EHLO postfix.test\r\n")
    await client.lines()
    assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
    assert await client.command("RCPT TO:<bob@example.net>") == "250 2.1.5 Ok"
    client.writer.transport.abort()
    await wait_until(lambda: not upstream.connections, timeout_s=10, message="closed")
    assert count(upstream, "QUIT") == 1 and count(upstream, "RSET") == 0
    assert kept(relay) == 0
    assert only_positive(await session(relay.smtp_address, [2]))
    assert upstream.accepted == 2


# -- never shared -------------------------------------------------------------------------------


async def test_concurrent_transactions_never_share_a_connection(
    relay: Application, upstream: UpstreamServer
) -> None:
    """Three transactions open at once hold three connections; the next three reuse them."""
    clients = [await Raw.open(relay.smtp_address) for _ in range(3)]
    try:
        for rounds in range(2):
            for client in clients:
                if rounds == 0:
                    await client.reply()
                    client.writer.write(b"EHLO postfix.test\r\n")
                    await client.lines()
                assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
            assert upstream.accepted == 3
            for number, client in enumerate(clients):
                assert await client.command(f"RCPT TO:<bob{number}@example.net>") == (
                    "250 2.1.5 Ok"
                )
            for client in clients:
                assert (await client.command("DATA")).startswith("354 ")
            for number, client in enumerate(clients):
                client.writer.write(f"Subject: {number}\r\n\r\nhi\r\n.\r\n".encode())
            for client in clients:
                assert (await client.reply(timeout_s=20)).startswith("250 2.0.0 Ok: queued")
            await wait_until(lambda: kept(relay) == 3, timeout_s=10, message="three kept")
    finally:
        for client in clients:
            await client.close()
    await upstream.wait_for_transactions(6)
    assert upstream.accepted == 3
    # the upstream never saw MAIL on a connection already in a transaction
    assert not any(line.startswith("503") for line in upstream.transcript)
    # each message went out whole on its own connection
    assert sorted(t.rcpt_tos[0] for t in upstream.transactions) == sorted(
        f"bob{n}@example.net" for n in range(3) for _ in range(2)
    )


def settings_for(upstream: UpstreamServer, ca_pem_path: Path, **changes: Any) -> UpstreamSettings:
    values: dict[str, Any] = {
        "host": upstream.host,
        "port": upstream.port,
        "tls": "starttls",
        "tls_context": ssl.create_default_context(cafile=str(ca_pem_path)),
        "helo_name": "relay.test",
        "user": upstream.user,
        "password": upstream.password,
        "connect_timeout_s": 5.0,
        "command_timeout_s": 5.0,
        "data_timeout_s": 5.0,
    }
    values.update(changes)
    return UpstreamSettings(**values)


def test_the_pool_key_holds_every_setting_that_makes_connections_differ() -> None:
    base = UpstreamSettings(host="a", port=25, tls="starttls", tls_context=None, helo_name="h")
    key = PoolKey.of(base)
    assert key == PoolKey("a", 25, "starttls", "a", None, "h")
    for change in (
        {"host": "b"},
        {"port": 26},
        {"tls": "implicit"},
        {"user": "someone"},
        {"helo_name": "other"},
    ):
        other = UpstreamSettings(**{**vars(base), **change})
        assert PoolKey.of(other) != key, change
    # the password is not part of the identity, and the timeouts are not either
    same = UpstreamSettings(**{**vars(base), "password": "x", "command_timeout_s": 1.0})
    assert PoolKey.of(same) == key


def is_kept(pool: ConnectionPool, settings: UpstreamSettings) -> bool:
    return pool.stats(settings).idle == 1


@pytest.mark.upstream(auth_required=False)
async def test_different_auth_identities_never_share_a_connection(
    upstream: UpstreamServer, ca_pem_path: Path
) -> None:
    pool = ConnectionPool(4)
    authenticated = settings_for(upstream, ca_pem_path)
    anonymous = settings_for(upstream, ca_pem_path, user=None, password=None)
    try:
        for settings, number in ((authenticated, 1), (anonymous, 2), (authenticated, 3)):
            session, reused = await pool.acquire(settings)
            assert reused == (number == 3)
            assert (await session.mail("alice@example.org", [])).code == 250
            assert (await session.rcpt(f"bob{number}@example.net", [])).code == 250
            assert (await session.data(b"Subject: x\r\n\r\nx\r\n")).code == 250
            pool.release(session, reset=True)
            await wait_until(
                functools.partial(is_kept, pool, settings), timeout_s=10, message="given back"
            )
    finally:
        await pool.close()
    assert upstream.accepted == 2
    assert [t.auth_user for t in upstream.transactions] == [upstream.user, None, upstream.user]
    assert count(upstream, "QUIT") == 2


# -- bounds: size, idle time, shutdown ---------------------------------------------------------


async def test_no_more_than_upstream_pool_size_connections_are_kept(
    relay_factory: Any, upstream: UpstreamServer
) -> None:
    """Four transactions at once hold four connections; two are kept, two are QUIT."""
    relay = await relay_factory(upstream_pool_size=2)
    clients = [await Raw.open(relay.smtp_address) for _ in range(4)]
    try:
        for client in clients:
            await client.reply()
            client.writer.write(b"EHLO postfix.test\r\n")
            await client.lines()
            assert await client.command("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
        assert upstream.accepted == 4
        for number, client in enumerate(clients):
            assert await client.command(f"RCPT TO:<bob{number}@example.net>") == "250 2.1.5 Ok"
            assert (await client.command("DATA")).startswith("354 ")
            client.writer.write(b"Subject: bound\r\n\r\nhi\r\n.\r\n")
            assert (await client.reply(timeout_s=20)).startswith("250 2.0.0 Ok: queued")
            assert await client.command("QUIT") == "221 2.0.0 Bye"
    finally:
        for client in clients:
            await client.close()
    await upstream.wait_for_transactions(4)
    await wait_until(
        lambda: len(upstream.connections) == 2 and count(upstream, "QUIT") == 2,
        timeout_s=10,
        message="two connections kept, the others QUIT",
    )
    assert kept(relay) == 2


async def test_a_connection_idle_past_the_timeout_is_quit(
    relay_factory: Any, upstream: UpstreamServer
) -> None:
    relay = await relay_factory(upstream_idle_timeout_s=0.2)
    assert only_positive(await session(relay.smtp_address, [1]))
    await wait_until(lambda: not upstream.connections, timeout_s=10, message="the idle QUIT")
    assert count(upstream, "QUIT") == 1
    assert kept(relay) == 0


async def test_shutdown_quits_the_kept_connections(
    relay: Application, upstream: UpstreamServer
) -> None:
    said = await asyncio.gather(*(session(relay.smtp_address, [n]) for n in range(3)))
    assert all(only_positive(s) for s in said)
    await upstream.wait_for_transactions(3)
    opened = upstream.accepted
    await relay.stop(grace_s=5.0)
    assert count(upstream, "QUIT") == opened
    await wait_until(lambda: not upstream.connections, timeout_s=10, message="all closed")


async def test_pool_size_0_opens_a_connection_per_session_as_before(
    relay_factory: Any, upstream: UpstreamServer
) -> None:
    relay = await relay_factory(upstream_pool_size=0)
    assert only_positive(await session(relay.smtp_address, [1, 2]))
    assert only_positive(await session(relay.smtp_address, [3]))
    await upstream.wait_for_transactions(3)
    await wait_until(lambda: count(upstream, "QUIT") == 2, timeout_s=10, message="two QUITs")
    assert upstream.accepted == 2  # one per session, kept for the session's second message
    assert count(upstream, "RSET") == 0
