"""Run a DAG defined outside the DAGs folder with ``dag.test()``; no side effects on import (children use it too)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["history", "run_dag", "run_dag_instances"]


def run_dag(dag: Any) -> dict[str, Any]:
    """Run ``dag`` with ``dag.test()`` and return its task instances by task id (one per task: unmapped)."""
    return {ti.task_id: ti for ti in run_dag_instances(dag)}


def run_dag_instances(dag: Any) -> list[Any]:
    """Run ``dag`` with ``dag.test()`` and return all its task instances, mapped ones included.

    ``dag.test()`` needs the DAG serialized in the metadata DB; test DAGs live in
    test modules, not the DAGs folder, so they are written there first.
    """
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"], collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    run = dag.test()
    return list(run.get_task_instances())


def history(ti: Any) -> list[str]:
    """The states of a task instance's earlier tries, oldest first (e.g. ``["up_for_retry"]``)."""
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(TaskInstanceHistory).where(
                TaskInstanceHistory.dag_id == ti.dag_id, TaskInstanceHistory.run_id == ti.run_id,
                TaskInstanceHistory.task_id == ti.task_id,
            ).order_by(TaskInstanceHistory.try_number)
        ).all()
        return [str(row.state) for row in rows]
