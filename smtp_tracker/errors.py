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
        ├── UpstreamAuthError       the upstream refused our credentials (4.7.8)
        └── UpstreamReplyError      the upstream answered with a non-2xx reply

Every :class:`UpstreamError` carries the SMTP reply that smtp-tracker gives the
downstream client for it (``code``, ``enhanced_status``, ``text``): the mapping
from a failure to a reply lives here, in one place, and never echoes the text
of a lower-level exception.  Lower libraries' exceptions (aiosmtplib, ssl,
sqlite3) are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "CommandRejected",
    "ConfigError",
    "InputError",
    "SmtpTrackerError",
    "StartupError",
    "StoreError",
    "UpstreamAuthError",
    "UpstreamError",
    "UpstreamReplyError",
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


class CommandRejected(SmtpTrackerError):
    """A downstream client's command that we refuse ourselves.

    :param reply: the whole SMTP reply line for the client, e.g. ``"555 5.5.4 ..."``.
    """

    def __init__(self, reply: str) -> None:
        self.reply = reply
        super().__init__(reply)


class UpstreamError(SmtpTrackerError):
    """The upstream smarthost could not take (part of) the transaction.

    :param code: the SMTP reply code to give the downstream client (RFC 5321 §4.2).
    :param enhanced_status: the enhanced status code for that reply (RFC 3463),
        e.g. ``"4.4.1"``.
    :param text: the reply text, free of exception details.
    """

    def __init__(self, code: int, enhanced_status: str, text: str) -> None:
        self.code = code
        self.enhanced_status = enhanced_status
        self.text = text
        super().__init__(f"{code} {enhanced_status} {text}")

    @property
    def reply(self) -> str:
        """The one-line SMTP reply for the downstream client."""
        return f"{self.code} {self.enhanced_status} {self.text}"


class UpstreamUnavailable(UpstreamError):
    """The upstream refused the connection, timed out or dropped it (RFC 3463 X.4.x)."""


class UpstreamTLSError(UpstreamError):
    """TLS with the upstream could not be had as configured (RFC 3463 X.7.4, X.7.5)."""


class UpstreamAuthError(UpstreamError):
    """The upstream refused our SMTP AUTH credentials (RFC 4954 §6, X.7.8)."""


class UpstreamReplyError(UpstreamError):
    """The upstream answered a command with a non-2xx reply, passed on as it was."""
