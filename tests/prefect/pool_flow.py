"""``@singleton`` tasks under ``ProcessPoolTaskRunner``: each task runs in another process, pickled.

    SERVED_BLOCK=name SERVED_LOCK=name python pool_flow.py MARKER_FILE

Two tasks take the same lock at once in two worker processes; the one that
finishes first (skipped) lets the holder finish. Prints the flow run id and the
tasks' results as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from prefect import flow, task
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner

from prefect_blocks import current_lock, singleton

BLOCK = os.environ["SERVED_BLOCK"]
LOCK = os.environ["SERVED_LOCK"]


@task
@singleton(block=BLOCK, lock_name=LOCK)
def guarded_task(number: int, release_when: str) -> dict[str, int]:
    deadline = time.monotonic() + 120
    while not Path(release_when).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"number": number, "pid": os.getpid(), "fencing_token": current_lock().fencing_token}


@flow(name="pool-singleton", task_runner=ProcessPoolTaskRunner(max_workers=2))
def pool(release_when: str) -> list[dict[str, int] | None]:
    futures = [guarded_task.submit(number, release_when) for number in (1, 2)]
    results = []
    for future in as_completed(futures):
        Path(release_when).touch()  # the first to finish (skipped) frees the other
        results.append(future.result())
    return results  # in the order they finished: the skipped one's None first


if __name__ == "__main__":
    state = pool(sys.argv[1], return_state=True)
    print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "state": state.name, "flow_pid": os.getpid(),
                      "tasks": state.result() if state.is_completed() else str(state.message)}), flush=True)
