"""Classification of open and click events: human, privacy proxy, mail proxy, scanner, unknown.

:mod:`.rules` holds the data-driven rules table, :mod:`.networks` the network
lists shipped in ``data/`` (refreshable with ``smtp-tracker networks import``),
and :mod:`.classifier` the :class:`Classifier` the store calls for each event.
"""

from smtp_tracker.classification.classifier import DEFAULT_PREFETCH_WINDOW_S, Classifier
from smtp_tracker.classification.networks import (
    NETWORKS_DIRNAME,
    NetworkList,
    NetworkListError,
    import_network_list,
    load_networks,
    packaged_names,
    parse_ip,
    parse_network_list,
)
from smtp_tracker.classification.rules import RULES, Rule

__all__ = [
    "DEFAULT_PREFETCH_WINDOW_S",
    "NETWORKS_DIRNAME",
    "RULES",
    "Classifier",
    "NetworkList",
    "NetworkListError",
    "Rule",
    "import_network_list",
    "load_networks",
    "packaged_names",
    "parse_ip",
    "parse_network_list",
]
