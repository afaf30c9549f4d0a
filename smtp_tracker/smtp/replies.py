"""SMTP replies: one :class:`Reply` type, and every reply smtp-tracker composes, as a constant.

A reply is a code, an enhanced status code and a text (aiosmtplib's
``SMTPResponse`` is the model, with the enhanced status split out).  Replies
from the upstream are passed on as faithfully as one line allows
(:meth:`Reply.from_upstream`); the constants below are the ones we say on our
own account.  Each constant is named with its reply code; each carries an
enhanced status code (RFC 3463, registry in RFC 5248) because we advertise
ENHANCEDSTATUSCODES (RFC 2034).  None of them ever includes the text of an
exception.

RFC 5321 §4.2 replies may span several lines; we give the downstream one line
(RFC 5321 §4.5.3.1.5 caps a reply line at 512 octets) with the upstream's code,
its enhanced status code (RFC 3463 §2) and its text.  When the upstream gave no
enhanced status code, one is supplied from the reply class and the command, as
RFC 3463 §3 suggests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from smtp_tracker.errors import SMTPReply

__all__ = [
    "R214_HELP",
    "R214_SYNTAX",
    "R220_READY_TO_START_TLS",
    "R221_BYE",
    "R250_OK",
    "R250_RECIPIENT_OK",
    "R250_SENDER_OK",
    "R252_CANNOT_VRFY",
    "R421_SHUTTING_DOWN",
    "R421_TIMEOUT",
    "R421_TOO_MANY_CONNECTIONS",
    "R451_COPY_FAILED",
    "R451_COPY_UNAVAILABLE",
    "R451_INTERNAL_ERROR",
    "R451_UPSTREAM_AUTH_FAILED",
    "R451_UPSTREAM_LOST",
    "R451_UPSTREAM_SMTPUTF8_UNSUPPORTED",
    "R451_UPSTREAM_STARTTLS_MISSING",
    "R451_UPSTREAM_TIMEOUT",
    "R451_UPSTREAM_TLS_FAILED",
    "R451_UPSTREAM_UNAVAILABLE",
    "R452_TOO_MANY_RECIPIENTS",
    "R454_TLS_NOT_AVAILABLE",
    "R500_COMMAND_TOO_LONG",
    "R500_LINE_TOO_LONG",
    "R500_NON_ASCII",
    "R500_SYNTAX_ERROR",
    "R500_UNRECOGNIZED",
    "R501_BAD_BODY",
    "R501_BAD_ENVID",
    "R501_BAD_NOTIFY",
    "R501_BAD_ORCPT",
    "R501_BAD_RET",
    "R501_BAD_SIZE",
    "R501_CONTROL_CHARACTER",
    "R501_DATA_SYNTAX",
    "R501_DUPLICATE_PARAMETER",
    "R501_EHLO_SYNTAX",
    "R501_HELO_SYNTAX",
    "R501_HELP_UNKNOWN_COMMAND",
    "R501_MAIL_SYNTAX",
    "R501_PARAMETER_SYNTAX",
    "R501_QUIT_SYNTAX",
    "R501_RCPT_SYNTAX",
    "R501_RSET_SYNTAX",
    "R501_SMTPUTF8_VALUE",
    "R501_STARTTLS_SYNTAX",
    "R501_VRFY_SYNTAX",
    "R502_AUTH_NOT_OFFERED",
    "R502_EXPN_NOT_IMPLEMENTED",
    "R503_NEED_HELO",
    "R503_NEED_MAIL",
    "R503_NEED_RCPT",
    "R503_NESTED_MAIL",
    "R503_TRANSACTION_IN_PROGRESS",
    "R530_STARTTLS_FIRST",
    "R552_MESSAGE_TOO_BIG",
    "R553_MALFORMED_RECIPIENT",
    "R553_MALFORMED_SENDER",
    "R554_ACCESS_DENIED",
    "R554_PROTOCOL_SYNCHRONIZATION",
    "R554_TLS_ALREADY_ACTIVE",
    "R554_TLS_FAILED",
    "R555_MAIL_PARAMETER_UNKNOWN",
    "R555_RCPT_PARAMETER_UNKNOWN",
    "Reply",
]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
#: Room for "NNN X.YYY.ZZZ " within the 512-octet reply line, CRLF excluded.
_MAX_TEXT = 480

#: Default enhanced status codes per command when the upstream gave none.
#: RFC 3463 §3.2 (X.1.0 sender, X.1.5 destination valid) and §3.1 (X.0.0 other).
_DEFAULT_DETAIL = {"MAIL": "1.0", "RCPT": "1.5", "DATA": "0.0"}


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply, as one line: ``str(reply)`` is what the client reads (CRLF excluded).

    :ivar code: the three-digit reply code (RFC 5321 §4.2.2).
    :ivar enhanced_status: ``"C.S.D"`` (RFC 3463 §2); its class agrees with ``code``.
    :ivar text: printable ASCII, one line, at most 480 characters.
    """

    code: int
    enhanced_status: str
    text: str

    @classmethod
    def of(cls, reply: SMTPReply) -> Reply:
        """``reply`` (an exception's) as a :class:`Reply`: its code, enhanced status and text."""
        return cls(reply.code, reply.enhanced_status, reply.text)

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

    def format(self, **fields: str) -> Reply:
        """The reply with ``fields`` filled into its text (:meth:`str.format`).

        Only for values we checked ourselves (a parameter keyword, a command
        name): never client text we have not validated, never an exception's.
        """
        return replace(self, text=self.text.format(**fields))

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced_status} {self.text}"


