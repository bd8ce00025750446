"""At most 2 warehouse exports at once, whichever deployment, Prefect server, Airflow DAG or cron job starts them.

    SINGLETON_URL=redis://127.0.0.1:6379/0 python examples/prefect/limit_flow.py eu us apac

``export_region`` takes one of the 2 holds of ``warehouse-export`` (``limit=2``), waiting
for one when both are taken (``on_conflict="wait"``). The flow maps it over the regions:
2 run at once and the third waits. A cron job's ``singleton run --limit 2 warehouse-export
-- ...`` or an Airflow task's ``@task.singleton(limit=2, lock_name="warehouse-export")`` on
the same store takes holds from the same 2. Each hold is a lease: a run that crashes frees
its hold when the lease ends, never later.
"""

from __future__ import annotations

import os
import sys
import time

from prefect import flow, task

from prefect_blocks import SingletonBlock, current_lock, singleton

block = SingletonBlock(url=os.environ.get("SINGLETON_URL", "sqlite://"), lock_expire_seconds=120)


@task
@singleton(block=block, lock_name="warehouse-export", limit=2, on_conflict="wait", wait_timeout=600)
def export_region(region: str) -> str:
    lock = current_lock()
    holds = lock.holders()  # every live hold of the name, this one included
    time.sleep(0.5)  # the export
    return f"{region} exported with fencing token {lock.fencing_token}; {len(holds)} of {lock.limit} holds taken"


@flow(name="warehouse-exports")
def warehouse_exports(regions: list[str]) -> list[str]:
    return [future.result() for future in export_region.map(regions)]


if __name__ == "__main__":
    for line in warehouse_exports(sys.argv[1:] or ["eu", "us", "apac"]):
        print(line)
