"""At most 2 exports into the warehouse at once, whichever deployment (or cron job, or Prefect flow) starts them.

Every exporter takes the lock ``warehouse-export`` with ``limit=2``: up to 2 hold it at
once, each with a lease and fencing token of its own. Here 5 mapped instances share
it: 2 run, the other 3 defer (holding no worker slot) and resume as soon as any of
the 2 releases. A pool would count only this deployment's tasks; the limit counts
every holder of the name in the shared store. Set up the store once in every deployment:
``AIRFLOW_CONN_SINGLETON_DEFAULT='{"conn_type": "singleton", "password": "redis://redis:6379/0"}'``.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from airflow.sdk import dag, task


@dag(schedule="@hourly", start_date=datetime.datetime(2024, 1, 1), catchup=False, tags=["singleton"])
def warehouse_exports() -> None:
    # retries=1: Airflow 3.3.2 can fail a deferred task whose trigger fires within seconds of its
    # deferral (apache/airflow#67287); the retry waits again (see docs/airflow.md).
    @task.singleton(lock_name="warehouse-export", limit=2, on_conflict="wait", deferrable=True,
                    wait_timeout=datetime.timedelta(hours=1), lock_expire_seconds=300, retries=1)
    def export(table: str, singleton: Any = None) -> str:
        print(f"exporting {table} (fencing token {singleton.fencing_token}); holders now: {len(singleton.holders())}")
        time.sleep(5)
        return table

    export.expand(table=["orders", "customers", "invoices", "payments", "shipments"])


warehouse_exports()
