"""The :class:`Classifier`: the store's ``EventClassifier``, judging each open and click.

It computes the *signals* of an
:class:`~smtp_tracker.store.records.EventContext`: every rule of
:data:`~.rules.RULES` that holds, the seconds since the relay and the network
lists the client address is in (:class:`Signals`).  The verdict and reason are
those of the first signal in table order (``"ua:GoogleImageProxy"``,
``"net:apple-mpp"``, ``"timing:<30s after relay"``); the signals go into the
store with the event, so ``smtp-tracker reclassify`` can judge it again.
It is pure and quick (no I/O; about 15 microseconds an event, signals and
their JSON included, on the development host: ``bench/classification.py``),
so the store calls it inside its write transaction.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smtp_tracker.classification.networks import NetworkList, ParsedIP, parse_ip
from smtp_tracker.classification.rules import (
    NO_MATCH,
    PREFETCH_WINDOW_PLACEHOLDER,
    RULES,
    Rule,
)
from smtp_tracker.store.records import EventContext, Judgement, Verdict

__all__ = ["DEFAULT_PREFETCH_WINDOW_S", "Classifier", "Signals"]

#: Default of the ``prefetch_window_s`` key: fetches this soon after the relay are scans.
DEFAULT_PREFETCH_WINDOW_S = 30.0

#: How many distinct User-Agents' matching rules a classifier remembers.
_AGENT_CACHE_SIZE = 4096


@dataclass(frozen=True, kw_only=True, slots=True)
class Signals:
    """What an event was judged on, stored with it as JSON (``opens.signals``).

    :param rules: the reason of every rule that held, in table order; the
        first decided the verdict (empty: ``no-rule``).
    :param elapsed_s: seconds from the message's relay to the event (negative
        with clock skew), to the millisecond.
    :param networks: the network lists the client address was in, sorted.
    """

    rules: tuple[str, ...]
    elapsed_s: float
    networks: tuple[str, ...]

    def to_json(self) -> str:
        """``{"rules": [...], "elapsed_s": 4.0, "networks": [...]}``, compact."""
        return json.dumps(
            {
                "rules": list(self.rules),
                "elapsed_s": self.elapsed_s,
                "networks": list(self.networks),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> Signals | None:
        """The signals :meth:`to_json` wrote, or None for None or anything else."""
        if not text:
            return None
        try:
            data: Any = json.loads(text)
            return cls(
                rules=tuple(str(r) for r in data["rules"]),
                elapsed_s=float(data["elapsed_s"]),
                networks=tuple(str(n) for n in data["networks"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: Rule
    reason: str
    network: NetworkList | None


class Classifier:
    """Judges open and click events by the rules table.

    :param networks: the network lists by name (:func:`~.networks.load_networks`);
        every list a rule names must be there.
    :param prefetch_window_s: events less than this many seconds after the
        message's relay are ``scanner`` (rule ``timing:...``), unless an
        earlier rule decided; > 0.
    :param rules: the table (default :data:`~.rules.RULES`).
    :raises ValueError: when *prefetch_window_s* is not positive or a rule
        names a list that *networks* lacks.

    Not thread-safe (it keeps a cache): the store calls it from its one writer thread.
    """

    def __init__(
        self,
        networks: Mapping[str, NetworkList],
        prefetch_window_s: float = DEFAULT_PREFETCH_WINDOW_S,
        *,
        rules: Sequence[Rule] = RULES,
    ) -> None:
        if not prefetch_window_s > 0:
            raise ValueError("prefetch_window_s must be a positive number of seconds")
        missing = sorted({r.network for r in rules if r.network and r.network not in networks})
        if missing:
            raise ValueError(f"no network list named {', '.join(missing)}")
        self.prefetch_window_s = float(prefetch_window_s)
        window = f"{self.prefetch_window_s:g}"
        self._rules = tuple(
            _CompiledRule(
                rule=rule,
                reason=rule.name.replace(PREFETCH_WINDOW_PLACEHOLDER, window),
                network=networks[rule.network] if rule.network else None,
            )
            for rule in rules
        )
        self._agent_cache: OrderedDict[str, tuple[_CompiledRule, ...]] = OrderedDict()
        self._verdicts: dict[str, Verdict] = {c.reason: c.rule.verdict for c in self._rules}
        self._lists = {
            name: networks[name] for name in sorted({r.network for r in rules if r.network})
        }

    def __call__(self, event: EventContext) -> Judgement:
        """The verdict, reason and signals of *event*.

        The verdict is that of the first rule that holds; ``("unknown",
        "no-rule")`` when none does.  The signals (:meth:`signals`) are
        returned as JSON for the store.
        """
        signals = self.signals(event)
        if not signals.rules:
            return Judgement("unknown", NO_MATCH, signals.to_json())
        return Judgement(self._verdicts[signals.rules[0]], signals.rules[0], signals.to_json())

    def verdict_of(self, signals: Signals) -> tuple[Verdict, str]:
        """``(verdict, reason)`` decided by *signals* (the first rule named that this table has)."""
        for reason in signals.rules:
            verdict = self._verdicts.get(reason)
            if verdict is not None:
                return verdict, reason
        return "unknown", NO_MATCH

    def signals(self, event: EventContext) -> Signals:
        """Every rule that holds for *event*, the time since the relay, the lists it is in.

        The client address is looked up in every list a rule names, unless
        *event* carries ``networks`` (the lists found when it was recorded,
        for an address the store could not keep), which are then taken as is.
        """
        user_agent = event.user_agent.strip() if event.user_agent else ""
        elapsed_s = (event.at - event.relayed_at).total_seconds()
        early = elapsed_s < self.prefetch_window_s
        if event.networks is not None:
            hits = frozenset(event.networks) & self._lists.keys()
        else:
            ip: ParsedIP | None = parse_ip(event.client_address)
            hits = frozenset(name for name, nets in self._lists.items() if nets.contains(ip))
        matched = tuple(
            compiled.reason
            for compiled in self._rules_for_agent(user_agent)
            if event.kind in compiled.rule.kinds
            and (early or not compiled.rule.within_prefetch_window)
            and (compiled.rule.network is None or compiled.rule.network in hits)
        )
        return Signals(rules=matched, elapsed_s=round(elapsed_s, 3), networks=tuple(sorted(hits)))

    def _rules_for_agent(self, user_agent: str) -> tuple[_CompiledRule, ...]:
        """The rules whose User-Agent conditions *user_agent* meets, in table order.

        The regular expressions are most of a classification's cost, and a
        relay sees few distinct User-Agents (proxies, a few clients), so the
        answer is kept for the last :data:`_AGENT_CACHE_SIZE` of them.
        """
        cached = self._agent_cache.get(user_agent)
        if cached is not None:
            self._agent_cache.move_to_end(user_agent)
            return cached
        matching = tuple(
            compiled
            for compiled in self._rules
            if not (compiled.rule.no_user_agent and user_agent)
            and (
                compiled.rule.user_agent is None
                or (user_agent and compiled.rule.user_agent.search(user_agent))
            )
        )
        self._agent_cache[user_agent] = matching
        if len(self._agent_cache) > _AGENT_CACHE_SIZE:
            self._agent_cache.popitem(last=False)
        return matching
