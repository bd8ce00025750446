"""An Airflow DAG whose export task yields to any other holder of the ``nightly-export`` lock.

The cron job (``examples/cron/nightly-export.sh``), the Python worker and the Prefect
flow next to this file use the same lock name, so at most one of them exports at a time.
Point the ``singleton_default`` connection at the shared store, then run the DAG once:

    export AIRFLOW_CONN_SINGLETON_DEFAULT='{"conn_type": "singleton", "extra": {"url": "sqlite:////tmp/locks.sqlite3"}}'
    python -m singleton_integrations.demo_scenes.airflow.nightly_export      # dag.test(): prints the task's final state
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime

from airflow.sdk import dag, task

LOCK_NAME = os.environ.get("SINGLETON_LOCK_NAME", "nightly-export")


@dag(schedule="@daily", start_date=datetime(2026, 1, 1), catchup=False, tags=["singleton"])
def nightly_export() -> None:
    @task.singleton(lock_name=LOCK_NAME, on_conflict="skip", lock_expire_seconds=120)
    def export(singleton=None) -> int:
        token = singleton.fencing_token
        print(f"exporting under {LOCK_NAME!r} with fencing token {token}")
        return token

    export()


nightly_export_dag = nightly_export()

if __name__ == "__main__":
    run = nightly_export_dag.test()
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    # One machine-readable line for the demo; the states are Airflow's own.
    print("SINGLETON_DEMO_RESULT " + json.dumps({"t": time.time(), "dag_run": str(run.state), "tasks": states}))
