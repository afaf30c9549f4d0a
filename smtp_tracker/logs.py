"""Log lines that read like Postfix's, or JSON for log shippers.

Text form (``log_format = "text"``), as Postfix writes to syslog::

    Nov 21 10:00:00 mx1 smtp-tracker/relay[4242]: 4F2A9C01B3E5: from=<a@example.org>, ...
    Nov 21 10:00:01 mx1 smtp-tracker/relay[4242]: warning: upstream smtp.example.net:587: ...

The part after ``smtp-tracker/`` names the component (``smtpd``, ``relay``,
``mime``, ``store``, ``pixel``, ``capture``), and levels above info are
written as Postfix does (``warning:``, ``error:``, ``fatal:``).  JSON form
(``log_format = "json"``) writes one object per line with ``time`` (RFC 3339,
UTC), ``level``, ``component``, ``pid`` and ``message``.

Nothing logged by smtp-tracker contains a password or a message body.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from typing import TextIO

__all__ = ["configure_logging"]

_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}


def _component(record: logging.LogRecord) -> str:
    name = record.name
    if name.startswith("smtp_tracker."):
        return name.split(".")[1]
    return name.split(".")[0]


class PostfixFormatter(logging.Formatter):
    """``Mon DD HH:MM:SS host smtp-tracker/component[pid]: [level: ]message``."""

    def __init__(self) -> None:
        super().__init__()
        self._host = socket.gethostname().split(".")[0]

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(record.created))
        prefix = _PREFIX.get(record.levelno, "")
        line = (
            f"{stamp} {self._host} smtp-tracker/{_component(record)}[{record.process}]: "
            f"{prefix}{record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": _component(record),
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Send smtp-tracker's logs to ``stream`` (standard error by default).

    :param level: ``"debug"``, ``"info"``, ``"warning"`` or ``"error"``.
    :param fmt: ``"text"`` (Postfix-like) or ``"json"``.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PostfixFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every command at info, with addresses; keep it to warnings
    # unless asked for debug, and never let it quote message content.
    aiosmtpd_log = logging.getLogger("mail.log")
    aiosmtpd_log.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    if not any(isinstance(f, _NoMessageContent) for f in aiosmtpd_log.filters):
        aiosmtpd_log.addFilter(_NoMessageContent())


class _NoMessageContent(logging.Filter):
    """Drops aiosmtpd's debug records that quote the message (``DATA readline: b'...'``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("DATA readline")
