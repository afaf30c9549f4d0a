"""The data directory's file system fails under a running relay: mail still flows.

Two real faults, each on a file system of its own mounted under the test's
directory (the tests run as root, which ignores permission bits, so
``chmod`` proves nothing):

* **read-only**: an ext4 image on a loop device mounted ``errors=remount-ro``;
  the kernel is told of a file-system error (``/sys/fs/ext4/DEV/trigger_fs_error``)
  and makes it read-only under the open database, as it does on a real disk
  error. (``mount -o remount,ro`` cannot: it refuses while SQLite holds the
  file open for writing.)
* **full**: a 4 MiB tmpfs filled to the last byte.

Either way: the client still gets the upstream's own 250 and the upstream the
message (tracking fails open); the record that fails is counted
(``record_failed``) and logged once with its queue id; the pixel endpoint still
serves the GIF and counts the opens it could not write (``failed``); nothing
crashes and the relay stops cleanly.

A store damaged before the start (headers of the database file, of its
write-ahead log, or both, overwritten) no longer stops ``serve``: it starts
with records suspended, relays (the upstream's own 250), says ``degraded:
store`` on ``/healthz`` and counts what it could not record; the damaged files
are left as they were for ``smtp-tracker store recover``.  Headers overwritten
under a running relay are found by the store's periodic check.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from smtp_tracker.store import DB_FILENAME
from tests.store.store_helpers import build_store, overwrite
from tests.support.relay import tracking_over_tls
from tests.support.upstream import UpstreamServer
from tests.support.waiting import wait_until

PIXEL = re.compile(rb"https://localhost:\d+/o/([A-Za-z0-9_-]{23})\.gif")
QUEUE_ID = re.compile(rb"with ESMTP id ([0-9A-F]{12})")

#: The fault, applied to a mounted file system.
Fault = Callable[[], Awaitable[None]]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def unmount(directory: Path) -> None:
    if run("umount", str(directory)).returncode != 0:
        run("umount", "-l", str(directory))  # still busy: detach it now, free it later


@pytest.fixture
def mount_point(tmp_path: Path) -> Path:
    directory = tmp_path / "mnt"
    directory.mkdir()
    return directory


@pytest.fixture
async def read_only_fault(mount_point: Path, tmp_path: Path) -> AsyncIterator[Fault]:
    """ext4 on a loop device; the fault makes the kernel turn it read-only."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
    image = tmp_path / "ext4.img"
    with image.open("wb") as handle:
        handle.truncate(32 * 1024 * 1024)
    made = run("mkfs.ext4", "-q", "-F", str(image))
    assert made.returncode == 0, made.stderr
    mounted = run("mount", "-o", "loop,errors=remount-ro", str(image), str(mount_point))
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {mounted.stderr.strip()}")
    device = run("findmnt", "-n", "-o", "SOURCE", str(mount_point)).stdout.strip()
    trigger = Path("/sys/fs/ext4", Path(device).name, "trigger_fs_error")

    async def fault() -> None:
        await asyncio.to_thread(trigger.write_text, "smtp-tracker test\n")
        options = run("findmnt", "-n", "-o", "OPTIONS", str(mount_point)).stdout
        assert "ro" in options.split(",") or "emergency_ro" in options, options

    try:
        if not trigger.exists():
            pytest.skip(f"{trigger} is missing: this kernel cannot simulate an ext4 error")
        yield fault
    finally:
        unmount(mount_point)


@pytest.fixture
async def full_fault(mount_point: Path) -> AsyncIterator[Fault]:
    """A 4 MiB tmpfs; the fault fills it."""
    mounted = run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def fill() -> None:
        fd = os.open(mount_point / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (65536, 4096, 1):  # to the last byte
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
        finally:
            os.close(fd)

    async def fault() -> None:
        await asyncio.to_thread(fill)

    try:
        yield fault
    finally:
        unmount(mount_point)


@pytest.fixture(params=["read-only", "full"])
def fault(request: pytest.FixtureRequest) -> Fault:
    name = {"read-only": "read_only_fault", "full": "full_fault"}[request.param]
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def html_message(number: int) -> bytes:
    return (
        "From: alice@example.org\r\nTo: bob@example.net\r\n"
        f"Subject: degraded {number}\r\nMessage-ID: <degraded-{number}@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"<html><body><p>message {number}</p></body></html>\r\n"
    ).encode()


async def relay_one(
    app: Any, upstream: UpstreamServer, number: int, *, tracked: bool = True
) -> tuple[str, str]:
    """Send one HTML message; return (its queue id with us, its tracking id, or "" when
    it must arrive *tracked* false: without a pixel)."""
    host, port = app.smtp_address
    errors, reply = await aiosmtplib.send(
        html_message(number),
        sender="alice@example.org",
        recipients=["bob@example.net"],
        hostname=host,
        port=port,
        start_tls=False,
        timeout=30,
    )
    assert errors == {}
    (delivered,) = [
        t for t in await upstream.wait_for_transactions(number) if b"degraded %d" % number in t.data
    ]
    assert reply == f"2.0.0 Ok: queued as {delivered.queue_id}"  # the upstream's own 250
    queue_id = QUEUE_ID.search(delivered.data)
    tracking_id = PIXEL.search(delivered.data)
    assert queue_id is not None and (tracking_id is not None) == tracked, delivered.data
    return queue_id.group(1).decode(), tracking_id.group(1).decode() if tracking_id else ""


async def fetch_pixel(app: Any, tracking_id: str, context: ssl.SSLContext) -> None:
    url = f"https://localhost:{app.pixel_port}/o/{tracking_id}.gif"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=context, headers={"User-Agent": "reader/1.0"}) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/gif"
        assert len(await response.read()) == 43