# -- 2xx ----------------------------------------------------------------------------

#: RFC 5321 §4.1.1.8: HELP; ``{commands}`` is the list of commands we implement.
R214_HELP = Reply(214, "2.0.0", "Supported commands: {commands}")
#: RFC 5321 §4.1.1.8: HELP with a command we implement; ``{syntax}`` is its syntax.
R214_SYNTAX = Reply(214, "2.0.0", "Syntax: {syntax}")
#: RFC 3207 §4 (and RFC 2034 §3): Postfix's words, with the enhanced status code.
R220_READY_TO_START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
R221_BYE = Reply(221, "2.0.0", "Bye")
R250_OK = Reply(250, "2.0.0", "OK")
#: LMTP (RFC 2033 §4.2): MAIL accepted locally; RFC 3463 X.1.0 "Other address status".
R250_SENDER_OK = Reply(250, "2.1.0", "OK")
#: LMTP (RFC 2033 §4.2): RCPT accepted locally after the syntax and limit checks; the
#: recipient's own reply comes after DATA. RFC 3463 X.1.5 "Destination address valid".
R250_RECIPIENT_OK = Reply(250, "2.1.5", "OK")
#: RFC 5321 §3.5.3 and §7.3: we do not verify addresses (the upstream decides at RCPT).
R252_CANNOT_VRFY = Reply(
    252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"
)

# -- 4xx ----------------------------------------------------------------------------

#: RFC 5321 §4.5.3.2 (a server may close an idle connection) with §3.8's 421;
#: RFC 3463 X.4.2 "Bad connection", as Postfix says on its own timeout.
R421_TIMEOUT = Reply(421, "4.4.2", "timeout exceeded, closing connection")
#: RFC 5321 §3.1 (421 at connection opening) and RFC 3463 X.3.2 "System not
#: accepting network messages": ``max_connections`` reached; the client retries.
R421_TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Too many connections, try again later")
#: RFC 5321 §3.8 (a server shutting down answers 421) and RFC 3463 X.3.2:
#: SIGTERM, to idle sessions and to transactions outlasting ``shutdown_grace_s``.
R421_SHUTTING_DOWN = Reply(421, "4.3.2", "smtp-tracker shutting down")

