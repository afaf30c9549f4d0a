"""The records the tracking store keeps, as plain frozen dataclasses.

All datetimes are timezone-aware and in UTC: the store converts aware
datetimes to UTC when it writes them and rejects naive ones
(:class:`ValueError`), so a record read back always carries ``tzinfo=UTC``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal, NamedTuple

from smtp_tracker.tokens import LinkRecord

__all__ = [
    "COUNTED_VERDICTS",
    "USER_AGENT_MAX_CHARS",
    "VERDICTS",
    "ClickEvent",
    "EventClassifier",
    "EventContext",
    "EventKind",
    "Judgement",
    "LinkRecord",
    "MessageRecord",
    "OpenEvent",
    "StoredMessage",
    "Verdict",
    "header_text",
    "unclassified",
]

#: What an open or click event is judged to be (see :mod:`smtp_tracker.classification`):
#: ``human`` a person's mail client; ``privacy_proxy`` a fetch on download that
#: says nothing of reading (Apple Mail Privacy Protection); ``mail_proxy`` a
#: provider's image proxy fetching for a reader (GoogleImageProxy, YahooMailProxy);
#: ``scanner`` a security gateway or prefetcher; ``unknown`` no rule matched.
Verdict = Literal["human", "privacy_proxy", "mail_proxy", "scanner", "unknown"]
VERDICTS: Final[tuple[Verdict, ...]] = (
    "human",
    "privacy_proxy",
    "mail_proxy",
    "scanner",
    "unknown",
)
#: The verdicts that make a message count as "opened" (or "clicked") by default.
COUNTED_VERDICTS: Final[frozenset[str]] = frozenset({"human", "mail_proxy"})

EventKind = Literal["open", "click"]

#: User-Agent values are cut to this many characters before they are stored.
USER_AGENT_MAX_CHARS = 512

#: Lone surrogates that are not surrogateescape'd octets (those are U+DC80..U+DCFF), and NUL.
_NOT_ESCAPED_OCTET = re.compile(r"[\ud800-\udc7f\udd00-\udfff\x00]")


def header_text(value: str | None) -> str | None:
    r"""*value* (an untrusted header or protocol text) as text any UTF-8 store can keep.

    HTTP field values are octets (RFC 9110 §5.5); aiohttp and the :mod:`email`
    package hand octets that are not UTF-8 on as lone surrogates
    (``surrogateescape``: ``\xff`` becomes ``'\udcff'``), which no UTF-8
    encoder takes.  The octets are put back and decoded as UTF-8 with
    replacement (U+FFFD), so valid multi-octet sequences come back whole;
    any other lone surrogate and NUL become U+FFFD too.  Never raises.

    :returns: a string that ``str.encode("utf-8")`` accepts; ``None`` for ``None``.
    """
    if value is None:
        return None
    if value.isascii() and "\x00" not in value:
        return value
    value = _NOT_ESCAPED_OCTET.sub("\ufffd", value)
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageRecord:
    """One relayed SMTP transaction, recorded after the upstream answered 2xx.

    The relay calls :meth:`~smtp_tracker.store.base.Store.record_message` only
    once the upstream accepted the message (final reply to DATA was 2xx); a
    transaction the upstream refused leaves no record.

    :param tracking_id: the pixel token (:func:`~smtp_tracker.tokens.new_tracking_id`),
        unique per message; also recorded for untracked messages.
    :param queue_id: smtp-tracker's own queue id for the transaction.
    :param message_id: the ``Message-ID`` header as found (RFC 5322 §3.6.4), or ``None``.
    :param sender: the reverse-path (RFC 5321 §4.1.1.2), ``""`` for the null path ``<>``.
    :param recipients: the forward-paths the upstream accepted, in order.
    :param size_bytes: size of the message data as received, in bytes.
    :param received_at: when the downstream finished sending the data (UTC).
    :param relayed_at: when the upstream accepted the data (UTC).
    :param upstream_reply: the upstream's final reply text (often holds its queue id).
    :param tracked: whether a pixel was injected.
    :param not_tracked_reason: why not, when ``tracked`` is false (e.g. ``"dkim-signed"``).
    :param subject: the ``Subject`` header; kept only by a store opened with
        ``store_subject=True``, otherwise stored as ``None``.
    :param dkim: what became of the message's DKIM signatures (issue 13):
        ``"resigned"``, or why the message was relayed as received
        (``dkim-signed`` under ``dkim_policy = "skip"``, ``dkim-invalid``,
        ``dkim-foreign``, ``dkim-length-tag``, ``arc-sealed``,
        ``dkim-resign-failed``); ``None`` for a message without signatures.
    :param links: the links wrapped for click tracking, stored with the message
        in the same transaction.
    """

    tracking_id: str
    queue_id: str
    message_id: str | None
    sender: str
    recipients: list[str]
    size_bytes: int
    received_at: datetime
    relayed_at: datetime
    upstream_reply: str
    tracked: bool
    not_tracked_reason: str | None = None
    subject: str | None = None
    dkim: str | None = None
    links: tuple[LinkRecord, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenEvent:
    """One open: a fetch of a message's pixel, the one type for it (issue 14).

    The pixel endpoint hands one to the store
    (:meth:`~smtp_tracker.store.base.Store.record_opens`), which classifies it and
    keeps its address as the store's ``ip_policy`` says; the store's reads
    (``find_message``, the exports, :func:`~smtp_tracker.store.queries.query_message`)
    give it back with what was kept and the verdict.

    :param tracking_id: the token from the pixel URL (well-formed; the store
        ignores an unknown one).
    :param at: when the request arrived (aware; UTC when read back).
    :param ip: handed to the store: the client's IP address as text after
        trusted-proxy resolution (``"192.0.2.7"``), or ``None`` when unknown;
        the classifier sees it so, but it is stored as is only under
        ``ip_policy = "full"``.  Read back: the address as ``ip_policy`` kept
        it: ``"full"`` the address, ``"truncate"`` its network
        (``"192.0.2.0/24"``, ``"2001:db8:1::/48"``), ``"hash"`` 64 lower-case
        hex digits of HMAC-SHA256, ``"none"`` ``None``; ``None`` also when the
        address was unknown or the message is recorded in aggregate mode.
    :param user_agent: the ``User-Agent`` header, or ``None``; the store cuts
        it to :data:`USER_AGENT_MAX_CHARS` characters.
    :param verdict: one of :data:`VERDICTS`; read back, what the store's
        classifier decided.  The store ignores the value handed to it.
    :param verdict_reason: the rule that decided (``"ua:GoogleImageProxy"``),
        or ``None`` (handed to the store).
    """

    tracking_id: str
    at: datetime
    ip: str | None
    user_agent: str | None
    verdict: Verdict = "unknown"
    verdict_reason: str | None = None

    @property
    def counted(self) -> bool:
        """Whether :attr:`verdict` is in :data:`COUNTED_VERDICTS` (``human``, ``mail_proxy``)."""
        return self.verdict in COUNTED_VERDICTS


@dataclass(frozen=True, kw_only=True, slots=True)
class ClickEvent:
    """One click: a fetch of a wrapped link's click URL, the one type for it (issue 14).

    Handed to the store by the click endpoint
    (:meth:`~smtp_tracker.store.base.Store.record_clicks`) and read back as
    :class:`OpenEvent` is; *at*, *ip*, *user_agent*, *verdict* and
    *verdict_reason* mean what they mean there.

    :param link_token: the token from the click URL (the store ignores an unknown one).
    :param tracking_id: read back: the tracking id of the link's message;
        ``None`` when handed to the store, which finds it from *link_token*.
    :param url: read back: the link's target URL (``""`` if the link is no
        longer stored); ``None`` when handed to the store.
    """

    link_token: str
    at: datetime
    ip: str | None
    user_agent: str | None
    tracking_id: str | None = None
    url: str | None = None
    verdict: Verdict = "unknown"
    verdict_reason: str | None = None

    @property
    def counted(self) -> bool:
        """Whether :attr:`verdict` is in :data:`COUNTED_VERDICTS` (``human``, ``mail_proxy``)."""
        return self.verdict in COUNTED_VERDICTS


@dataclass(frozen=True, kw_only=True, slots=True)
class EventContext:
    """What a classifier sees of one open or click event.

    :param kind: ``"open"`` (pixel fetch) or ``"click"``.
    :param at: when the request arrived (UTC).
    :param client_address: the client's address as text, BEFORE the store's
        ``ip_policy`` (so network lists can match), or ``None``.
    :param user_agent: the ``User-Agent`` header (cut to 512 characters), or ``None``.
    :param relayed_at: when the message was relayed (UTC).
    :param networks: for a reclassification only: the network lists the
        address was found in when the event was recorded, used instead of
        looking *client_address* up (the store kept a hash or nothing of it);
        ``None``: look the address up.
    """

    kind: EventKind
    at: datetime
    client_address: str | None
    user_agent: str | None
    relayed_at: datetime
    networks: frozenset[str] | None = None


class Judgement(NamedTuple):
    """What a classifier says of one event.

    :param verdict: one of :data:`VERDICTS`.
    :param reason: the rule that decided (``"ua:GoogleImageProxy"``).
    :param signals: what it was judged on, as JSON (stored in the event's
        ``signals`` column), or None.
    """

    verdict: Verdict
    reason: str
    signals: str | None = None


#: Judges one event: returns the verdict and the reason (the rule's name), and
#: optionally (a :class:`Judgement`) the signals it was judged on.
EventClassifier = Callable[[EventContext], tuple[Verdict, str] | Judgement]


def unclassified(event: EventContext) -> tuple[Verdict, str]:
    """The default :data:`EventClassifier`: every event is ``unknown``."""
    return "unknown", "unclassified"


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredMessage:
    """A message record with its opens and clicks, oldest first."""

    record: MessageRecord
    opens: tuple[OpenEvent, ...] = field(default=())
    clicks: tuple[ClickEvent, ...] = field(default=())
