"""An upstream SMTP reply, passed on to the downstream client as faithfully as we can.

RFC 5321 §4.2 replies may span several lines; we give the downstream one line
(RFC 5321 §4.5.3.1.5 caps a reply line at 512 octets) with the upstream's code,
its enhanced status code (RFC 3463 §2) and its text.  When the upstream gave no
enhanced status code, one is supplied from the reply class and the command, as
RFC 3463 §3 suggests, because we advertise ENHANCEDSTATUSCODES (RFC 2034).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Reply"]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
#: Room for "NNN X.YYY.ZZZ " within the 512-octet reply line, CRLF excluded.
_MAX_TEXT = 480

#: Default enhanced status codes per command when the upstream gave none.
#: RFC 3463 §3.2 (X.1.0 sender, X.1.5 destination valid) and §3.1 (X.0.0 other).
_DEFAULT_DETAIL = {"MAIL": "1.0", "RCPT": "1.5", "DATA": "0.0"}


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply.

    :ivar code: the three-digit reply code (RFC 5321 §4.2.2).
    :ivar enhanced_status: ``"C.S.D"`` (RFC 3463 §2); its class agrees with ``code``.
    :ivar text: printable ASCII, one line, at most 480 characters.
    """

    code: int
    enhanced_status: str
    text: str

    @classmethod
    def from_upstream(cls, code: int, message: str, *, command: str) -> Reply:
        """Build the reply to pass on from an upstream reply.

        :param code: the upstream's reply code.
        :param message: the upstream's reply text; lines joined by ``"\\n"``
            (aiosmtplib's form), each possibly starting with an enhanced status code.
        :param command: ``"MAIL"``, ``"RCPT"`` or ``"DATA"``: picks a default
            enhanced status when the upstream gave none.
        """
        lines = [line.strip() for line in message.split("\n")]
        enhanced: str | None = None
        texts: list[str] = []
        for line in lines:
            match = _ENHANCED.match(line)
            if match is not None:
                if enhanced is None and int(match.group(1)) == code // 100:
                    enhanced = ".".join(match.groups())
                line = line[match.end() :]
            if line:
                texts.append(line)
        if enhanced is None:
            detail = "2.0" if code == 421 else _DEFAULT_DETAIL.get(command, "0.0")
            enhanced = f"{code // 100}.{detail}"
        text = _UNPRINTABLE.sub(" ", " ".join(texts)).strip()[:_MAX_TEXT] or "(no text)"
        return cls(code, enhanced, text)

    @classmethod
    def parse(cls, line: str) -> Reply:
        """Read one of our own reply lines, ``"451 4.4.1 text"`` (see :mod:`.replies`).

        :raises ValueError: when the line is not ``code SP enhanced-status SP text``.
        """
        code, enhanced, text = line.split(" ", 2)
        return cls(int(code), enhanced, text)

    @property
    def is_positive(self) -> bool:
        """Whether the reply is a 2xx completion (RFC 5321 §4.2.1)."""
        return 200 <= self.code < 300

    def as_transient(self) -> Reply:
        """The same reply made temporary (4xx): for failures that are not the message's.

        A 421 from the upstream means the upstream is closing its connection; the
        downstream session goes on, so the downstream gets 451 with the same detail.
        """
        if self.code // 100 == 4 and self.code != 421:
            return self
        detail = self.enhanced_status.split(".", 1)[1]
        return Reply(451, f"4.{detail}", self.text)

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced_status} {self.text}"
