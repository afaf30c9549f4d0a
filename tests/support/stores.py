"""Test doubles of the tracking store."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from smtp_tracker.store import MessageRecord, OpenEvent, StoredMessage


class OpensOnlyStore:
    """A :class:`~smtp_tracker.store.Store` that only takes opens; subclasses say how.

    Everything else raises, so a test notices when the code under test reaches for it.
    """

    async def record_opens(self, hits: Sequence[OpenEvent]) -> int:
        raise NotImplementedError

    async def record_message(self, record: MessageRecord) -> None:
        raise NotImplementedError

    async def find_message(self, ident: str) -> StoredMessage | None:
        raise NotImplementedError

    async def list_messages(
        self, *, since: datetime | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        raise NotImplementedError

    async def is_known_token(self, tracking_id: str) -> bool:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass
