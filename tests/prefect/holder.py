"""A second process holding a lock, as another deployment or a cron job would.

    python holder.py URL NAME [--ttl S] [--takeover] [--metadata KEY=VALUE ...]

Prints one JSON line once it holds the lock (or ``{"acquired": false}`` and exits 3),
then holds it until a line or EOF arrives on stdin, and releases. ``--takeover``
force-releases the current holder first, as an administrator would.
"""

from __future__ import annotations

import argparse
import json
import sys

from singleton_integrations import Singleton, persisters


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("name")
    parser.add_argument("--ttl", type=float, default=60.0)
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
    print(json.dumps({"acquired": True, "fencing_token": lock.fencing_token, "pid": lock.record.pid}), flush=True)
    sys.stdin.readline()
    lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
