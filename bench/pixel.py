"""Benchmark the HTTPS pixel endpoint against nginx serving a static GIF.

Usage::

    python bench/pixel.py [--duration 10] [--connections 50] [--threads 2]
                          [--tokens 3000] [--nginx-workers 1]

Starts the pixel endpoint (HTTPS, self-signed certificate, a fresh data
directory in a temporary directory holding ``--tokens`` known messages) on a
loopback port and drives it with ``wrk`` (Debian package ``wrk``) using a Lua
script that picks a random known token per request.  Then starts nginx
(Debian ``nginx-light``) in the foreground with a temporary configuration,
HTTPS with the same certificate, serving one static 43-byte GIF for the same
URLs with the same cache headers, and measures it the same way.  Prints
requests/s and latency percentiles side by side, and how many opens the store
recorded against the requests wrk completed (the difference is events dropped
at the full queue, or requests still in flight when wrk stopped).

Loopback only.  Both servers share the machine with wrk; numbers are for
comparison on this host, not absolute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sqlite3
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from smtp_tracker.store import DB_FILENAME, MessageRecord, SqliteDatabase, SqliteStore
from smtp_tracker.store.writer import EventWriter
from smtp_tracker.tls import load_server_context, write_self_signed
from smtp_tracker.tokens import new_tracking_id
from smtp_tracker.web import TRANSPARENT_GIF, WRITER_KEY, make_pixel_app, start_site

LUA_TEMPLATE = """
tokens = {%(tokens)s}
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/o/" .. tokens[math.random(#tokens)] .. ".gif")
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%d %%d %%d\\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.timeout, e.status))
end
"""

NGINX_CONF = """
daemon off;
master_process on;
worker_processes %(workers)d;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    server_tokens off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:%(port)d ssl;
        ssl_certificate %(cert)s;
        ssl_certificate_key %(key)s;
        root %(dir)s/www;
        etag off;
        if_modified_since off;
        location ~ "^/o/[A-Za-z0-9_-]+\\.gif$" {
            default_type image/gif;
            add_header Cache-Control "no-store, no-cache, must-revalidate, private" always;
            add_header Pragma "no-cache" always;
            add_header Expires "0" always;
            try_files /pixel.gif =404;
        }
        location / { return 404; }
    }
}
"""


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: str

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            return


async def check_serves_gif(port: int, cert: Path) -> None:
    """One request before measuring: the server answers the GIF with the pixel headers."""
    context = ssl.create_default_context(cafile=str(cert))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.get(f"https://localhost:{port}/o/{new_tracking_id()}.gif") as response,
    ):
        body = await response.read()
        cache = response.headers.get("Cache-Control", "")
        if response.status != 200 or body != TRANSPARENT_GIF or "no-store" not in cache:
            raise RuntimeError(f"127.0.0.1:{port} does not serve the pixel: {response.status}")


async def run_wrk(args: argparse.Namespace, port: int, lua: Path) -> WrkResult:
    proc = await asyncio.create_subprocess_exec(
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "-s",
        str(lua),
        f"https://127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed:\n{text}")
    req, dur_us, p50, p99, mx, e_conn, e_read, e_timeout, e_status = map(int, line.split()[1:])
    return WrkResult(
        requests=req,
        duration_s=dur_us / 1e6,
        p50_ms=p50 / 1000,
        p99_ms=p99 / 1000,
        max_ms=mx / 1000,
        errors=f"connect {e_conn}, read {e_read}, timeout {e_timeout}, non-2xx {e_status}",
    )


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, Path, Path, int]:
    """Certificate, data directory with known tokens, Lua script and nginx tree (blocking)."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    write_self_signed(cert, key, hostnames=["localhost", "127.0.0.1"])
    data_dir = tmp / "data"
    now = datetime.now(UTC)
    tokens = [new_tracking_id() for _ in range(args.tokens)]
    with SqliteDatabase.open(data_dir) as db:
        for i, tid in enumerate(tokens):
            db.record_message(
                MessageRecord(
                    tracking_id=tid,
                    queue_id=f"Q{i}",
                    message_id=f"<{i}@bench.example>",
                    sender="bench@example.com",
                    recipients=["reader@example.net"],
                    size_bytes=2000,
                    received_at=now,
                    relayed_at=now,
                    upstream_reply="250 2.0.0 Ok",
                    tracked=True,
                )
            )
    lua = tmp / "pick-token.lua"
    lua.write_text(LUA_TEMPLATE % {"tokens": ",".join(f'"{t}"' for t in tokens)})

    ndir = tmp / "nginx"
    (ndir / "www").mkdir(parents=True)
    (ndir / "www" / "pixel.gif").write_bytes(TRANSPARENT_GIF)
    # nginx workers run as nobody when the master is root: they must reach www/
    for path in (tmp, ndir, ndir / "www"):
        path.chmod(0o755)  # a public GIF; data dir and key files stay private
    nginx_port = free_port()
    (ndir / "nginx.conf").write_text(
        NGINX_CONF
        % {
            "workers": args.nginx_workers,
            "dir": ndir,
            "port": nginx_port,
            "cert": cert,
            "key": key,
        }
    )
    return cert, key, data_dir, lua, nginx_port


