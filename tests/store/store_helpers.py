"""Helpers for the tracking store tests: deterministic tokens and records."""

from __future__ import annotations

import base64
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from smtp_tracker.store import DB_FILENAME, MessageRecord, SqliteDatabase

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def token(i: int) -> str:
    """A well-formed, deterministic tracking id for test message *i*."""
    return base64.urlsafe_b64encode(i.to_bytes(17, "big")).rstrip(b"=").decode()


def make_record(i: int = 0, **overrides: Any) -> MessageRecord:
    """Message record *i*, relayed *i* minutes after :data:`T0`."""
    at = T0 + timedelta(minutes=i)
    fields: dict[str, Any] = {
        "tracking_id": token(i),
        "queue_id": f"Q{i:05d}",
        "message_id": f"<msg{i}@example.com>",
        "sender": "alice@example.com",
        "recipients": ["bob@example.net", "carol@example.org"],
        "size_bytes": 1000 + i,
        "received_at": at - timedelta(seconds=1),
        "relayed_at": at,
        "upstream_reply": f"2.0.0 Ok: queued as UP{i}",
        "tracked": True,
        "not_tracked_reason": None,
        "subject": f"Hello {i}",
    }
    fields.update(overrides)
    return MessageRecord(**fields)


#: What a stray write puts over a header.
GARBAGE = b"\xde\xad\xbe\xef" * 8


def build_store(data_dir: Path, *, messages: int = 200, keep_wal: bool = False) -> None:
    """A store of *messages* records; with *keep_wal*, the last ones only in its WAL.

    The files are copied while the writer is still open (a closed connection
    checkpoints and removes its log), so the copy has a ``-wal`` holding them.
    """
    source = data_dir.parent / f"{data_dir.name}-source"
    db = SqliteDatabase.open(source)
    try:
        for i in range(1, messages + 1):
            db.record_message(make_record(i))
            if keep_wal and i == messages // 2:
                db._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if not keep_wal:
            db._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data_dir.mkdir(mode=0o700)
        for name in (DB_FILENAME, DB_FILENAME + "-wal"):
            if (source / name).is_file() and (source / name).stat().st_size:
                shutil.copyfile(source / name, data_dir / name)
    finally:
        db.close()


def overwrite(path: Path, offset: int, data: bytes = GARBAGE) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)
