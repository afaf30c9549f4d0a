"""Benchmark the reports JSON API over a large store: 1,000,000 messages, 2,000,000 opens.

Usage::

    python bench/reports.py [--messages 1000000] [--opens 2000000] [--repeat 30]
                            [--data-dir DIR] [--seed 1] [--store DSN]

Fills a data directory (a temporary one, or ``--data-dir``: filled when it has
no store yet, reused as it is otherwise) with synthetic records: messages
relayed over 365 days by 2,000 senders of 200 sender domains (a few domains
send most), one to three recipients each from 200,000 addresses, 90 % tracked,
60 % of the tracked ones opened one or more times with verdicts drawn as mail
is (human 35 %, privacy_proxy 30 %, mail_proxy 20 %, scanner 10 %, unknown
5 %), 5 % with a clicked link.  The rows are written with ``executemany`` in
one transaction per table, with the per-message counters, the
``message_recipients`` rows and the ``daily_stats`` rollup computed alongside,
so they are consistent with what the write paths keep.

Then it starts the real reports app (the API with the real bearer-token
authentication, HTTPS with a self-signed certificate) on a loopback port and
times each call through one kept-alive aiohttp client connection: ``--repeat``
sequential requests after three warm-up ones, reporting the median, the 95th
percentile and the maximum, in milliseconds, against the 200 ms target; and
the query plan of each message query (``EXPLAIN QUERY PLAN``).

With ``--store postgresql://...`` the same synthetic store is copied into
that PostgreSQL database (as ``smtp-tracker migrate-store`` does, when it
holds no messages yet; then ``ANALYZE``) and the app reads it there: the same
calls, timed the same way, with PostgreSQL's ``EXPLAIN`` of each message query.

Numbers are for this host (the client, the server and the database share it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from smtp_tracker.store import DB_FILENAME, SqliteDatabase, SqliteStore
from smtp_tracker.store.queries import ROLLUP_COLUMNS, MessageFilter, page_query
from smtp_tracker.store.records import COUNTED_VERDICTS
from smtp_tracker.tls import load_server_context, write_self_signed
from smtp_tracker.web.reports.api import make_reports_app
from smtp_tracker.web.reports.auth import install_auth
from smtp_tracker.web.reports.users import UserDirectory
from smtp_tracker.web.site import start_site

TARGET_MS = 200.0
START = datetime(2025, 1, 1, tzinfo=UTC)
DAY_US = 86_400_000_000
SPAN_DAYS = 365
SENDERS = 2_000
DOMAINS = 200
RECIPIENTS = 200_000
VERDICT_WEIGHTS = {
    "human": 35,
    "privacy_proxy": 30,
    "mail_proxy": 20,
    "scanner": 10,
    "unknown": 5,
}
START_US = (START - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
DAYS = [(START.date() + timedelta(days=d)).isoformat() for d in range(SPAN_DAYS + 1)]
_COLUMN = {name: index for index, name in enumerate(ROLLUP_COLUMNS)}


def tracking_id(k: int) -> str:
    """A well-formed 23-character tracking id for message *k*."""
    return base64.urlsafe_b64encode(k.to_bytes(17, "big")).rstrip(b"=").decode()


def sender_of(k: int) -> tuple[str, str]:
    domain = f"domain{k % DOMAINS}.example"
    return f"sender{k}@{domain}", domain


def recipient_of(k: int) -> str:
    return f"user{k}@rcpt{k % 500}.example"


# -- fill -----------------------------------------------------------------------------------


@dataclass
class Filled:
    """What the benchmark needs to know of the synthetic data."""

    busy_sender: str
    recipient: str
    message_id: str
    opened_tracking_id: str


def fill(data_dir: Path, *, messages: int, opens: int, seed: int) -> Filled:
    """Write the synthetic store into *data_dir* (schema by the real migrations)."""
    SqliteDatabase.open(data_dir).close()
    rng = random.Random(seed)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -400000")
    t0 = time.perf_counter()

    relayed = sorted(rng.randrange(SPAN_DAYS * DAY_US) + START_US for _ in range(messages))
    # a few domains send most: sender k's weight falls with k
    sender_ids = [min(SENDERS - 1, int(SENDERS * rng.random() ** 3)) for _ in range(messages)]
    tracked = [rng.random() < 0.9 for _ in range(messages)]
    open_count = [0] * messages
    counted_count = [0] * messages
    first_counted: list[int | None] = [None] * messages
    click_count = [0] * messages
    counted_clicks = [0] * messages
    rollup: dict[tuple[str, str], list[int]] = {}

    def bump(k: int, column: str, by: int = 1) -> None:
        key = (DAYS[(relayed[k] - START_US) // DAY_US], sender_of(sender_ids[k])[1])
        row = rollup.get(key)
        if row is None:
            row = rollup[key] = [0] * len(ROLLUP_COLUMNS)
        row[_COLUMN[column]] += by

    for k in range(messages):
        bump(k, "relayed")
        if tracked[k]:
            bump(k, "tracked")

    # opens: 60 % of tracked messages opened at least once, the rest of the events spread
    opened = [k for k in range(messages) if tracked[k] and rng.random() < 0.6]
    verdicts = list(VERDICT_WEIGHTS)
    weights = list(VERDICT_WEIGHTS.values())

    def open_rows() -> Iterator[tuple[Any, ...]]:
        for j in range(opens):
            k = opened[j] if j < len(opened) else rng.choice(opened)
            verdict = rng.choices(verdicts, weights)[0]
            at_us = relayed[k] + int(rng.lognormvariate(8, 2.5) * 1_000_000)
            if open_count[k] == 0:
                bump(k, "opened_any")
            open_count[k] += 1
            bump(k, "opens")
            bump(k, f"opens_{verdict}")
            if verdict in COUNTED_VERDICTS:
                if counted_count[k] == 0:
                    bump(k, "opened")
                counted_count[k] += 1
                first = first_counted[k]
                if first is None or at_us < first:
                    first_counted[k] = at_us
            ip = f"198.51.{j % 256}.0/24"
            yield (tracking_id(k), at_us, ip, "Mozilla/5.0", verdict, f"bench:{verdict}")

    clicked = [k for k in opened if rng.random() < 0.08]

    def link_rows() -> Iterator[tuple[Any, ...]]:
        for k in clicked:
            yield (f"L{tracking_id(k)}", tracking_id(k), f"https://example.com/{k}", 0)

    def click_rows() -> Iterator[tuple[Any, ...]]:
        for j in range(len(clicked) * 2):
            k = clicked[j % len(clicked)]
            verdict = rng.choices(verdicts, weights)[0]
            bump(k, "clicks")
            click_count[k] += 1
            if verdict in COUNTED_VERDICTS:
                if counted_clicks[k] == 0:
                    bump(k, "clicked")
                counted_clicks[k] += 1
            at_us = relayed[k] + 3_600_000_000
            yield (f"L{tracking_id(k)}", tracking_id(k), at_us, None, None, verdict, "bench")

    recipients_of: list[list[str]] = [
        [recipient_of(rng.randrange(RECIPIENTS)) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        for _ in range(messages)
    ]

    def message_rows() -> Iterator[tuple[Any, ...]]:
        for k in range(messages):
            sender, domain = sender_of(sender_ids[k])
            yield (
                k + 1,
                tracking_id(k),
                f"B{k:09d}",
                f"<m{k}@{domain}>",
                sender,
                json.dumps(recipients_of[k]),
                2048,
                relayed[k] - 200_000,
                relayed[k],
                f"250 2.0.0 Ok: queued as U{k}",
                int(tracked[k]),
                None if tracked[k] else "no-html",
                None,
                domain,
                open_count[k],
                counted_count[k],
                first_counted[k],
                click_count[k],
                counted_clicks[k],
            )

    def recipient_rows() -> Iterator[tuple[int, str]]:
        for k in range(messages):
            for address in dict.fromkeys(recipients_of[k]):
                yield (k + 1, address)

    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO opens (tracking_id, at_us, ip, user_agent, verdict, verdict_reason)"
        " VALUES (?,?,?,?,?,?)",
        open_rows(),
    )
    conn.executemany(
        "INSERT INTO links (token, tracking_id, url, position) VALUES (?,?,?,?)", link_rows()
    )
    conn.executemany(
        "INSERT INTO clicks (link_token, tracking_id, at_us, ip, user_agent, verdict,"
        " verdict_reason) VALUES (?,?,?,?,?,?,?)",
        click_rows(),
    )
    conn.executemany(
        "INSERT INTO messages (id, tracking_id, queue_id, message_id, sender, recipients,"
        " size_bytes, received_at_us, relayed_at_us, upstream_reply, tracked,"
        " not_tracked_reason, subject, sender_domain, open_count, counted_open_count,"
        " first_open_at_us, click_count, counted_click_count)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        message_rows(),
    )
    conn.executemany(
        "INSERT INTO message_recipients (message_rowid, address) VALUES (?,?)", recipient_rows()
    )
    columns = ", ".join(ROLLUP_COLUMNS)
    marks = ", ".join("?" * (len(ROLLUP_COLUMNS) + 2))
    conn.executemany(
        f"INSERT INTO daily_stats (day, sender_domain, {columns}) VALUES ({marks})",  # noqa: S608 - constants
        ((day, domain, *row) for (day, domain), row in rollup.items()),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()
    print(
        f"filled {messages:,} messages, {opens:,} opens, {len(clicked) * 2:,} clicks, "
        f"{len(rollup):,} rollup rows in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return describe(data_dir)


def describe(data_dir: Path) -> Filled:
    """Pick the benchmark's targets from the store: a busy sender, a recipient, ..."""
    conn = sqlite3.connect(f"file:{data_dir / DB_FILENAME}?mode=ro", uri=True)
    try:
        busy_sender = conn.execute(  # the busiest sender (reads the sender index once)
            "SELECT sender FROM messages GROUP BY sender ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()[0]
        recipient = conn.execute(
            "SELECT address FROM message_recipients WHERE message_rowid = 500000 % "
            "(SELECT max(id) FROM messages) + 1"
        ).fetchone()[0]
        message_id = conn.execute(
            "SELECT message_id FROM messages WHERE id = (SELECT max(id) / 3 FROM messages)"
        ).fetchone()[0]
        opened = conn.execute(
            "SELECT tracking_id FROM messages WHERE open_count > 3 AND click_count > 0 LIMIT 1"
        ).fetchone()[0]
    finally:
        conn.close()
    return Filled(busy_sender, recipient, message_id, opened)


# -- timing ---------------------------------------------------------------------------------


@dataclass
class Timing:
    name: str
    median_ms: float
    p95_ms: float
    max_ms: float
    detail: str


async def time_call(
    session: aiohttp.ClientSession,
    url: str,
    params: dict[str, str],
    *,
    repeat: int,
    name: str,
    headers: dict[str, str] | None = None,
    allow_redirects: bool = True,
    describe: Callable[[bytes, str], str] | None = None,
) -> Timing:
    """GET *url* ``repeat`` times, one after another, after three warm-up requests.

    :param describe: what the first answer showed, from its body and content
        type; :func:`summarize` (the JSON API's) when None.
    :raises SystemExit: an answer other than 200.
    """
    samples: list[float] = []
    detail = ""
    for attempt in range(repeat + 3):
        started = time.perf_counter()
        async with session.get(
            url, params=params, headers=headers, allow_redirects=allow_redirects
        ) as response:
            body = await response.read()
            if response.status != 200:
                raise SystemExit(f"{name}: HTTP {response.status}: {body[:200]!r}")
        elapsed_ms = (time.perf_counter() - started) * 1000
        if attempt >= 3:
            samples.append(elapsed_ms)
        if not detail:
            detail = (describe or summarize)(body, response.content_type)
    samples.sort()
    p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
    return Timing(name, statistics.median(samples), p95, samples[-1], detail)


def summarize(body: bytes, content_type: str) -> str:
    if content_type != "application/json":
        rows = body.count(b"\n") - 1
        return f"{rows} CSV rows"
    data = json.loads(body)
    if "items" in data:
        return f"{len(data['items'])} messages"
    if "rows" in data:
        return f"{len(data['rows'])} rows, {data['total']['relayed']:,} relayed"
    if "opens" in data:
        return f"{len(data['opens'])} opens, {len(data['clicks'])} clicks"
    return f"{len(body)} bytes"


async def cursor_at_depth(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], depth: int
) -> str:
    cursor = ""
    for _ in range(depth - 1):
        params = {"cursor": cursor} if cursor else {}
        async with session.get(url, params=params, headers=headers) as response:
            cursor = (await response.json())["next_cursor"]
        if cursor is None:
            raise SystemExit(f"{url}: fewer than {depth} pages")
    return cursor


