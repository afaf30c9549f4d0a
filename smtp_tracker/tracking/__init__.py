"""The tracking stage: decide whether a message is tracked, rewrite it, record it.

:mod:`~smtp_tracker.tracking.stage` runs between the SMTP server's DATA and the
upstream; :mod:`~smtp_tracker.tracking.domains` holds the per-domain policy
(``track_domains``/``skip_domains``).
"""

__all__: list[str] = []  # the modules are the surface; the package exports nothing
