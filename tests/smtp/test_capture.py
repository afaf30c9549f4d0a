"""Debug capture files: per transaction, AUTH redacted, mode 0600, "errors" keeps failures."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.smtp.test_relay import MESSAGE, command, send


def captured(data_dir: Path) -> dict[str, dict[str, Path]]:
    """{queue id: {"session.log": path, ...}} of every capture file."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted((data_dir / "capture").glob("*/*")):
        queue_id, _, kind = path.name.partition(".")
        found.setdefault(queue_id, {})[kind] = path
    return found


async def connect(app: Any) -> aiosmtplib.SMTP:
    host, port = app.smtp_address
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20)
    await smtp.connect()
    await smtp.ehlo(hostname="postfix.test")
    return smtp


async def test_capture_all_writes_three_private_files_per_transaction(
    relay_factory: Any, upstream: Any, tmp_path: Path
) -> None:
    app = await relay_factory(capture="all")
    smtp = await connect(app)
    assert [r.code for r in await send(smtp, "alice@example.org", ["bob@example.net"])] == [250] * 3
    assert [r.code for r in await send(smtp, "carol@example.org", ["dan@example.net"])] == [250] * 3
    await smtp.quit()
    await app.capture.drain()

    files = captured(tmp_path / "data")
    assert len(files) == 2
    for kinds in files.values():
        assert set(kinds) == {"session.log", "downstream.eml", "upstream.eml"}
        for path in kinds.values():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "data" / "capture").stat().st_mode) == 0o700
    # the first transaction's log also holds the session's start (EHLO, STARTTLS, AUTH)
    (first,) = [k for k in files.values() if "C> MAIL FROM:<alice@" in k["session.log"].read_text()]
    log = first["session.log"].read_text()
    # both sides, the AUTH exchange redacted, the password nowhere
    assert "C> MAIL FROM:<" in log and "U> MAIL FROM:<" in log
    assert "U> AUTH <redacted>" in log
    assert upstream.password not in log
    downstream = [k["downstream.eml"].read_bytes() for k in files.values()]
    upstream_sent = [k["upstream.eml"].read_bytes() for k in files.values()]
    assert downstream == [MESSAGE, MESSAGE]
    assert all(sent.startswith(b"Received: ") and sent.endswith(MESSAGE) for sent in upstream_sent)
    assert sorted(upstream_sent) == sorted(t.data for t in upstream.transactions)


@pytest.mark.upstream(rcpt_replies={"nobody@example.net": "550 5.1.1 no such user"})
async def test_capture_errors_keeps_only_transactions_not_ending_2xx(
    relay_factory: Any, tmp_path: Path
) -> None:
    app = await relay_factory(capture="errors")
    smtp = await connect(app)
    assert [r.code for r in await send(smtp, "alice@example.org", ["bob@example.net"])] == [250] * 3
    assert (await command(smtp, "MAIL", "FROM:<alice@example.org>")).code == 250
    assert (await command(smtp, "RCPT", "TO:<nobody@example.net>")).code == 550
    assert (await command(smtp, "RSET")).code == 250
    await smtp.quit()
    await app.capture.drain()

    files = captured(tmp_path / "data")
    assert len(files) == 1
    (kinds,) = files.values()
    assert set(kinds) == {"session.log"}
    assert "550 5.1.1 no such user" in kinds["session.log"].read_text()


async def test_capture_off_writes_nothing(relay_factory: Any, tmp_path: Path) -> None:
    app = await relay_factory(capture="off")
    smtp = await connect(app)
    await send(smtp, "alice@example.org", ["bob@example.net"])
    await smtp.quit()
    await app.capture.drain()
    assert captured(tmp_path / "data") == {}


def test_writing_captures_from_many_threads_never_touches_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The umask is process-wide: a thread changing it races every other thread.

    Saving and restoring it around a mkdir in two threads at once can leave
    the process at 077 for good (seen: a later Postfix queue directory and the
    events log were created unreadable to their users).  So write_capture must
    not call os.umask at all, and its directory and files are private anyway,
    even under a permissive umask.
    """
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime

    from smtp_tracker.smtp.capture import Capture, write_capture

    calls: list[int] = []
    real_umask = os.umask
    old = real_umask(0)  # permissive: the modes must come from the code
    try:
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0)
        root = tmp_path / "capture"
        at = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
        captures = [Capture(f"Q{i:04d}", at, ["line"], b"down", b"up") for i in range(200)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            days = set(pool.map(lambda c: write_capture(root, c), captures))
    finally:
        monkeypatch.undo()
        real_umask(old)
    assert calls == []
    (day,) = days
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(day.stat().st_mode) == 0o700
    files = sorted(day.iterdir())
    assert len(files) == 600
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
