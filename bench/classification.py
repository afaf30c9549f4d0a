"""Benchmark open classification, network-list lookups and the event limiter.

Usage::

    python bench/classification.py [--events 200000] [--big-list 287000]

Measures, on this host, single-threaded:

* the :class:`~smtp_tracker.classification.Classifier` per event over a mix
  of real User-Agents and addresses (packaged lists), in microseconds;
* building a list the size of Apple's full Private Relay egress file
  (``--big-list`` synthetic CSV rows, /27../31 and /56../64 like the real
  ones): parse and compile time and the memory it holds;
* one lookup in that list (bisect over merged integer ranges) against the
  obvious alternative, ``any(address in network for network in networks)``
  with :mod:`ipaddress` objects, on a 1,000-network slice (the naive way over
  287,000 networks would take seconds per lookup);
* the classifier with the big list in place;
* :meth:`~smtp_tracker.web.public.limits.EventLimiter.allow` per call, and the memory
  of its tables full (100,000 keys each).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

from smtp_tracker.classification import (
    Classifier,
    NetworkList,
    import_network_list,
    load_networks,
    parse_ip,
    parse_network_list,
)
from smtp_tracker.store.records import EventContext
from smtp_tracker.web.public.limits import EventLimiter

RELAYED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

MIX: list[tuple[str | None, str]] = [
    (
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
        "66.249.84.22",
    ),
    ("Mozilla/5.0", "172.224.226.33"),
    ("Mozilla/5.0", "198.51.100.7"),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.6.0", "192.0.2.1"),
    ("Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.4266; Pro)", "2001:db8::5"),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 10_1_1 like Mac OS X) AppleWebKit/602.2.14 "
        "(KHTML, like Gecko) Mobile/14B100",
        "203.0.113.4",
    ),
    ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", "203.0.113.9"),
    ("Barracuda Sentinel (EE)", "198.51.100.8"),
    ("python-requests/2.32.3", "198.51.100.9"),
    (None, "198.51.100.10"),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/120.0.0.0 Safari/537.36",
        "40.107.22.12",
    ),
]


def per_call_us(function: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """Median over *repeats* of the time per call, in microseconds."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        runs.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(runs)


def held_bytes(network: NetworkList) -> int:
    """Bytes held by a compiled list's ranges (arrays, lists and their ints)."""
    total = 0
    for part in (network._v4_starts, network._v4_ends):
        total += sys.getsizeof(part)
    for values in (network._v6_starts, network._v6_ends):
        total += sys.getsizeof(values) + sum(sys.getsizeof(v) for v in values)
    return total


def naive_contains(address: object, networks: list[ipaddress.IPv4Network]) -> bool:
    """The obvious lookup: test every network object in turn."""
    return any(address in network for network in networks)


def classify_all(classifier: Classifier, events: list[EventContext]) -> float:
    """Microseconds per event (median of 5 passes over *events*)."""
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for event in events:
            classifier(event)
        runs.append((time.perf_counter() - started) / len(events) * 1e6)
    return statistics.median(runs)


def synthetic_egress_csv(rows: int, rng: random.Random) -> str:
    """Rows shaped like Apple's egress-ip-ranges.csv: half IPv4 /27-/31, half IPv6 /56-/64."""
    lines = []
    for i in range(rows):
        if i % 2:
            length = rng.randrange(27, 32)
            address = ipaddress.IPv4Address(rng.getrandbits(32))
            network = ipaddress.IPv4Network((address, length), strict=False)
        else:
            length = rng.choice((56, 60, 64))
            address6 = ipaddress.IPv6Address((0x2A02 << 112) | rng.getrandbits(112))
            network = ipaddress.IPv6Network((address6, length), strict=False)
        lines.append(f"{network},US,US-CA,San Jose,")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events classified")
    parser.add_argument("--big-list", type=int, default=287_000, help="rows of the big list")
    args = parser.parse_args()
    rng = random.Random(20240501)

    packaged = load_networks()
    classifier = Classifier(packaged, prefetch_window_s=30)
    events = []
    for i in range(args.events):
        user_agent, address = MIX[i % len(MIX)]
        after = 5.0 if i % 17 == 0 else 3600.0
        events.append(
            EventContext(
                kind="open" if i % 5 else "click",
                at=RELAYED + timedelta(seconds=after),
                client_address=address,
                user_agent=user_agent,
                relayed_at=RELAYED,
            )
        )
    print(f"classifier, packaged lists ({sum(n.count for n in packaged.values())} networks):")
    print(f"  {classify_all(classifier, events):.2f} us per event ({len(events)} events, mixed)")

    with TemporaryDirectory() as directory:
        csv = Path(directory) / "egress-ip-ranges.csv"
        csv.write_text(synthetic_egress_csv(args.big_list, rng))
        started = time.perf_counter()
        big = import_network_list(Path(directory), "apple-mpp", csv)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        reloaded = load_networks(Path(directory))["apple-mpp"]
        load_s = time.perf_counter() - started
        print(f"big list, {big.count} networks (synthetic, shaped like Apple's egress file):")
        print(f"  import (validate, write, re-read): {build_s:.2f} s")
        print(f"  load at start (all lists): {load_s:.2f} s")
        print(f"  memory held by the compiled list: {held_bytes(reloaded) / 1e6:.1f} MB")

        probes = [parse_ip(str(ipaddress.IPv4Address(rng.getrandbits(32)))) for _ in range(1000)]
        probe_iter = iter(probes * 1000)
        lookup = per_call_us(lambda: reloaded.contains(next(probe_iter)), 100_000)
        print(f"  lookup (bisect): {lookup:.2f} us")

        slice_text = "\n".join(csv.read_text().splitlines()[:1000])
        small = parse_network_list(slice_text, name="s", origin="s")
        objects = [ipaddress.ip_network(line.split(",")[0]) for line in slice_text.splitlines()]
        addresses = [ipaddress.ip_address(str(ipaddress.IPv4Address(p[1]))) for p in probes if p]
        address_iter = iter(addresses * 100)
        naive = per_call_us(lambda: naive_contains(next(address_iter), objects), 2000)
        probe_iter = iter(probes * 1000)
        fast = per_call_us(lambda: small.contains(next(probe_iter)), 100_000)
        print(
            f"  1,000-network slice: bisect {fast:.2f} us, naive ipaddress scan {naive:.0f} us "
            f"({naive / fast:.0f}x)"
        )

        lists = dict(packaged, **{"apple-mpp": reloaded})
        with_big = Classifier(lists, prefetch_window_s=30)
        print(f"classifier with the big list: {classify_all(with_big, events):.2f} us per event")

    clock_value = [0.0]
    limiter = EventLimiter(clock=lambda: clock_value[0])
    tokens = [f"{i:023d}" for i in range(200_000)]
    token_iter = iter(tokens * 3)
    allow = per_call_us(lambda: limiter.allow(next(token_iter), "192.0.2.1"), 100_000, repeats=3)
    print(f"limiter: allow() {allow:.2f} us per call")
    gc.collect()
    tracemalloc.start()
    full = EventLimiter()
    for i in range(100_000):
        full.allow(f"{i:023d}", f"2001:db8::{i:x}")
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  tables full ({full.keys} keys): {held / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
