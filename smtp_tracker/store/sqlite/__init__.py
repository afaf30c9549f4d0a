"""The SQLite backend of the tracking store: ``DATA_DIR/tracker.sqlite3``.

The relay and the pixel endpoint may be one process or two processes on the
same host sharing the data directory (WAL mode; a local file system, not
NFS).  Its modules, one job each:

* :mod:`.connection`: the data directory and database file (private modes),
  the connection (WAL, busy timeout, migrations), snapshot reads;
* :mod:`.recording`: the write path: messages, opens and clicks with their
  counters and rollups, the webhook outbox hook;
* :mod:`.reading`: the read path: messages with their events, links, the reports;
* :mod:`.maintenance`: retention, forgetting a recipient, reclassification;
* :mod:`.database`: :class:`SqliteDatabase`, the blocking store made of the
  three above, one connection for one thread at a time (the CLI's);
* :mod:`.health`: suspension at start and health checks;
* :mod:`.store`: :class:`SqliteStore`, the async :class:`.base.Store`
  over two of them, a writer thread and a reader thread.
"""

from smtp_tracker.store.sqlite.database import SqliteDatabase
from smtp_tracker.store.sqlite.health import DEFAULT_HEALTH_INTERVAL_S, StoreCounters
from smtp_tracker.store.sqlite.recording import OutboxHook
from smtp_tracker.store.sqlite.store import SqliteStore

__all__ = [
    "DEFAULT_HEALTH_INTERVAL_S",
    "OutboxHook",
    "SqliteDatabase",
    "SqliteStore",
    "StoreCounters",
]
