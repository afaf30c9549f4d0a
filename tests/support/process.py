"""smtp-tracker as a real process in tests: start it, read its port back from its log."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Running:
    """A started ``python -m smtp_tracker ...``; ``log`` keeps growing until it exits."""

    process: asyncio.subprocess.Process
    port: int
    log: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def finish(self) -> None:
        """Kill it if it still runs, and wait until its log is read to the end."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self.reader is not None:
            await self.reader


def one_worker(args: Sequence[str]) -> list[str]:
    """``args`` with ``--workers 1`` after ``serve`` unless they give ``--workers`` themselves.

    ``workers`` defaults to one per usable core (a supervisor and N processes);
    a test about something else runs the one process it always did.
    """
    if not args or args[0] != "serve":
        return list(args)
    if any(arg == "--workers" or arg.startswith("--workers=") for arg in args):
        return list(args)
    return ["serve", "--workers", "1", *args[1:]]


async def launch(*args: str, env: dict[str, str], ready: str, timeout_s: float = 30.0) -> Running:
    """Start ``smtp-tracker ARGS`` and wait for the log line ``READY on 127.0.0.1:PORT``.

    Binding port 0 and reading it back avoids port races.  Standard error is read
    all along (into :attr:`Running.log`), so a chatty process never blocks on a full pipe.
    ``serve`` runs one worker unless ``args`` say otherwise (:func:`one_worker`).

    :param ready: the start of the line, e.g. ``"listening for SMTP"``.
    :raises AssertionError: the process ended, or said nothing of the kind in time.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtp_tracker",
        *one_worker(args),
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    pattern = re.compile(re.escape(ready) + r" on 127\.0\.0\.1:(\d+)")
    log: list[str] = []
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), timeout=timeout_s)).decode()
        assert line, f"smtp-tracker {args[0]} ended before it listened: {''.join(log)}"
        log.append(line)
        if match := pattern.search(line):
            break
    running = Running(process, int(match.group(1)), log)

    async def read_log() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            running.log.append(raw.decode())

    running.reader = asyncio.create_task(read_log())
    return running


def run_cli(
    *args: str, cwd: Path | None = None, wrapper: Sequence[str] = (), input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``smtp-tracker ARGS`` to its end (60 s at most), its output captured as text.

    ``serve`` runs one worker unless ``args`` say otherwise (:func:`one_worker`).

    :param wrapper: a command to run it under, e.g. ``("prlimit", "--nofile=16")``.
    :param input: its standard input (else none).
    """
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "smtp_tracker", *one_worker(args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
        input=input,
    )
