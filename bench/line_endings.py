"""Cost of the bare CR/LF check every relayed payload goes through, and of its rewrite.

Run: ``python bench/line_endings.py [--megabytes 1 10 50] [--rounds N]``

``normalize_line_endings`` runs in the event loop on each message before it is
relayed (SMTP smuggling defence, see ``smtp_tracker/smtp/server.py``).  For
each size, three payloads of 78-octet lines: all CRLF (the check only, what
Postfix sends), bare LF on every line, and one bare CR in the middle (a rewrite
for one octet).  Reported: the median time over the rounds and the throughput.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_tracker.smtp.payload import normalize_line_endings

LINE = b"x" * 76


def payloads(size: int) -> dict[str, bytes]:
    lines = size // (len(LINE) + 2)
    crlf = (LINE + b"\r\n") * lines
    half = len(crlf) // 2
    return {
        "all CRLF (check only)": crlf,
        "bare LF on every line": (LINE + b"\n") * lines,
        "one bare CR": crlf[:half] + b"\r" + crlf[half:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for megabytes in args.megabytes:
        for name, content in payloads(megabytes * 1024 * 1024).items():
            times = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                normalize_line_endings(content)
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            print(
                f"{megabytes:>3} MiB  {name:<24} {median * 1000:8.1f} ms  "
                f"{len(content) / median / 1e6:8.0f} MB/s"
            )


if __name__ == "__main__":
    main()
