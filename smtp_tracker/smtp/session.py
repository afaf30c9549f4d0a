"""What one downstream connection carries: its session, and the mail transaction in it.

:class:`RelaySession` is aiosmtpd's per-connection ``Session`` plus the relay's
state (the upstream connection, the open transaction, the transcript);
:class:`Transaction` is one SMTP mail transaction (RFC 5321 §3.3): MAIL,
RCPTs, DATA, as we relay it.  Both the protocol (:mod:`.server`) and the
handler (:mod:`.handler`) use them; neither module imports the other for them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiosmtpd.smtp import Session

from smtp_tracker.errors import UpstreamError
from smtp_tracker.smtp.fanout import Fanout
from smtp_tracker.smtp.replies import Reply
from smtp_tracker.smtp.transcript import Transcript

__all__ = ["Recipient", "RelaySession", "Transaction", "new_queue_id"]


def new_queue_id() -> str:
    """A queue id in Postfix's short form: 12 upper-case hex digits, unique enough per host.

    It names the transaction in our logs, the ``Received:`` header and capture
    files; it is not Postfix's queue id (that one is in Postfix's log).
    """
    return secrets.token_hex(6).upper()


@dataclass(slots=True)
class Recipient:
    """A forward-path the upstream answered, with the parameters sent and its reply."""

    address: str
    parameters: tuple[str, ...]
    reply: Reply


@dataclass(slots=True)
class Transaction:
    """The state of one transaction between MAIL and the end of DATA (or RSET).

    :ivar broken: set when the upstream connection failed mid-transaction;
        every later command of the transaction gets its 4xx reply.
    :ivar ended: set by the relay handler when it counted the end (DATA reply,
        RSET, drop, shutdown); a second end of the same transaction is ignored.
    """

    reverse_path: str
    parameters: tuple[str, ...]
    smtputf8: bool
    queue_id: str = field(default_factory=new_queue_id)
    started: float = field(default_factory=time.monotonic)
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    accepted: list[Recipient] = field(default_factory=list)
    refused: list[Recipient] = field(default_factory=list)
    broken: UpstreamError | None = None
    ended: bool = False

    @property
    def delay_s(self) -> float:
        """Seconds since MAIL FROM."""
        return time.monotonic() - self.started


class RelaySession(Session):
    """aiosmtpd's Session plus the relay's state for one connection.

    :ivar upstream: the upstream connections (the upstream and the copies), made at
        the first MAIL (None before).
    :ivar pool: LMTP only: the connections the recipients' copies are relayed on,
        up to ``lmtp_parallel_copies``, kept for the session's next transaction.
    :ivar transaction: the transaction between an accepted MAIL and its end, or None.
    :ivar transcript: the conversation, kept when capture is on.
    :ivar transactions: transactions ended with a reply to DATA in this session.
    :ivar recording: the record of the last relayed message while it is written to
        the store, after its reply; the session's next command waits for it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.upstream: Fanout | None = None
        self.pool: list[Fanout] = []
        self.transaction: Transaction | None = None
        self.transcript: Transcript | None = None
        self.transactions = 0
        self.recording: asyncio.Future[None] | None = None