#: RFC 3463 X.4.1 "No answer from host": connection refused, unreachable, unresolvable.
R451_UPSTREAM_UNAVAILABLE = Reply(451, "4.4.1", "upstream unavailable, try again later")
#: RFC 3463 X.4.2 "Bad connection": the upstream dropped the connection mid-transaction.
R451_UPSTREAM_LOST = Reply(451, "4.4.2", "connection to upstream lost, try again later")
#: RFC 3463 X.4.2: the upstream did not answer within our timeout.
R451_UPSTREAM_TIMEOUT = Reply(451, "4.4.2", "upstream timed out, try again later")
#: RFC 3463 X.7.4 "Security features not supported": STARTTLS required but not offered.
R451_UPSTREAM_STARTTLS_MISSING = Reply(
    451, "4.7.4", "upstream does not offer STARTTLS, which is required"
)
#: RFC 3463 X.7.5 "Cryptographic failure": handshake or certificate verification failed.
R451_UPSTREAM_TLS_FAILED = Reply(451, "4.7.5", "TLS with upstream failed, try again later")
#: RFC 4954 §6 X.7.8 "Authentication credentials invalid", made temporary: our
#: configuration is at fault, not the message, so Postfix must keep it.
R451_UPSTREAM_AUTH_FAILED = Reply(451, "4.7.8", "upstream refused our credentials, try again later")
#: RFC 6531 §3.4 X.6.7: the message needs SMTPUTF8 and the upstream lacks it.
#: Temporary on purpose: the admin can switch upstreams before Postfix gives up.
R451_UPSTREAM_SMTPUTF8_UNSUPPORTED = Reply(451, "4.6.7", "upstream does not support SMTPUTF8")
#: A required ``[[copies]]`` destination could not take the transaction (down,
#: refused MAIL): the client keeps the message; RFC 3463 X.4.1 "No answer from host".
R451_COPY_UNAVAILABLE = Reply(451, "4.4.1", "required copy unavailable, try again later")
#: A required copy did not accept a recipient or the message the upstream accepted;
#: RFC 3463 X.4.0 "Other or undefined network or routing status".
R451_COPY_FAILED = Reply(451, "4.4.0", "required copy did not accept, try again later")
#: RFC 3463 X.3.0: anything we did not foresee; the exception is logged, never shown.
R451_INTERNAL_ERROR = Reply(451, "4.3.0", "internal error, try again later")

#: RFC 5321 §4.5.3.1.10: 452 for too many recipients; RFC 3463 X.5.3.
R452_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "too many recipients")
#: RFC 3207 §4: STARTTLS offered but no TLS context (aiosmtpd's case); X.7.0.
R454_TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")

# -- 5xx: the command ---------------------------------------------------------------

#: An empty or undecodable command line; RFC 3463 X.5.2 "Syntax error".
R500_SYNTAX_ERROR = Reply(500, "5.5.2", "syntax error")
#: RFC 5321 §4.5.3.1.4: a command line over 512 octets (more after EHLO).
R500_COMMAND_TOO_LONG = Reply(500, "5.5.2", "command line too long")
#: RFC 5321 §4.5.3.1.6: a text line over 1000 octets in the message.
R500_LINE_TOO_LONG = Reply(500, "5.5.2", "line too long (RFC 5321 §4.5.3.1.6)")
#: Non-ASCII in a command without SMTPUTF8 (RFC 6531 §3.3).
R500_NON_ASCII = Reply(500, "5.5.2", "non-ASCII data without SMTPUTF8")
#: RFC 5321 §4.2.4 and RFC 3463 X.5.1 "Invalid command"; the command is not echoed.
R500_UNRECOGNIZED = Reply(500, "5.5.1", "command not recognized")

#: RFC 5321 §2.3.8 and §4.1.2: CR and LF only as the line's CRLF, and no other
#: C0 control (TAB included) or DEL in an argument (RFC 3463 X.5.2 "Syntax error").
R501_CONTROL_CHARACTER = Reply(501, "5.5.2", "control character in command")
R501_DATA_SYNTAX = Reply(501, "5.5.4", "syntax: DATA")
R501_RSET_SYNTAX = Reply(501, "5.5.4", "syntax: RSET")
R501_QUIT_SYNTAX = Reply(501, "5.5.4", "syntax: QUIT")
R501_EHLO_SYNTAX = Reply(501, "5.5.4", "syntax: EHLO hostname")
R501_HELO_SYNTAX = Reply(501, "5.5.4", "syntax: HELO hostname")
R501_VRFY_SYNTAX = Reply(501, "5.5.4", "syntax: VRFY <address>")
R501_STARTTLS_SYNTAX = Reply(501, "5.5.4", "syntax: STARTTLS")
R501_MAIL_SYNTAX = Reply(501, "5.5.4", "syntax: MAIL FROM:<address> [SP <mail-parameters>]")
R501_RCPT_SYNTAX = Reply(501, "5.5.4", "syntax: RCPT TO:<address> [SP <mail-parameters>]")
#: RFC 5321 §4.1.1.8: HELP with a command we do not implement; X.5.4.
R501_HELP_UNKNOWN_COMMAND = Reply(501, "5.5.4", "Supported commands: {commands}")