async def test_mail_relays_and_tracking_degrades_when_the_data_disk_fails(
    fault: Fault,
    mount_point: Path,
    relay_factory: Any,
    upstream: UpstreamServer,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = await relay_factory(
        data_dir=str(mount_point / "data"),
        **tracking_over_tls(cert_pem_path, key_pem_path),
    )
    assert app.tracker is not None and app.store is not None
    _, before = await relay_one(app, upstream, 1)
    assert await app.store.find_message(before) is not None
    await fetch_pixel(app, before, client_ssl_context)
    await wait_until(
        lambda: app.pixel_counters["recorded"] == 1, timeout_s=10, message="open not recorded"
    )

    await fault()
    caplog.set_level(logging.WARNING)
    caplog.clear()
    queue_ids = []
    for number in (2, 3):
        queue_id, _ = await relay_one(app, upstream, number)
        queue_ids.append(queue_id)
    assert app.tracker.counters.record_failed == 2
    for queue_id in queue_ids:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(queue_id)]
        assert len(lines) == 1, lines
        assert "relayed, but not recorded in the store" in lines[0], lines
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"

    await fetch_pixel(app, before, client_ssl_context)  # still the GIF, the open is lost
    await wait_until(
        lambda: app.pixel_counters["failed"] == 1,
        timeout_s=10,
        message=f"the lost open was not counted: {app.pixel_counters}",
    )
    assert app.pixel_counters["recorded"] == 1
    assert len(upstream.transactions) == 3


# -- a store damaged before the start (issue 12, item 8) ----------------------------------


def damage(data_dir: Path, where: str) -> None:
    """A store of 20 messages, its last ones in the WAL, with headers overwritten."""
    build_store(data_dir, messages=20, keep_wal=True)
    if where in ("main", "main-and-wal"):
        overwrite(data_dir / DB_FILENAME, 0)
    if where in ("wal", "main-and-wal"):
        overwrite(data_dir / (DB_FILENAME + "-wal"), 0)


async def healthz(app: Any, context: ssl.SSLContext) -> str:
    url = f"https://localhost:{app.pixel_port}/healthz"
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as response:
        assert response.status == 200  # the GIFs are still served: stay in rotation
        return await response.text()


@pytest.mark.parametrize("where", ["main", "wal", "main-and-wal"])
async def test_a_corrupt_store_at_start_suspends_tracking_and_mail_still_relays(
    where: str,
    tmp_path: Path,
    relay_factory: Any,
    upstream: UpstreamServer,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data_dir = tmp_path / "damaged"
    damage(data_dir, where)
    damaged = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    app = await relay_factory(
        data_dir=str(data_dir), **tracking_over_tls(cert_pem_path, key_pem_path)
    )  # used to be StartupError: "database disk image is malformed", exit 1
    assert app.tracker is not None and app.store is not None
    assert app.store.suspended is not None
    assert "TRACKING SUSPENDED" in caplog.text
    # the consent registry cannot be read either: lawful by default, relayed untracked
    # (issue 20: not knowing whether the recipient objected must not track them)
    await relay_one(app, upstream, 1, tracked=False)  # the upstream's own 250
    assert app.tracker.not_tracked_reasons["consent-unavailable"] == 1
    assert app.tracker.counters.record_failed == 1
    assert await healthz(app, client_ssl_context) == "degraded: store"
    tracking_id = "A" * 23  # an old message's pixel: the GIF all the same
    await fetch_pixel(app, tracking_id, client_ssl_context)
    await wait_until(
        lambda: app.pixel_counters["failed"] == 1, timeout_s=10, message="the open not counted"
    )
    assert app.store.counters.suspended_calls >= 2  # the record and the open
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"
    await app.stop(grace_s=1.0)
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == damaged  # left for recovery


async def test_headers_overwritten_under_a_running_relay_are_reported(
    tmp_path: Path,
    relay_factory: Any,
    upstream: UpstreamServer,
    cert_pem_path: Path,
    key_pem_path: Path,
    client_ssl_context: ssl.SSLContext,
) -> None:
    data_dir = tmp_path / "data"
    app = await relay_factory(
        data_dir=str(data_dir), **tracking_over_tls(cert_pem_path, key_pem_path)
    )
    assert app.store is not None
    await relay_one(app, upstream, 1)
    assert await app.store.check_health() is None
    assert await healthz(app, client_ssl_context) == "ok"
    overwrite(data_dir / DB_FILENAME, 0)
    overwrite(data_dir / (DB_FILENAME + "-wal"), 0)
    await relay_one(app, upstream, 2)  # "recorded": the writer reads on through the headers
    assert await app.store.check_health() is not None  # the periodic check, run now
    assert await healthz(app, client_ssl_context) == "degraded: store"
    assert app.store.counters.health_failures == 1
    await relay_one(app, upstream, 3)  # mail goes on
