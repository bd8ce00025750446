"""The guard's cost per task on a real deployment: the ``overhead`` DAG and how one run of it is read.

Shared by ``test_deployments.py`` (``test_guarded_task_overhead``) and
``benchmarks/airflow_overhead.py``. The DAG runs the same empty task twice, plain and
under ``@task.singleton`` on the ``singleton_default`` connection, one after the other,
so each run gives one guarded-minus-plain difference from one deployment at one moment.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.airflow.deployments import Deployment

__all__ = ["DAG_ID", "GUARD_STEPS", "OVERHEAD_DAG", "TaskTimes", "execute_span", "guard_steps", "run_once"]

DAG_ID = "overhead"
#: The DAG's source, formatted with ``tag`` (a per-run prefix of the lock names); it needs ``dag`` and ``task``
#: from ``airflow.sdk`` and ``datetime`` imported by the file it is put in.
OVERHEAD_DAG = '''
@dag(dag_id="overhead", schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def overhead():
    @task
    def plain():
        pass

    @task.singleton(lock_name="overhead-" + {tag!r} + "-{{{{ run_id }}}}")
    def guarded():
        pass

    plain() >> guarded()


overhead()
'''


class TaskTimes(dict[str, tuple[float, float]]):
    """Per task id: (Airflow's task duration, seconds from the end of "Pre Execute" to "Post Execute").

    ``steps``: the guarded task's ``guard_steps``.
    """

    steps: dict[str, float]

    def __init__(self) -> None:
        super().__init__()
        self.steps = {}


def execute_span(log: str) -> float:
    """Seconds from the end of "Pre Execute" to the start of "Post Execute" in a task's structured log."""
    marks: dict[str, datetime] = {}
    for event, moment in _marks(log):
        if event == "::endgroup::" and "start" not in marks:
            marks["start"] = moment
        elif event == "::group::Post Execute":
            marks["end"] = moment
    return (marks["end"] - marks["start"]).total_seconds()


#: The guarded task's log lines that bound each step of the guard, in order, and what each step holds.
GUARD_STEPS = (
    ("::endgroup::", "locked ", "execute to the core's 'locked': holder metadata, connection lookup, persister, "
                                "first connection, acquire"),
    ("locked ", "Acquired lock ", "'locked' to the provider's 'Acquired lock': the hold's bookkeeping (watchdog, "
                                  "renewal thread, metrics), one log line"),
    ("Acquired lock ", "Done. Returned value", "the callable (empty), as in the plain task"),
    ("Done. Returned value", "Released lock ", "release: one round trip, renewal stopped, metrics, two log lines"),
    ("Released lock ", "::group::Post Execute", "after the release to the end of execute"),
)


def _marks(log: str) -> list[tuple[str, datetime]]:
    marks = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("timestamp") and isinstance(entry.get("event"), str):
            marks.append((entry["event"], datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00"))))
    return marks


def guard_steps(log: str) -> dict[str, float]:
    """Milliseconds of each of ``GUARD_STEPS`` in a guarded task's log (the first line starting each mark)."""
    marks = _marks(log)

    def first(prefix: str, after: datetime | None = None) -> datetime | None:
        return next((moment for event, moment in marks
                     if event.startswith(prefix) and (after is None or moment >= after)), None)

    steps: dict[str, float] = {}
    for start, end, _ in GUARD_STEPS:
        begun = first(start)
        ended = first(end, begun) if begun else None
        if begun and ended:
            steps[f"{start.strip()} -> {end.strip()}"] = (ended - begun).total_seconds() * 1000
    return steps


def run_once(deployment: Deployment, run_id: str, timeout: float = 240) -> TaskTimes:
    """Trigger the DAG, wait for it to succeed, and read both tasks' times."""
    deployment.trigger(DAG_ID, run_id)
    run = deployment.wait_run(DAG_ID, run_id, timeout=timeout)
    if run["state"] != "success":
        raise RuntimeError(f"{deployment.name}: {DAG_ID} run {run_id} {run['state']}: "
                           f"{deployment.task_states(DAG_ID, run_id)}")
    times = TaskTimes()
    for ti in deployment.task_instances(DAG_ID, run_id):
        log = deployment.task_log(DAG_ID, run_id, ti["task_id"])
        times[ti["task_id"]] = (float(ti["duration"]), execute_span(log))
        if ti["task_id"] == "guarded":
            times.steps = guard_steps(log)
    return times