#: MAIL and RCPT parameters (RFC 5321 §4.1.2 esmtp-param; RFC 1870, 6152, 6531,
#: 3461), RFC 3463 X.5.4 "Invalid command arguments".
R501_PARAMETER_SYNTAX = Reply(501, "5.5.4", "syntax error in parameters")
#: ``{keyword}`` is the parameter's keyword, already checked as ``[A-Za-z0-9-]+``.
R501_DUPLICATE_PARAMETER = Reply(501, "5.5.4", "duplicate {keyword} parameter")
R501_BAD_SIZE = Reply(501, "5.5.4", "bad SIZE value")
R501_BAD_BODY = Reply(501, "5.5.4", "BODY can only be 7BIT or 8BITMIME")
R501_SMTPUTF8_VALUE = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
R501_BAD_RET = Reply(501, "5.5.4", "RET can only be FULL or HDRS")
R501_BAD_ENVID = Reply(501, "5.5.4", "bad ENVID value")
R501_BAD_NOTIFY = Reply(501, "5.5.4", "bad NOTIFY value")
R501_BAD_ORCPT = Reply(501, "5.5.4", "bad ORCPT value")

#: RFC 4954 §4: AUTH is not offered here; access is by client address.
R502_AUTH_NOT_OFFERED = Reply(502, "5.5.1", "AUTH not offered")
#: RFC 5321 §3.5.2 and §7.3: EXPN may be refused; X.5.1 as Postfix answers it.
R502_EXPN_NOT_IMPLEMENTED = Reply(502, "5.5.1", "EXPN not implemented")
R503_NESTED_MAIL = Reply(503, "5.5.1", "nested MAIL command")
R503_NEED_MAIL = Reply(503, "5.5.1", "need MAIL command")
R503_NEED_RCPT = Reply(503, "5.5.1", "need RCPT command")
R503_NEED_HELO = Reply(503, "5.5.1", "send HELO or EHLO first")
#: RFC 3207 §4: STARTTLS inside a mail transaction (the client SHOULD NOT); Postfix's words.
R503_TRANSACTION_IN_PROGRESS = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
#: RFC 3207 §4: a command before STARTTLS where TLS is required.
R530_STARTTLS_FIRST = Reply(530, "5.7.0", "must issue a STARTTLS command first")

#: RFC 1870 §6.1 and RFC 3463 X.3.4 "Message too big for system".
R552_MESSAGE_TOO_BIG = Reply(552, "5.3.4", "message size exceeds fixed maximum message size")
#: RFC 3463 X.1.7 "Bad sender's mailbox address syntax".
R553_MALFORMED_SENDER = Reply(553, "5.1.7", "malformed address")
#: RFC 3463 X.1.3 "Bad destination mailbox address syntax".
R553_MALFORMED_RECIPIENT = Reply(553, "5.1.3", "malformed address")
#: RFC 3463 X.7.1 "Delivery not authorized": client outside allowed_clients.
R554_ACCESS_DENIED = Reply(554, "5.7.1", "access denied")
#: RFC 3207 §4.2: STARTTLS again over TLS; Postfix's words.
R554_TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
#: RFC 3207 §4.1: the TLS handshake failed; commands are refused until QUIT.
R554_TLS_FAILED = Reply(554, "5.7.0", "command refused: TLS failed")
#: RFC 5321 §4.3.1 / RFC 2920 §3.1: input before our greeting, after a command
#: that must end a pipelined group (EHLO, HELO, DATA), or before our 354;
#: Postfix's words (``smtpd_forbid_unauth_pipelining``), and then the connection is closed.
R554_PROTOCOL_SYNCHRONIZATION = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")
#: RFC 1869 §6 / RFC 5321 §4.1.1.11, X.5.4 "Invalid command arguments".
R555_MAIL_PARAMETER_UNKNOWN = Reply(
    555, "5.5.4", "MAIL parameter not recognized or not implemented"
)
R555_RCPT_PARAMETER_UNKNOWN = Reply(
    555, "5.5.4", "RCPT parameter not recognized or not implemented"
)
