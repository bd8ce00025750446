"""One nightly load at a time across every Airflow deployment that shares the lock store.

Another deployment (or a cron job) holding ``nightly_load.load`` makes this task
*skipped*, and its log names the holder: its deployment, DAG, run, task, host and
since when. Set up the store once:
``AIRFLOW_CONN_SINGLETON_DEFAULT='{"conn_type": "singleton", "password": "redis://127.0.0.1:6379/0"}'``.
"""

from __future__ import annotations

import datetime

from airflow.sdk import dag, task


@dag(schedule="@daily", start_date=datetime.datetime(2024, 1, 1), catchup=False, tags=["singleton"])
def nightly_load() -> None:
    @task.singleton(lock_expire_seconds=600, auto_renew=True)  # lock name: "nightly_load.load"
    def load(singleton=None) -> int:
        # Pass the fencing token to the system you write to, so a stale writer can be refused.
        print(f"loading with fencing token {singleton.fencing_token}")
        return singleton.fencing_token

    @task.singleton(lock_name="{{ dag.dag_id }}-report", on_conflict="wait", wait_timeout=3600, deferrable=True)
    def report(token: int) -> None:
        print(f"report after load {token}")

    report(load())


nightly_load()
