"""A cached task computed once across hosts: Prefect's SERIALIZABLE isolation on our lock store.

    SINGLETON_URL=redis://127.0.0.1:6379/0 python examples/prefect/transaction_flow.py

Workers on several hosts that run ``daily_totals`` for the same day compute it
once; the others wait for the lock, then read the cached result. Results must be
stored where every host can read them (here a local folder, for the example).
"""

from __future__ import annotations

import os
import tempfile

from prefect import flow, task
from prefect.cache_policies import INPUTS
from prefect.filesystems import LocalFileSystem

from prefect_blocks import SingletonBlock

block = SingletonBlock(url=os.environ.get("SINGLETON_URL", "sqlite://"))
storage_folder = os.environ.get("RESULTS_FOLDER", os.path.join(tempfile.gettempdir(), "singleton-example-results"))


def build_task():
    storage = LocalFileSystem(basepath=storage_folder)
    storage.save("singleton-example-results", overwrite=True)

    @task(
        cache_policy=INPUTS.configure(isolation_level="SERIALIZABLE", lock_manager=block.get_lock_manager()),
        persist_result=True,
        result_storage=storage,
    )
    def daily_totals(day: str) -> dict[str, int]:
        print(f"computing totals for {day}")
        return {"orders": 42}

    return daily_totals


@flow(name="daily-totals")
def report(day: str = "2026-01-01"):
    daily_totals = build_task()
    first = daily_totals(day, return_state=True)
    again = daily_totals(day, return_state=True)  # a second worker: served from the cache
    return first.name, again.name, again.result()


if __name__ == "__main__":
    print(report())
