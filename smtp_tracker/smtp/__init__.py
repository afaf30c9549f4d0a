"""The SMTP side: the listener, server and handler Postfix talks to, and the upstream.

Its modules are its surface (:mod:`~smtp_tracker.smtp.server`,
:mod:`~smtp_tracker.smtp.handler`, :mod:`~smtp_tracker.smtp.upstream`, ...); the
package itself exports nothing.
"""

__all__: list[str] = []
