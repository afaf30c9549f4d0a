"""The PostgreSQL backend of the tracking store (``store = "postgresql://user@host/db"``).

For several relays and pixel endpoints on several hosts sharing one store
(issue 14).  psycopg 3 with a bounded :class:`psycopg_pool.ConnectionPool`;
each call borrows a connection in one of as many worker threads as the pool
has connections, so the report queries of :mod:`.queries` are the very
functions SQLite runs (the dialect differences live in :class:`PgConnection`:
``?`` placeholders become ``%s``).

Its modules, one job each:

* :mod:`.connection`: the DSN (never with a password), connecting, the shared
  queries' dialect (:class:`PgConnection`), snapshot reads;
* :mod:`.migration`: the schema's version, creating and migrating it;
* :mod:`.check`: ``smtp-tracker store check`` (:func:`check_server`);
* :mod:`.recording`: the write path, safe beside other writers (row locks,
  atomic rollup upserts);
* :mod:`.reading`: the read path: messages with their events, links, the reports;
* :mod:`.maintenance`: retention, forgetting a recipient, reclassification;
* :mod:`.database`: :class:`PgDatabase`, the blocking store made of the three
  above, on one connection;
* :mod:`.outage`: a server that does not answer: logged once, failed fast;
* :mod:`.store`: :class:`PostgresStore`, the async store over a bounded pool.
"""

from smtp_tracker.store.postgresql.check import ServerCheck, check_server
from smtp_tracker.store.postgresql.connection import PgConnection, is_dsn, redacted
from smtp_tracker.store.postgresql.database import PgDatabase
from smtp_tracker.store.postgresql.migration import schema_version
from smtp_tracker.store.postgresql.outage import StoreUnavailableError
from smtp_tracker.store.postgresql.store import PostgresStore

__all__ = [
    "PgConnection",
    "PgDatabase",
    "PostgresStore",
    "ServerCheck",
    "StoreUnavailableError",
    "check_server",
    "is_dsn",
    "redacted",
    "schema_version",
]
