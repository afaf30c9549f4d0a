"""Every SMTP reply smtp-tracker composes itself, in one place.

Replies that come from the upstream are passed on as they were (see
:mod:`smtp_tracker.smtp.reply`); these are the ones we say on our own account.
Each constant is named with its reply code; each carries an enhanced status
code (RFC 3463, registry in RFC 5248) because we advertise ENHANCEDSTATUSCODES
(RFC 2034).  None of them ever includes the text of an exception.
"""

from __future__ import annotations

__all__ = [
    "R221_BYE",
    "R250_OK",
    "R421_SHUTTING_DOWN",
    "R421_TIMEOUT",
    "R421_TOO_MANY_CONNECTIONS",
    "R451_INTERNAL_ERROR",
    "R451_UPSTREAM_AUTH_FAILED",
    "R451_UPSTREAM_LOST",
    "R451_UPSTREAM_SMTPUTF8_UNSUPPORTED",
    "R451_UPSTREAM_STARTTLS_MISSING",
    "R451_UPSTREAM_TIMEOUT",
    "R451_UPSTREAM_TLS_FAILED",
    "R451_UPSTREAM_UNAVAILABLE",
    "R452_TOO_MANY_RECIPIENTS",
    "R500_UNRECOGNIZED",
    "R501_CONTROL_CHARACTER",
    "R502_AUTH_NOT_OFFERED",
    "R503_NEED_MAIL",
    "R503_NEED_RCPT",
    "R503_NESTED_MAIL",
    "R503_TRANSACTION_IN_PROGRESS",
    "R552_MESSAGE_TOO_BIG",
    "R554_ACCESS_DENIED",
    "R554_TLS_ALREADY_ACTIVE",
    "R555_UNKNOWN_PARAMETER",
]

R221_BYE = "221 2.0.0 Bye"
R250_OK = "250 2.0.0 OK"

#: RFC 5321 §4.5.3.2 (a server may close an idle connection) with §3.8's 421;
#: RFC 3463 X.4.2 "Bad connection", as Postfix says on its own timeout.
R421_TIMEOUT = "421 4.4.2 timeout exceeded, closing connection"
#: RFC 5321 §3.1 (421 at connection opening) and RFC 3463 X.3.2 "System not
#: accepting network messages": ``max_connections`` reached; the client retries.
R421_TOO_MANY_CONNECTIONS = "421 4.3.2 Too many connections, try again later"
#: RFC 5321 §3.8 (a server shutting down answers 421) and RFC 3463 X.3.2:
#: SIGTERM, to idle sessions and to transactions outlasting ``shutdown_grace_s``.
R421_SHUTTING_DOWN = "421 4.3.2 smtp-tracker shutting down"

#: RFC 3463 X.4.1 "No answer from host": connection refused, unreachable, unresolvable.
R451_UPSTREAM_UNAVAILABLE = "451 4.4.1 upstream unavailable, try again later"
#: RFC 3463 X.4.2 "Bad connection": the upstream dropped the connection mid-transaction.
R451_UPSTREAM_LOST = "451 4.4.2 connection to upstream lost, try again later"
#: RFC 3463 X.4.2: the upstream did not answer within our timeout.
R451_UPSTREAM_TIMEOUT = "451 4.4.2 upstream timed out, try again later"
#: RFC 3463 X.7.4 "Security features not supported": STARTTLS required but not offered.
R451_UPSTREAM_STARTTLS_MISSING = "451 4.7.4 upstream does not offer STARTTLS, which is required"
#: RFC 3463 X.7.5 "Cryptographic failure": handshake or certificate verification failed.
R451_UPSTREAM_TLS_FAILED = "451 4.7.5 TLS with upstream failed, try again later"
#: RFC 4954 §6 X.7.8 "Authentication credentials invalid", made temporary: our
#: configuration is at fault, not the message, so Postfix must keep it.
R451_UPSTREAM_AUTH_FAILED = "451 4.7.8 upstream refused our credentials, try again later"
#: RFC 6531 §3.4 X.6.7: the message needs SMTPUTF8 and the upstream lacks it.
#: Temporary on purpose: the admin can switch upstreams before Postfix gives up.
R451_UPSTREAM_SMTPUTF8_UNSUPPORTED = "451 4.6.7 upstream does not support SMTPUTF8"
#: RFC 3463 X.3.0: anything we did not foresee; the exception is logged, never shown.
R451_INTERNAL_ERROR = "451 4.3.0 internal error, try again later"

#: RFC 5321 §4.5.3.1.10: 452 for too many recipients; RFC 3463 X.5.3.
R452_TOO_MANY_RECIPIENTS = "452 4.5.3 too many recipients"

#: RFC 5321 §4.2.4 and RFC 3463 X.5.1 "Invalid command"; the command is not echoed.
R500_UNRECOGNIZED = "500 5.5.1 command not recognized"
#: RFC 5321 §2.3.8: CR and LF only as the line's CRLF; other C0 controls have no
#: place in a command either (RFC 3463 X.5.2 "Syntax error").
R501_CONTROL_CHARACTER = "501 5.5.2 control character in command"

#: RFC 4954 §4: AUTH is not offered here; access is by client address.
R502_AUTH_NOT_OFFERED = "502 5.5.1 AUTH not offered"
R503_NESTED_MAIL = "503 5.5.1 nested MAIL command"
R503_NEED_MAIL = "503 5.5.1 need MAIL command"
R503_NEED_RCPT = "503 5.5.1 need RCPT command"
#: RFC 3207 §4: STARTTLS inside a mail transaction (the client SHOULD NOT); Postfix's words.
R503_TRANSACTION_IN_PROGRESS = "503 5.5.1 Error: MAIL transaction in progress"

#: RFC 1870 §6.1 and RFC 3463 X.3.4 "Message too big for system".
R552_MESSAGE_TOO_BIG = "552 5.3.4 message size exceeds fixed maximum message size"
#: RFC 3463 X.7.1 "Delivery not authorized": client outside allowed_clients.
R554_ACCESS_DENIED = "554 5.7.1 access denied"
#: RFC 3207 §4.2: STARTTLS again over TLS; Postfix's words.
R554_TLS_ALREADY_ACTIVE = "554 5.5.1 Error: TLS already active"
#: RFC 1869 §6 / RFC 5321 §4.1.1.11, X.5.4 "Invalid command arguments".
R555_UNKNOWN_PARAMETER = "555 5.5.4 parameter not recognized or not implemented"
