"""Guard several tasks with one lock: acquired by a setup task, released by a teardown that always runs."""

from __future__ import annotations

import datetime

from airflow.sdk import dag, task

from airflow_provider import SingletonOperator


@dag(schedule="@hourly", start_date=datetime.datetime(2024, 1, 1), catchup=False, tags=["singleton"])
def warehouse_sync() -> None:
    # The lease must outlast the whole group: nobody renews it between tasks.
    with SingletonOperator(task_id="warehouse_lock", lock_name="warehouse-sync", lock_expire_seconds=3600,
                           auto_renew=False, on_conflict="skip"):

        @task
        def extract() -> list[int]:
            return [1, 2, 3]

        @task
        def load(rows: list[int]) -> None:
            print(f"loaded {len(rows)} rows")

        load(extract())
    # warehouse_lock_release runs even if extract or load fails, and frees the lock by owner token.


warehouse_sync()
