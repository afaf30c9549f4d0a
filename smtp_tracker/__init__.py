"""smtp-tracker: an in-step SMTP relay for Postfix with open tracking.

Postfix hands each outgoing message to smtp-tracker through ``transport_maps``;
smtp-tracker forwards the envelope and the data to the upstream smarthost as
they arrive, and answers Postfix with the upstream's own reply, so nothing is
queued here.
"""

__all__ = ["__version__"]

__version__ = "0.1.0.dev0"
