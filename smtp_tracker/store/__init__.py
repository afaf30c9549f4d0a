"""The tracking store: message records and pixel opens, kept in the data directory.

:class:`Store` is the interface; :class:`SqliteStore` the SQLite backend
(``DATA_DIR/tracker.sqlite3``), with :class:`SqliteDatabase` as its blocking
core for synchronous callers.
"""

from smtp_tracker.store.address import IP_POLICIES, AddressPolicy, IpPolicy
from smtp_tracker.store.base import Store
from smtp_tracker.store.export import format_time, message_to_dict
from smtp_tracker.store.integrity import DB_FILENAME
from smtp_tracker.store.migrations import CURRENT_VERSION
from smtp_tracker.store.records import (
    COUNTED_VERDICTS,
    USER_AGENT_MAX_CHARS,
    VERDICTS,
    ClickEvent,
    EventClassifier,
    EventContext,
    LinkRecord,
    MessageRecord,
    OpenEvent,
    StoredMessage,
    Verdict,
)
from smtp_tracker.store.sqlite import SqliteDatabase, SqliteStore

__all__ = [
    "COUNTED_VERDICTS",
    "CURRENT_VERSION",
    "DB_FILENAME",
    "IP_POLICIES",
    "USER_AGENT_MAX_CHARS",
    "VERDICTS",
    "AddressPolicy",
    "ClickEvent",
    "EventClassifier",
    "EventContext",
    "IpPolicy",
    "LinkRecord",
    "MessageRecord",
    "OpenEvent",
    "SqliteDatabase",
    "SqliteStore",
    "Store",
    "StoredMessage",
    "Verdict",
    "format_time",
    "message_to_dict",
]
