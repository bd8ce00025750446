"""``limit=2`` on a real Airflow deployment: 5 mapped task instances on one lock name run at most 2 at a time.

One deployment (api-server, scheduler, dag-processor, triggerer, LocalExecutor; see
``deployments.py``) runs a DAG per lock store that keeps several holds. Each DAG maps
one ``@task.singleton(limit=2, on_conflict="wait")`` over 5 inputs with a fixed lock
name; the instances that find both holds taken wait in their worker, woken by any
release. Each instance appends its start and end, taken while it holds its slot, to a
log outside the lock (one ``O_APPEND`` write per line); the test reads the log: never
more than 2 at once, 2 reached, and all 5 ran.

The wait blocks in the worker rather than deferring: Airflow 3.3.2's scheduler fails a
deferred task whose trigger fires within seconds of its deferral when it drains the
worker's exit event late (apache/airflow#67287, #72716), which a limit's short waits
meet often. The deferred wait's wake-up on any release is tested in ``test_limit.py``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from singleton_integrations import persisters
from tests.airflow.deployments import Deployment

pytestmark = [pytest.mark.airflow_deployment, pytest.mark.timeout(900)]

TAG = uuid.uuid4().hex[:8]
HOLD = 4  # seconds each instance holds its slot: long enough that the first two overlap
INSTANCES = 5
LIMIT = 2

DAG_FILE = '''
import os
import time
from datetime import datetime

from airflow.sdk import dag, task

LOG = {log!r}


def note(line):
    descriptor = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, (line + "\\n").encode())
    finally:
        os.close(descriptor)


def limited(store):
    @dag(dag_id=f"limited_{{store}}", schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
    def build():
        @task.singleton(lock_name=f"limited-{tag}-{{store}}", limit={limit}, on_conflict="wait", deferrable=False,
                        poll_interval=1, wait_timeout=600, lock_expire_seconds=60, singleton_conn_id=f"locks_{{store}}")
        def work(x, ti=None, singleton=None):
            note(f"{{store}} start {{ti.map_index}} {{time.time()!r}} {{singleton.fencing_token}}")
            time.sleep({hold})
            note(f"{{store}} end {{ti.map_index}} {{time.time()!r}} {{singleton.fencing_token}}")

        work.expand(x=list(range({instances})))

    return build()


for store in {stores!r}:
    globals()[f"limited_{{store}}"] = limited(store)
'''


def _stores() -> list[str]:
    """SQLite (one host) and Redis, where their persister keeps several holds of a name."""
    found = persisters.schemes()
    return [kind for kind in ("sqlite", "redis") if found[kind].limits]


STORES = _stores()


def _url(kind: str, root: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{root / 'locks.sqlite3'}"
    from tests.servers import redis_server

    return redis_server.url()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Path]]:
    kept = os.environ.get("SINGLETON_AIRFLOW_DEPLOYMENTS_DIR")  # keep homes and logs for a look afterwards
    root = Path(kept) / f"limit-{TAG}" if kept else tmp_path_factory.mktemp("limit-deployment")
    root.mkdir(parents=True, exist_ok=True)
    log = root / "holds.log"
    connections = {f"AIRFLOW_CONN_LOCKS_{kind.upper()}": json.dumps({"conn_type": "singleton",
                                                                     "password": _url(kind, root)})
                   for kind in STORES}
    solo = Deployment("solo", root, env_extra=connections)
    try:
        assert solo.prepare().wait(600) == 0, (solo.home / "db-migrate.log").read_text()[-3000:]
        (solo.dags / "limited.py").write_text(DAG_FILE.format(log=str(log), stores=STORES, tag=TAG, limit=LIMIT,
                                                              hold=HOLD, instances=INSTANCES))
        solo.start()
        solo.wait_healthy()
        solo.wait_for_dags([f"limited_{kind}" for kind in STORES])
        yield solo, log
    finally:
        solo.stop()


def _intervals(log: Path, store: str) -> dict[int, list[float]]:
    """Each map index's [start, end] from the log (both times inside its hold)."""
    found: dict[int, list[float]] = {}
    for line in log.read_text().splitlines():
        kind, event, index, moment, _ = line.split()
        if kind == store:
            found.setdefault(int(index), [0.0, 0.0])[0 if event == "start" else 1] = float(moment)
    return found


def _most_at_once(intervals: dict[int, list[float]]) -> int:
    """The most intervals open at one moment; an end and a start at the same instant do not overlap."""
    events = sorted([(start, 1) for start, _ in intervals.values()] + [(end, -1) for _, end in intervals.values()])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


@pytest.mark.parametrize("store", STORES)
def test_five_mapped_instances_run_at_most_two_at_a_time(deployment: tuple[Deployment, Path], store: str) -> None:
    solo, log = deployment
    dag_id = f"limited_{store}"
    run_id = solo.trigger(dag_id, f"limit-{TAG}")
    run = solo.wait_run(dag_id, run_id, timeout=600)
    states = solo.task_states(dag_id, run_id)
    failed = {key: solo.task_log(dag_id, run_id, "work", map_index=int(key[5:-1]))[-3000:]
              for key, state in states.items() if state != "success"}
    assert run["state"] == "success" and not failed, f"{states}\n{failed}"
    assert states == {f"work[{index}]": "success" for index in range(INSTANCES)}

    intervals = _intervals(log, store)
    assert sorted(intervals) == list(range(INSTANCES)), f"not every instance ran: {intervals}"
    assert all(0 < start < end for start, end in intervals.values()), intervals
    most = _most_at_once(intervals)
    print(f"FIGURE limit_deployment_{store}_most_at_once: {most}")
    assert most <= LIMIT, f"more than {LIMIT} instances held the lock at once: {intervals}"
    assert most == LIMIT, f"the instances never used both slots: {intervals}"

    logs = [solo.task_log(dag_id, run_id, "work", map_index=index) for index in range(INSTANCES)]
    waited = [text for text in logs if "Waiting for lock" in text and f"is at its limit, {LIMIT} of {LIMIT} held" in text]
    assert waited, "no instance waited for a slot, or its log did not name the holders"
