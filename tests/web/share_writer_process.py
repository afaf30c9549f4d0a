"""The other process of the shared-data-directory test: the relay side.

Usage: ``python share_writer_process.py DATA_DIR STOP_FILE FIRST MIN_MORE``

Writes messages 0..FIRST-1, prints ``ready``, then keeps writing messages
(one transaction each) until STOP_FILE exists and at least MIN_MORE more were
written, prints the total and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

from web_helpers import make_record  # type: ignore[import-not-found,unused-ignore]  # run as a script

from smtp_tracker.store import SqliteDatabase

MAX_MESSAGES = 200_000  # a bound, in case the stop file never comes


def main() -> int:
    data_dir, stop_file = Path(sys.argv[1]), Path(sys.argv[2])
    first, min_more = int(sys.argv[3]), int(sys.argv[4])
    with SqliteDatabase.open(data_dir) as db:
        for i in range(first):
            db.record_message(make_record(i))
        print("ready", flush=True)
        i = first
        while i < MAX_MESSAGES and (i < first + min_more or not stop_file.exists()):
            db.record_message(make_record(i))
            i += 1
    print(i, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
