"""DKIM for tracked mail: the signer's keys (KeyTable, SigningTable) and re-signing.

``dkim_policy = "resign"``: a message whose DKIM signatures are all by keys we
hold and verify is re-signed over the rewritten octets (:class:`Resigner`).
"""

from smtp_tracker.dkim.keys import DkimKey, DkimKeyError, load_key, parse_key
from smtp_tracker.dkim.resign import Check, Resigner, ResignError
from smtp_tracker.dkim.tables import (
    Keyring,
    SigningEntry,
    describe_key,
    load_keyring,
)

__all__ = [
    "Check",
    "DkimKey",
    "DkimKeyError",
    "Keyring",
    "ResignError",
    "Resigner",
    "SigningEntry",
    "describe_key",
    "load_key",
    "load_keyring",
    "parse_key",
]
