"""Run each day's export once across deployments, even when one scheduler is minutes late.

The lock is named after the slot (``{{ ds }}``) and held for an hour after it was
taken, released or not (``min_hold_seconds``, judged by the store's clock). A second
deployment that starts the same logical date within that hour skips it, and its log
says which deployment ran the slot and when. Set up the store once in every deployment:
``AIRFLOW_CONN_SINGLETON_DEFAULT='{"conn_type": "singleton", "password": "redis://redis:6379/0"}'``.
"""

from __future__ import annotations

import datetime

from airflow.sdk import dag, task


@dag(schedule="@daily", start_date=datetime.datetime(2024, 1, 1), catchup=False, tags=["singleton"])
def daily_export() -> None:
    @task.singleton(lock_name="{{ dag.dag_id }}.export.{{ ds }}", min_hold_seconds=3600, on_conflict="skip")
    def export(ds: str | None = None) -> str:
        print(f"exporting {ds}")
        return str(ds)

    export()


daily_export()
