"""Guard several tasks with one lock: acquired by a setup task, released by a teardown that always runs."""

from __future__ import annotations

import datetime

from airflow.sdk import dag, task

from airflow_provider import SingletonOperator


@dag(schedule="@hourly", start_date=datetime.datetime(2024, 1, 1), catchup=False, tags=["singleton"])
def warehouse_sync() -> None:
    # extract and load renew the group's lease while they run; the lease only has to
    # outlast the gap between two of them (queueing, retry delays).
    with SingletonOperator(task_id="warehouse_lock", lock_name="warehouse-sync", lock_expire_seconds=600,
                           auto_renew=False, on_conflict="skip"):

        @task
        def extract() -> list[int]:
            return [1, 2, 3]

        @task
        def load(rows: list[int]) -> None:
            print(f"loaded {len(rows)} rows")

        load(extract())
    # warehouse_lock_release runs even if extract or load fails; it frees the lock only if its
    # fencing token is still the group's (XCom carries no owner token).


warehouse_sync()
