"""Waiting on a condition with a deadline, never on the clock alone.

Tests synchronise on what they can observe (a transaction recorded, a queue
emptied, a log line written), checked at a short interval until a deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["wait_until"]

T = TypeVar("T")


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout_s: float,
    message: str,
    interval_s: float = ...,
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T], *, timeout_s: float, message: str, interval_s: float = ...
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout_s: float,
    message: str,
    interval_s: float = 0.02,
) -> Any:
    """Call ``predicate`` until it returns something truthy; return that value.

    :param predicate: a plain or async callable, called at least once; it may
        return any value, which is judged by its truth.
    :param timeout_s: deadline in seconds from the first call.
    :param message: what did not happen, for the failure.
    :param interval_s: pause between calls in seconds (the loop keeps running meanwhile).
    :raises AssertionError: when the deadline passes with the predicate still falsy.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (waited {timeout_s:g} s)")
        await asyncio.sleep(interval_s)
