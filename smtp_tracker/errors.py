"""The exceptions smtp-tracker raises, in one tree.

::

    SmtpTrackerError
    ├── ConfigError                 bad configuration; the CLI prints it as one line, exit 2
    ├── StartupError                a resource could not be had at start (port, file); exit 1
    ├── InputError                  a command's input is unreadable or empty; exit 1
    ├── StoreError                  the data directory could not be read or written
    ├── CommandRejected             a client's SMTP command we refuse (bad parameter, limit)
    └── UpstreamError               the upstream could not take the transaction
        ├── UpstreamUnavailable     refused, unresolvable, timed out, dropped (4.4.x)
        ├── UpstreamTLSError        STARTTLS missing or the handshake/verification failed (4.7.x)
        └── UpstreamAuthError       the upstream refused our credentials (4.7.8)

Every :class:`CommandRejected` and :class:`UpstreamError` carries the reply
that smtp-tracker gives the downstream client for it: a
:class:`~smtp_tracker.smtp.replies.Reply` (one of the constants of
:mod:`smtp_tracker.smtp.replies`, or an upstream reply made transient), never
the text of a lower-level exception.  This module sits below ``smtp/``, so it
names the reply's shape (:class:`SMTPReply`), not its class.
An upstream's non-2xx reply to a command is not an exception: it is passed on
as a :class:`~smtp_tracker.smtp.replies.Reply`.  Lower libraries' exceptions (aiosmtplib, ssl,
sqlite3) are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Protocol

__all__ = [
    "CommandRejected",
    "ConfigError",
    "InputError",
    "SMTPReply",
    "SmtpTrackerError",
    "StartupError",
    "StoreError",
    "UpstreamAuthError",
    "UpstreamError",
    "UpstreamTLSError",
    "UpstreamUnavailable",
]


class SmtpTrackerError(Exception):
    """Root of every exception smtp-tracker raises on purpose."""


class ConfigError(SmtpTrackerError):
    """The configuration (file, flags or environment) is invalid.

    :param problems: one line per problem, each saying what to change.
    """

    def __init__(self, *problems: str) -> None:
        self.problems: tuple[str, ...] = problems
        super().__init__("; ".join(problems))


class StartupError(SmtpTrackerError):
    """A resource needed at start-up is unavailable (port in use, unreadable file)."""


class InputError(SmtpTrackerError):
    """A command's input (a message on standard input, a file) is unreadable or empty."""


class StoreError(SmtpTrackerError):
    """The tracking store could not be opened, migrated, read or written."""


class SMTPReply(Protocol):
    """An SMTP reply as the exceptions below carry it: :class:`smtp_tracker.smtp.replies.Reply`.

    ``str(reply)`` is the one reply line (``"451 4.4.1 upstream unavailable, ..."``).
    """

    @property
    def code(self) -> int:
        """The three-digit reply code (RFC 5321 §4.2.2)."""
        ...

    @property
    def enhanced_status(self) -> str:
        """``"C.S.D"`` (RFC 3463 §2)."""
        ...

    @property
    def text(self) -> str:
        """Printable ASCII, one line."""
        ...

    @property
    def is_positive(self) -> bool:
        """Whether the reply is a 2xx completion (RFC 5321 §4.2.1)."""
        ...


class CommandRejected(SmtpTrackerError):
    """A downstream client's command that we refuse ourselves.

    :param reply: the reply for the client, e.g. :data:`~smtp_tracker.smtp.replies.R501_BAD_SIZE`.
    """

    def __init__(self, reply: SMTPReply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class UpstreamError(SmtpTrackerError):
    """The upstream smarthost could not take (part of) the transaction.

    :param reply: the reply to give the downstream client (RFC 5321 §4.2): a 4xx
        with its enhanced status code (RFC 3463), free of exception details.
    """

    def __init__(self, reply: SMTPReply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class UpstreamUnavailable(UpstreamError):
    """The upstream refused the connection, timed out or dropped it (RFC 3463 X.4.x)."""


class UpstreamTLSError(UpstreamError):
    """TLS with the upstream could not be had as configured (RFC 3463 X.7.4, X.7.5)."""


class UpstreamAuthError(UpstreamError):
    """The upstream refused our SMTP AUTH credentials (RFC 4954 §6, X.7.8)."""
