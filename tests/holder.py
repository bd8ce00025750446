"""Another deployment (or a cron job) holding a lock, in its own process; shared by the Airflow and Prefect tests.

    python holder.py URL NAME [--ttl S] [--crash] [--takeover] [--metadata KEY=VALUE ...]

Prints one JSON line once it holds the lock ({"acquired": false} and exit 3 if it
cannot), then: ``--crash`` exits at once without releasing (the lease runs out by
itself); otherwise it releases when a line or EOF arrives on stdin (a line
``later S`` releases S seconds after it arrives). ``--takeover`` force-releases the current holder first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from singleton_integrations import Singleton, persisters


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("name")
    parser.add_argument("--ttl", type=float, default=120.0)
    parser.add_argument("--crash", action="store_true")
    parser.add_argument("--takeover", action="store_true")
    parser.add_argument("--metadata", nargs="*", default=[])
    options = parser.parse_args()
    store = persisters.from_url(options.url)
    if options.takeover:
        store.force_release(options.name)
    metadata = dict(item.split("=", 1) for item in options.metadata)
    lock = Singleton(options.name, store, lock_expire_seconds=options.ttl, metadata=metadata)
    if not lock.lock():
        print(json.dumps({"acquired": False}), flush=True)
        return 3
    print(json.dumps({"acquired": True, "fencing_token": lock.fencing_token, "pid": os.getpid()}), flush=True)
    if options.crash:
        os._exit(0)  # no release, no atexit: the record stays until its lease ends
    line = sys.stdin.readline().split()
    if len(line) == 2 and line[0] == "later":
        time.sleep(float(line[1]))
    lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
