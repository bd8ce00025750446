"""One process running a SERIALIZABLE Prefect transaction through ``SingletonLockManager``.

    python txn_worker.py URL KEY RESULT_DIR [--hold-until FILE]

Prints JSON lines: ``acquiring`` (with whether another holder had the record
locked at that moment), ``entered`` (whether the record was already committed),
and ``done`` with the value read or computed. With ``--hold-until`` the
computing process keeps the transaction open until FILE exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.transactions import IsolationLevel, transaction

from prefect_blocks import SingletonLockManager


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


class ReportingLockManager(SingletonLockManager):
    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None):  # type: ignore[no-untyped-def]
        say(event="acquiring", was_locked=self.is_locked(key))
        return super().acquire_lock(key, holder, acquire_timeout, hold_timeout)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("result_dir")
    parser.add_argument("--hold-until")
    options = parser.parse_args()
    store = ResultStore(lock_manager=ReportingLockManager(options.url), result_storage=LocalFileSystem(basepath=options.result_dir))
    computed = False
    with transaction(key=options.key, isolation_level=IsolationLevel.SERIALIZABLE, store=store) as txn:
        committed = txn.is_committed()
        say(event="entered", committed=committed)
        if committed:
            value = txn.read().result
        else:
            if options.hold_until:
                deadline = time.monotonic() + 120
                while not os.path.exists(options.hold_until):
                    if time.monotonic() > deadline:
                        return 2
                    time.sleep(0.05)
            value = {"computed_by": os.getpid()}
            txn.stage(value)
            computed = True
    say(event="done", computed=computed, value=value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
