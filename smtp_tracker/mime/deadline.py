"""A cooperative time limit for one rewrite, checked inside its loops.

A thread cannot be stopped from outside, so a rewrite that overran its time
(:attr:`~smtp_tracker.mime.policy.RewritePolicy.time_limit_s`) would go on
using a core, and keep the process from exiting, for as long as its input
makes it work.  Instead, :func:`time_limit` sets a deadline for the calling
thread (a :class:`contextvars.ContextVar`: each thread has its own) and the
loops of the rewrite (parser feeds, link scans, probes) call :func:`check`,
which raises :class:`TimeLimitExceeded` once the deadline has passed; the
rewrite then relays the original (fail open).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["TimeLimitExceeded", "check", "time_limit"]

#: ``time.monotonic()`` after which the rewrite of this thread stops; None: no limit.
_DEADLINE: ContextVar[float | None] = ContextVar("smtp_tracker_rewrite_deadline", default=None)


class TimeLimitExceeded(Exception):
    """The rewrite ran past its deadline (raised by :func:`check`)."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block, :func:`check` raises once *seconds* (wall clock) have passed.

    :param seconds: the limit in seconds from now; None for no limit.  A limit
        already set for this thread that ends sooner is kept.
    """
    deadline = None if seconds is None else time.monotonic() + seconds
    outer = _DEADLINE.get()
    if outer is not None and (deadline is None or outer < deadline):
        deadline = outer
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check() -> None:
    """Raise :class:`TimeLimitExceeded` when this thread's deadline has passed.

    Costs one ``time.monotonic()`` call; without a deadline, one variable look-up.

    :raises TimeLimitExceeded: when the deadline set by :func:`time_limit` has passed.
    """
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline:
        raise TimeLimitExceeded
