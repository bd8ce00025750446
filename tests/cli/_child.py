"""The command the CLI tests run under a lock: it reports, waits for a go file, and exits as told.

Usage: ``_child.py DIR LABEL [--exit N] [--trap]``. It writes ``DIR/LABEL.ready``
(its pid and fencing token), waits until ``DIR/go`` exists, then exits ``N``.
With ``--trap`` a SIGTERM, SIGINT or SIGHUP is written to ``DIR/LABEL.signal``
and the process exits 7 instead.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    directory, label = Path(sys.argv[1]), sys.argv[2]
    code = int(sys.argv[sys.argv.index("--exit") + 1]) if "--exit" in sys.argv else 0
    if "--trap" in sys.argv:
        def on_signal(signum: int, frame: object) -> None:
            (directory / f"{label}.signal").write_text(signal.Signals(signum).name)
            os._exit(7)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, on_signal)
    ready = directory / f"{label}.ready"
    ready.with_suffix(".tmp").write_text(f"{os.getpid()} {os.environ.get('SINGLETON_FENCING_TOKEN', '')}")
    ready.with_suffix(".tmp").rename(ready)  # atomic: readers never see half a file
    deadline = time.monotonic() + 120  # never outlive a broken test by much
    while not (directory / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return code


if __name__ == "__main__":
    sys.exit(main())
