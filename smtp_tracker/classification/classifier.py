"""The :class:`Classifier`: the store's ``EventClassifier``, judging each open and click.

It applies :data:`~.rules.RULES` in order to an
:class:`~smtp_tracker.store.records.EventContext` and returns
``(verdict, reason)``, the reason being the matching rule's name
(``"ua:GoogleImageProxy"``, ``"net:apple-mpp"``, ``"timing:<30s after relay"``).
It is pure and quick (no I/O, a few microseconds, see ``bench/classification.py``),
so the store calls it inside its write transaction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smtp_tracker.classification.networks import NetworkList, ParsedIP, parse_ip
from smtp_tracker.classification.rules import (
    NO_MATCH,
    PREFETCH_WINDOW_PLACEHOLDER,
    RULES,
    Rule,
)
from smtp_tracker.store.records import EventContext, Verdict

__all__ = ["DEFAULT_PREFETCH_WINDOW_S", "Classifier"]

#: Default of the ``prefetch_window_s`` key: fetches this soon after the relay are scans.
DEFAULT_PREFETCH_WINDOW_S = 30.0

#: How many distinct User-Agents' matching rules a classifier remembers.
_AGENT_CACHE_SIZE = 4096


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

    def __call__(self, event: EventContext) -> tuple[Verdict, str]:
        """``(verdict, reason)`` for *event*; ``("unknown", "no-rule")`` if no rule matches."""
        user_agent = event.user_agent.strip() if event.user_agent else ""
        ip: ParsedIP | None = None
        parsed = False  # the address is parsed only if a network rule is reached
        elapsed_s = (event.at - event.relayed_at).total_seconds()
        early = elapsed_s < self.prefetch_window_s
        for compiled in self._rules_for_agent(user_agent):
            rule = compiled.rule
            if event.kind not in rule.kinds:
                continue
            if rule.within_prefetch_window and not early:
                continue
            if compiled.network is not None:
                if not parsed:
                    ip, parsed = parse_ip(event.client_address), True
                if not compiled.network.contains(ip):
                    continue
            return rule.verdict, compiled.reason
        return "unknown", NO_MATCH

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