async def bench_pixel(
    args: argparse.Namespace, cert: Path, key: Path, data_dir: Path, lua: Path
) -> tuple[WrkResult, EventWriter]:
    store = await SqliteStore.open(data_dir)
    app = make_pixel_app(store=store)
    runner, port = await start_site(
        app, host="127.0.0.1", port=0, ssl_context=load_server_context(cert, key)
    )
    try:
        await check_serves_gif(port, cert)
        result = await run_wrk(args, port, lua)
    finally:
        await runner.cleanup()  # flushes the event writer
        await store.aclose()
    return result, app[WRITER_KEY]


async def bench_nginx(
    args: argparse.Namespace, ndir: Path, port: int, lua: Path, cert: Path
) -> WrkResult:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = await asyncio.create_subprocess_exec(
        nginx, "-e", "stderr", "-p", str(ndir), "-c", str(ndir / "nginx.conf")
    )
    try:
        await wait_for_port(port)
        await check_serves_gif(port, cert)
        return await run_wrk(args, port, lua)
    finally:
        proc.terminate()  # SIGTERM: fast shutdown of master and workers
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def count_opens(data_dir: Path) -> int:
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    try:
        return int(conn.execute("SELECT count(*) FROM opens").fetchone()[0])
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=3000, help="known tokens")
    parser.add_argument("--nginx-workers", type=int, default=1)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="smtp-tracker-bench-") as name:
        tmp = Path(name)
        cert, key, data_dir, lua, nginx_port = prepare(args, tmp)
        pixel, writer = asyncio.run(bench_pixel(args, cert, key, data_dir, lua))
        stored = count_opens(data_dir)
        static = asyncio.run(bench_nginx(args, tmp / "nginx", nginx_port, lua, cert))

    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, HTTPS on loopback,"
        f" {os.cpu_count()} CPUs, random known token per request ({args.tokens} tokens)"
    )
    nginx_label = f"nginx static ({args.nginx_workers}w)"
    print(f"{'':20}{'smtp-tracker pixel':>22}{nginx_label:>22}")
    rows = [
        ("requests/s", f"{pixel.rps:,.0f}", f"{static.rps:,.0f}"),
        ("latency p50 (ms)", f"{pixel.p50_ms:.2f}", f"{static.p50_ms:.2f}"),
        ("latency p99 (ms)", f"{pixel.p99_ms:.2f}", f"{static.p99_ms:.2f}"),
        ("latency max (ms)", f"{pixel.max_ms:.2f}", f"{static.max_ms:.2f}"),
        ("requests", f"{pixel.requests:,}", f"{static.requests:,}"),
    ]
    for label, a, b in rows:
        print(f"{label:20}{a:>22}{b:>22}")
    print(f"errors: pixel: {pixel.errors}; nginx: {static.errors}")
    print(
        f"opens: wrk completed {pixel.requests:,} requests; the endpoint offered"
        f" {writer.offered:,}, recorded {writer.recorded:,}, dropped {writer.dropped:,}"
        f" (queue full), unknown {writer.unknown:,}, failed {writer.failed:,};"
        f" rows in opens: {stored:,}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
