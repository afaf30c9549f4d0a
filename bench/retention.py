"""The automatic prune against the relay's writes: throughput and what the relay waits.

Run: ``python bench/retention.py [--messages N] [--opens K] [--batch-rows B]``
(default 50,000 messages, 2 opens each, batches of 5,000)

Builds a store of N messages (relayed over the last 800 days, each with K
opens and two recipients) in a temporary data directory, then prunes the
older half through :meth:`SqliteStore.prune` (batches on the writer thread,
as ``serve`` does) while a stand-in for the relay records one new message
every 2 ms.  Reported: rows deleted per second, and the median, p99 and
maximum time one ``record_message`` took while the prune ran, beside the
same without a prune.  With ``--batch-rows`` the effect of the batch size on
the relay's waits shows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_tracker.store import MessageRecord, SqliteDatabase, SqliteStore
from smtp_tracker.store.records import OpenEvent
from smtp_tracker.store.retention import DEFAULT_BATCH_ROWS
from smtp_tracker.tokens import new_tracking_id

NOW = datetime.now(UTC)


def record(i: int, at: datetime) -> MessageRecord:
    return MessageRecord(
        tracking_id=new_tracking_id(),
        queue_id=f"{i:012X}",
        message_id=f"<bench{i}@example.org>",
        sender="news@example.org",
        recipients=[f"reader{i}@example.net", f"other{i}@example.com"],
        size_bytes=20_000,
        received_at=at,
        relayed_at=at,
        upstream_reply="250 2.0.0 Ok",
        tracked=True,
    )


def build(data_dir: Path, messages: int, opens: int) -> None:
    with SqliteDatabase.open(data_dir) as database:
        step = timedelta(days=800) / messages
        for start in range(0, messages, 5000):
            records = [
                record(i, NOW - step * (messages - i))
                for i in range(start, min(start + 5000, messages))
            ]
            for item in records:
                database.record_message(item)
            database.record_opens(
                [
                    OpenEvent(
                        tracking_id=r.tracking_id,
                        at=r.relayed_at,
                        ip="192.0.2.1",
                        user_agent="UA",
                    )
                    for r in records
                    for _ in range(opens)
                ]
            )


async def relay_writes(store: SqliteStore, stop: asyncio.Event, first: int) -> list[float]:
    waits: list[float] = []
    i = first
    while not stop.is_set():
        started = time.perf_counter()
        await store.record_message(record(i, datetime.now(UTC)))
        waits.append(time.perf_counter() - started)
        i += 1
        await asyncio.sleep(0.002)
    return waits


def describe(name: str, waits: list[float]) -> str:
    ordered = sorted(waits)
    p99 = ordered[int(len(ordered) * 0.99) - 1] if len(ordered) >= 100 else ordered[-1]
    return (
        f"{name}: {len(waits)} writes, median {statistics.median(waits) * 1000:.2f} ms, "
        f"p99 {p99 * 1000:.2f} ms, max {ordered[-1] * 1000:.2f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--opens", type=int, default=2)
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        started = time.perf_counter()
        build(data_dir, args.messages, args.opens)
        print(
            f"built {args.messages} messages, {args.messages * args.opens} opens "
            f"in {time.perf_counter() - started:.1f} s"
        )
        async with await SqliteStore.open(data_dir) as store:
            stop = asyncio.Event()
            baseline = asyncio.create_task(relay_writes(store, stop, 10_000_000))
            await asyncio.sleep(2)
            stop.set()
            print(describe("relay writes, no prune", await baseline))

            stop = asyncio.Event()
            writes = asyncio.create_task(relay_writes(store, stop, 20_000_000))
            started = time.perf_counter()
            removed = await store.prune(NOW - timedelta(days=400), batch_rows=args.batch_rows)
            elapsed = time.perf_counter() - started
            stop.set()
            rows = sum(removed.counts().values())
            print(
                f"pruned {removed.messages} messages ({rows} rows) in {elapsed:.2f} s: "
                f"{rows / elapsed:,.0f} rows/s, batch_rows={args.batch_rows}"
            )
            print(describe("relay writes during the prune", await writes))


if __name__ == "__main__":
    asyncio.run(main())
