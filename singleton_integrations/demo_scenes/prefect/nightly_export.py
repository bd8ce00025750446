"""A Prefect flow that ends "Skipped" while anyone else holds the ``nightly-export`` lock.

The same lock name guards the cron job, the Python worker and the Airflow DAG in
``examples/``; the store comes from ``SINGLETON_URL`` (default: the SQLite file in
your state directory). Run it against Prefect's ephemeral server:

    SINGLETON_URL=sqlite:////tmp/locks.sqlite3 python -m singleton_integrations.demo_scenes.prefect.nightly_export
"""

from __future__ import annotations

import json
import os
import time

from prefect import flow

from prefect_blocks import SingletonBlock, current_lock, singleton

LOCK_NAME = os.environ.get("SINGLETON_LOCK_NAME", "nightly-export")
block = SingletonBlock(url=os.environ.get("SINGLETON_URL", "sqlite://"), lock_expire_seconds=120)


@flow(name="nightly-export")
@singleton(block, lock_name=LOCK_NAME, on_conflict="skip")
def nightly_export() -> int:
    lock = current_lock()
    assert lock is not None
    print(f"exporting under {LOCK_NAME!r} with fencing token {lock.fencing_token}")
    return lock.fencing_token


if __name__ == "__main__":
    state = nightly_export(return_state=True)
    # One machine-readable line for the demo; the state is Prefect's own.
    print("SINGLETON_DEMO_RESULT " + json.dumps(
        {"t": time.time(), "type": state.type.value, "name": state.name, "message": state.message}))