def plans(data_dir: Path, filled: Filled) -> list[tuple[str, list[str]]]:
    conn = sqlite3.connect(f"file:{data_dir / DB_FILENAME}?mode=ro", uri=True)
    cases = {
        "first page": MessageFilter(),
        "by sender": MessageFilter(sender=filled.busy_sender),
        "by recipient": MessageFilter(recipient=filled.recipient),
        "by q": MessageFilter(q=filled.message_id),
        "opened=true": MessageFilter(opened=True),
    }
    result = []
    try:
        for name, f in cases.items():
            sql, params = page_query(f, after=(1 << 62, 1 << 62), limit=51)
            rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
            result.append((name, [str(row[3]) for row in rows]))
    finally:
        conn.close()
    return result


def fill_postgresql(data_dir: Path, dsn: str) -> None:
    """Copy the store of *data_dir* into *dsn* unless it holds messages already."""
    from smtp_tracker.store.pg_copy import copy_store, open_source
    from smtp_tracker.store.postgresql import PgDatabase

    with PgDatabase.open(dsn) as database:
        conn = database.connection.raw
        if conn.execute("SELECT count(*) FROM messages").fetchone()[0]:
            print(f"reusing the store in {dsn}", file=sys.stderr)
            return
        source = open_source(data_dir)
        t0 = time.perf_counter()
        try:
            copied = copy_store(source, conn, batch_rows=50_000)
        finally:
            source.close()
        conn.execute("ANALYZE")
        print(
            f"copied {sum(copied.values()):,} rows into PostgreSQL in"
            f" {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )


def pg_plans(dsn: str, filled: Filled) -> list[tuple[str, list[str]]]:
    from smtp_tracker.store.postgresql import PgDatabase

    cases = {
        "first page": MessageFilter(),
        "by sender": MessageFilter(sender=filled.busy_sender),
        "by recipient": MessageFilter(recipient=filled.recipient),
        "by q": MessageFilter(q=filled.message_id),
        "opened=true": MessageFilter(opened=True),
    }
    result = []
    with PgDatabase.open(dsn) as database:
        for name, f in cases.items():
            sql, params = page_query(f, after=(1 << 62, 1 << 62), limit=51)
            rows = database.connection.execute(f"EXPLAIN {sql}", params).fetchall()
            result.append((name, [str(row[0]).strip() for row in rows][:3]))
    return result


async def run_timings(
    data_dir: Path, filled: Filled, repeat: int, dsn: str | None = None
) -> list[Timing]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-reports-tls-"))
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    write_self_signed(cert, key, hostnames=["localhost", "127.0.0.1"])
    client_context = ssl.create_default_context(cafile=str(cert))
    token = base64.urlsafe_b64encode(random.randbytes(32)).decode()
    headers = {"Authorization": f"Bearer {token}"}
    if dsn is None:
        opened: Any = await SqliteStore.open(data_dir)
    else:
        from smtp_tracker.store.postgresql import PostgresStore

        opened = await PostgresStore.open(dsn)
    async with opened as store:
        app = make_reports_app(store=store, auth_middleware=None)
        install_auth(
            app,
            token=token,
            users=await UserDirectory.open(tmp / "no-users.json"),
            session_s=3600,
        )
        runner, port = await start_site(
            app, host="127.0.0.1", port=0, ssl_context=load_server_context(cert, key)
        )
        base = f"https://localhost:{port}"
        connector = aiohttp.TCPConnector(ssl=client_context, limit=1)
        year = {"since": DAYS[0], "until": DAYS[SPAN_DAYS - 1]}
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                deep = await cursor_at_depth(session, base + "/api/messages", headers, 50)
                deep_sender = await cursor_at_depth(
                    session,
                    base + f"/api/messages?sender={filled.busy_sender}",
                    headers,
                    50,
                )
                cases: list[tuple[str, str, dict[str, str]]] = [
                    ("messages: first page", "/api/messages", {}),
                    ("messages: by sender", "/api/messages", {"sender": filled.busy_sender}),
                    (
                        "messages: by sender domain",
                        "/api/messages",
                        {"sender_domain": "domain7.example"},
                    ),
                    ("messages: by recipient", "/api/messages", {"recipient": filled.recipient}),
                    ("messages: by q (Message-ID)", "/api/messages", {"q": filled.message_id}),
                    ("messages: opened=true", "/api/messages", {"opened": "true"}),
                    ("messages: opened=false", "/api/messages", {"opened": "false"}),
                    (
                        "messages: since/until (a week)",
                        "/api/messages",
                        {"since": DAYS[100], "until": DAYS[106]},
                    ),
                    ("messages: page 50 via cursor", "/api/messages", {"cursor": deep}),
                    (
                        "messages: by sender, page 50",
                        "/api/messages",
                        {"sender": filled.busy_sender, "cursor": deep_sender},
                    ),
                    ("messages: limit=500", "/api/messages", {"limit": "500"}),
                    ("message page", f"/api/messages/{filled.opened_tracking_id}", {}),
                    ("stats: by day, a year", "/api/stats", {**year, "group": "day"}),
                    (
                        "stats: by sender domain, a year",
                        "/api/stats",
                        {**year, "group": "sender_domain"},
                    ),
                    ("stats: by day, all time", "/api/stats", {}),
                    (
                        "export.csv: one sender, a week",
                        "/api/export.csv",
                        {"sender": filled.busy_sender, "since": DAYS[100], "until": DAYS[106]},
                    ),
                ]
                return [
                    await time_call(
                        session, base + path, params, repeat=repeat, name=name, headers=headers
                    )
                    for name, path, params in cases
                ]
        finally:
            await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--opens", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=30, help="timed requests per call")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--data-dir", type=Path, help="fill this directory (or reuse the store in it)"
    )
    parser.add_argument(
        "--store", help="postgresql://USER@HOST:PORT/DBNAME: time the calls on PostgreSQL"
    )
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-reports-")) / "data"
    if (data_dir / DB_FILENAME).exists():
        print(f"reusing the store in {data_dir}", file=sys.stderr)
        filled = describe(data_dir)
    else:
        filled = fill(data_dir, messages=args.messages, opens=args.opens, seed=args.seed)
    size_mb = (data_dir / DB_FILENAME).stat().st_size / 1e6
    print(f"store: {data_dir / DB_FILENAME} ({size_mb:,.0f} MB)")
    if args.store:
        fill_postgresql(data_dir, args.store)
        print(f"store: PostgreSQL, {args.store}")
    for name, plan in pg_plans(args.store, filled) if args.store else plans(data_dir, filled):
        print(f"plan, {name}: {' | '.join(plan)}")
    timings = asyncio.run(run_timings(data_dir, filled, args.repeat, args.store))
    print()
    print(f"{'call':34} {'median':>8} {'p95':>8} {'max':>8}  result")
    slow = 0
    for t in timings:
        flag = "" if t.p95_ms < TARGET_MS else "  OVER 200 ms"
        slow += bool(flag)
        figures = f"{t.median_ms:7.1f}ms {t.p95_ms:7.1f}ms {t.max_ms:7.1f}ms"
        print(f"{t.name:34} {figures}  {t.detail}{flag}")
    print(f"\n{len(timings) - slow} of {len(timings)} calls under {TARGET_MS:.0f} ms at p95")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
