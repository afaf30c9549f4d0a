"""``python -m smtp_tracker``: the same as the ``smtp-tracker`` command."""

from smtp_tracker.cli import main

raise SystemExit(main())
