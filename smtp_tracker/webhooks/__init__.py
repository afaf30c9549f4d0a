"""Events out (issue 18): signed webhooks from a durable outbox, and an NDJSON event log.

:mod:`.events` (the event types and their JSON), :mod:`.signing` (Standard
Webhooks), :mod:`.settings` (one ``[[webhooks]]`` table), :mod:`.outbox` (the
store side), :mod:`.sender` (delivery), :mod:`.eventlog` (``events_log``).
The package imports none of them, so the configuration can read
:mod:`.settings` without aiohttp.
"""

from __future__ import annotations

__all__: list[str] = []
