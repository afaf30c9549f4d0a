"""``GET /metrics`` read as Prometheus samples, for the tests of every ``/metrics`` listener."""

from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

#: the log lines of ``serve --workers N`` naming each ``/metrics`` port: a worker's
#: (its number, its port) and the supervisor's (its port), which sums the workers'
WORKER_METRICS = re.compile(r"\[(\d+)\]: serving metrics on http://127\.0\.0\.1:(\d+)/metrics")
SUPERVISOR_METRICS = re.compile(r"supervisor: serving metrics on http://127\.0\.0\.1:(\d+)/metrics")

#: each sample's value by (its name, its labels)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True)
class Scrape:
    """One answer of ``/metrics``: its samples, content type and metric family names."""

    samples: Samples
    content_type: str
    families: list[str]

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels``; 0 when there is none."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    """``GET http://HOST:PORT/metrics``, which must answer 200, parsed by prometheus_client."""
    url = f"http://{host}:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
        content_type = response.headers["Content-Type"]
    samples: Samples = {}
    families = []
    for family in text_string_to_metric_families(text):
        families.append(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, content_type, families)
