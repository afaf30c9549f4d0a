"""Benchmark recording pixel opens in the store: the event writer's hot path.

Usage::

    python bench/events.py [--messages 3000] [--events 100000] [--batch 500] [--store DSN]

Fills a temporary store with ``--messages`` messages, then records
``--events`` opens on random known tokens in batches of ``--batch`` (what the
event writer hands the store under load), classified by the real
:class:`~smtp_tracker.classification.Classifier` with the packaged network
lists, and prints events/s and the time per batch.  The pixel endpoint can
record at most this many opens per second; beyond it its bounded queue drops
them (counted).  With ``--store postgresql://...`` the same on PostgreSQL
(an empty database: the store's tables are made there, and the rows written
stay); messages are recorded one transaction each on either backend.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_tracker.classification import Classifier, load_networks
from smtp_tracker.store import MessageRecord, OpenEvent, SqliteDatabase
from smtp_tracker.tokens import new_tracking_id

USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.4.0",
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "Mozilla/5.0",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)",
    "python-requests/2.31.0",
)


def open_database(store: str | None, data_dir: Path, classifier: Classifier) -> Any:
    """SQLite in *data_dir*, or the PostgreSQL store of *store*."""
    if store is None:
        return SqliteDatabase.open(data_dir, classifier=classifier)
    from smtp_tracker.store.postgresql import PgDatabase

    return PgDatabase.open(store, classifier=classifier)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--store", help="postgresql://USER@HOST:PORT/DBNAME (default: SQLite)")
    args = parser.parse_args()
    rng = random.Random(7)
    relayed = datetime.now(UTC) - timedelta(hours=1)
    with tempfile.TemporaryDirectory() as tmp:
        classifier = Classifier(load_networks(None), 30.0)
        with open_database(args.store, Path(tmp) / "data", classifier) as database:
            tokens = []
            for i in range(args.messages):
                tokens.append(new_tracking_id())
                database.record_message(
                    MessageRecord(
                        tracking_id=tokens[-1],
                        queue_id=f"Q{i}",
                        message_id=f"<m{i}@example.com>",
                        sender=f"news@sender{i % 20}.example",
                        recipients=[f"r{i}@example.net"],
                        size_bytes=1000,
                        received_at=relayed,
                        relayed_at=relayed,
                        upstream_reply="250 2.0.0 Ok",
                        tracked=True,
                    )
                )
            now = datetime.now(UTC)
            batches = [
                [
                    OpenEvent(
                        tracking_id=rng.choice(tokens),
                        at=now,
                        ip=f"198.51.{rng.randrange(256)}.{rng.randrange(256)}",
                        user_agent=rng.choice(USER_AGENTS),
                    )
                    for _ in range(args.batch)
                ]
                for _ in range(args.events // args.batch)
            ]
            timings = []
            started = time.perf_counter()
            for batch in batches:
                t0 = time.perf_counter()
                database.record_opens(batch)
                timings.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
    events = len(batches) * args.batch
    print(
        f"{'PostgreSQL' if args.store else 'SQLite'}: "
        f"{events:,} opens over {args.messages:,} messages in batches of {args.batch}:"
        f" {events / elapsed:,.0f} opens/s; per batch median"
        f" {statistics.median(timings) * 1000:.1f} ms,"
        f" p99 {statistics.quantiles(timings, n=100)[98] * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
