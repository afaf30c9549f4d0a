"""Benchmark the dashboard's pages over a large store: 1,000,000 messages, 2,000,000 opens.

Usage::

    python bench/dashboard.py [--messages 1000000] [--opens 2000000] [--repeat 20]
                              [--data-dir DIR] [--seed 1]

Fills (or reuses) a data directory with the synthetic records of
``bench/reports.py`` (same generator, same ``--data-dir`` rules), starts the
reports app as ``serve`` wires it (authentication and dashboard, HTTPS with a
self-signed certificate), logs in once as a user of a fresh users file, and
times each page through one kept-alive connection with the session cookie:
``--repeat`` sequential requests after three warm-up ones; the median, the
95th percentile and the maximum in milliseconds against the 200 ms target.
The time includes the template rendering and, for the overview, the SVG chart
of up to 366 days.  A page answering anything but 200 stops the run.

Numbers are for this host (the client, the server and SQLite share it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import re
import ssl
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reports as data  # bench/reports.py: the synthetic store

from smtp_tracker.store import DB_FILENAME, SqliteStore
from smtp_tracker.tls import load_server_context, write_self_signed
from smtp_tracker.web.reports.api import make_reports_app
from smtp_tracker.web.reports.auth import install_auth
from smtp_tracker.web.reports.dashboard import install_dashboard
from smtp_tracker.web.reports.users import UserDirectory, add_user
from smtp_tracker.web.site import start_site

TARGET_MS = 200.0
USER, PASSWORD = "bench", "benchmark password"


async def log_in(session: aiohttp.ClientSession, base: str) -> None:
    async with session.get(base + "/login") as response:
        html = await response.text()
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    if match is None:
        raise SystemExit("no login form")
    fields = {"csrf_token": match.group(1), "next": "/", "username": USER, "password": PASSWORD}
    async with session.post(base + "/login", data=fields, allow_redirects=False) as response:
        if response.status != 303:
            raise SystemExit(f"login: HTTP {response.status}")


async def older_link(session: aiohttp.ClientSession, base: str, path: str, depth: int) -> str:
    """The path of page *depth* of a message list, following "Older" links."""
    for _ in range(depth - 1):
        async with session.get(base + path) as response:
            html = await response.text()
        match = re.search(r'<a href="([^"]+)" class="button" rel="next">', html)
        if match is None:
            raise SystemExit(f"{path}: fewer than {depth} pages")
        path = match.group(1).replace("&amp;", "&")
    return path


def describe_page(body: bytes, content_type: str) -> str:
    """What a page showed: rows of its record tables, chart bars, size."""
    html = body.decode()
    rows = html.count("<tr>\n") - html.count("<thead>")
    bars = html.count('<rect class="bar ')
    found = "no match" if "No message matches" in html else f"{rows} table rows"
    return f"{found}, {bars} bars, {len(body) / 1000:,.0f} kB"


async def run(data_dir: Path, filled: data.Filled, repeat: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    write_self_signed(cert, key, hostnames=["localhost", "127.0.0.1"])
    add_user(tmp / "users.json", USER, PASSWORD)
    token = base64.urlsafe_b64encode(random.randbytes(32)).decode()
    days = data.DAYS
    worst = 0.0
    async with await SqliteStore.open(data_dir) as store:
        app = make_reports_app(store=store, auth_middleware=None)
        install_auth(
            app, token=token, users=await UserDirectory.open(tmp / "users.json"), session_s=3600
        )
        install_dashboard(app)
        runner, port = await start_site(
            app, host="127.0.0.1", port=0, ssl_context=load_server_context(cert, key)
        )
        base = f"https://localhost:{port}"
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(cert)), limit=1)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                await log_in(session, base)
                deep = await older_link(session, base, "/messages", 20)
                cases: list[tuple[str, str, dict[str, str]]] = [
                    ("overview: 30 days", "/", {"since": days[300], "until": days[329]}),
                    ("overview: a year (366 bars)", "/", {"since": days[0], "until": days[365]}),
                    ("messages: first page", "/messages", {}),
                    ("messages: by sender", "/messages", {"sender": filled.busy_sender}),
                    ("messages: by sender domain", "/messages",
                     {"sender_domain": "domain7.example"}),
                    ("messages: by recipient", "/messages", {"recipient": filled.recipient}),
                    ("messages: search Message-ID", "/messages", {"q": filled.message_id}),
                    ("messages: opened", "/messages", {"opened": "true"}),
                    ("messages: not opened, a week", "/messages",
                     {"opened": "false", "since": days[100], "until": days[106]}),
                    ("messages: page 20 (Older)", deep, {}),
                    ("message page", f"/messages/{filled.opened_tracking_id}", {}),
                ]  # fmt: skip
                print(f"{'page':30} {'median':>8} {'p95':>8} {'max':>8}  shown", file=sys.stderr)
                for name, path, params in cases:
                    timing = await data.time_call(
                        session,
                        base + path,
                        params,
                        repeat=repeat,
                        name=name,
                        allow_redirects=False,
                        describe=describe_page,
                    )
                    worst = max(worst, timing.p95_ms)
                    print(
                        f"{name:30} {timing.median_ms:6.1f}ms {timing.p95_ms:6.1f}ms"
                        f" {timing.max_ms:6.1f}ms  {timing.detail}",
                        file=sys.stderr,
                    )
        finally:
            await runner.cleanup()
    verdict = "within" if worst < TARGET_MS else "OVER"
    print(f"worst p95 {worst:.1f} ms: {verdict} the {TARGET_MS:.0f} ms target", file=sys.stderr)
    return 0 if worst < TARGET_MS else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--opens", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=20, help="timed requests per page")
    parser.add_argument("--data-dir", type=Path, help="fill (or reuse) this data directory")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-dashboard-")) / "data"
    if (data_dir / DB_FILENAME).exists():
        filled = data.describe(data_dir)
    else:
        filled = data.fill(data_dir, messages=args.messages, opens=args.opens, seed=args.seed)
    return asyncio.run(run(data_dir, filled, args.repeat))


if __name__ == "__main__":
    sys.exit(main())
