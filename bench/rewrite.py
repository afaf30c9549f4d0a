"""Pixel-rewrite cost per message over the shared corpus, beside merely parsing it.

Run: ``python bench/rewrite.py [--corpus DIR] [--rounds N] [--clicks]``

Every ``eml/`` message and every ``html/`` template (wrapped in a
multipart/alternative message, quoted-printable, base64 and 8bit, as the
corpus tests do) is rewritten N times; each message's time is its median over
the rounds.  Reported: the median and p99 of those per-message times, the
throughput in MB/s (total octets / total time), the same for
``email.message_from_bytes`` (compat32) alone, and how many were tracked.
The corpus directory defaults to ``$SMTP_TRACKER_CORPUS``.

``--clicks`` also measures the rewrite with click tracking on (every eligible
``href`` wrapped in the same pass as the pixel) and reports it beside the
pixel-only rewrite, with the number of links wrapped.
"""

from __future__ import annotations

import argparse
import collections
import email
import os
import statistics
import sys
import time
from collections.abc import Callable
from email.policy import compat32
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_tracker.mime import RewritePolicy, rewrite
from tests.corpus import CORPUS_ENV, html_as_message

URL = "https://track.example.test/o/AAAAAAAAAAAAAAAAAAAAAA.gif"
CLICK_BASE = "https://track.example.test:8443"
VARIANTS = [("utf-8", "quoted-printable"), ("utf-8", "base64"), (None, "8bit")]


def load(root: Path) -> list[tuple[str, bytes]]:
    """(name, octets) of every corpus message, templates wrapped three ways."""
    messages = [
        (str(p.relative_to(root)), p.read_bytes())
        for p in sorted((root / "eml").rglob("*"))
        if p.is_file()
    ]
    for path in sorted((root / "html").rglob("*")):
        if path.is_file():
            for charset, cte in VARIANTS:
                octets = html_as_message(path.read_bytes(), charset=charset, cte=cte)  # type: ignore[arg-type]
                messages.append((f"{path.relative_to(root)} [{cte}]", octets))
    return messages


def measure(
    messages: list[tuple[str, bytes]], rounds: int, work: Callable[[bytes], object]
) -> list[float]:
    """Median seconds per message over ``rounds``."""
    samples: list[list[float]] = [[] for _ in messages]
    for _ in range(rounds):
        for index, (_name, octets) in enumerate(messages):
            started = time.perf_counter()
            work(octets)
            samples[index].append(time.perf_counter() - started)
    return [statistics.median(s) for s in samples]


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def report(label: str, times: list[float], total_bytes: int) -> None:
    total = sum(times)
    print(
        f"{label:<22} median {statistics.median(times) * 1e3:8.3f} ms   "
        f"p99 {p99(times) * 1e3:8.3f} ms   max {max(times) * 1e3:8.1f} ms   "
        f"{total_bytes / total / 1e6:7.1f} MB/s   (total {total:.2f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=os.environ.get(CORPUS_ENV))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clicks", action="store_true", help="also measure with click tracking on")
    args = parser.parse_args()
    if args.corpus is None or not (args.corpus / "eml").is_dir():
        raise SystemExit(f"bench: give --corpus DIR or set {CORPUS_ENV} (a dir with eml/, html/)")
    messages = load(args.corpus)
    size = sum(len(octets) for _name, octets in messages)
    policy = RewritePolicy()
    python = sys.version.split()[0]
    print(f"{len(messages)} messages, {size / 1e6:.1f} MB, {args.rounds} rounds, Python {python}")
    parse_times = measure(
        messages, args.rounds, lambda m: email.message_from_bytes(m, policy=compat32)
    )
    rewrite_times = measure(messages, args.rounds, lambda m: rewrite(m, URL, policy))
    report("email parse (compat32)", parse_times, size)
    report("rewrite", rewrite_times, size)
    if args.clicks:
        clicks = RewritePolicy(track_clicks=True)
        click_times = measure(
            messages, args.rounds, lambda m: rewrite(m, URL, clicks, click_base_url=CLICK_BASE)
        )
        report("rewrite + clicks", click_times, size)
        wrapped = sum(
            len(rewrite(m, URL, clicks, click_base_url=CLICK_BASE).links) for _n, m in messages
        )
        median = statistics.median(click_times) / statistics.median(rewrite_times)
        tail = p99(click_times) / p99(rewrite_times)
        print(f"links wrapped: {wrapped}; clicks vs not: median x{median:.2f}, p99 x{tail:.2f}")
    outcomes = collections.Counter(
        rewrite(m, URL, policy).reason or "tracked" for _n, m in messages
    )
    print("outcomes:", ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    slowest = sorted(zip(rewrite_times, messages, strict=True), key=lambda t: t[0])[-3:]
    for seconds, (name, octets) in reversed(slowest):
        print(f"slowest: {seconds * 1e3:7.1f} ms  {len(octets) / 1e6:5.2f} MB  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
