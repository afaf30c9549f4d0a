"""The pixel-injection rewrite: one tracking pixel in a message's HTML body.

Usage::

    result = rewrite(message_bytes, "https://t.example/o/ID.gif", RewritePolicy())
    relay(result.message)

See :func:`rewrite` for the rules and :class:`RewriteResult` for the outcome.
"""

from smtp_tracker.mime.policy import RewritePolicy
from smtp_tracker.mime.rewrite import RewriteResult, rewrite

__all__ = ["RewritePolicy", "RewriteResult", "rewrite"]
