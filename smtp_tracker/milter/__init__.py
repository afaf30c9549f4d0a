"""Milter mode: track mail inside the MTA's own pipeline (Sendmail milter protocol, via pymilter).

- :mod:`~smtp_tracker.milter.message`: one message as collected, and the milter
  actions that turn it into the rewrite's output (no sockets).
- :mod:`~smtp_tracker.milter.filter`: the callbacks libmilter calls per connection.
- :mod:`~smtp_tracker.milter.listener`: libmilter's listener in a thread beside the loop.
- :mod:`~smtp_tracker.milter.service`: ``smtp-tracker milter``, composed from the
  parts ``serve`` uses.
"""

__all__: list[str] = []  # the modules are the surface; the package exports nothing
