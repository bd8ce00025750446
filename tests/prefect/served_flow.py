"""``@singleton`` flows served from this process, as users deploy them: ``flow.serve()``.

    SERVED_BLOCK=name SERVED_LOCK=name python served_flow.py

Serves ``served-singleton/served`` (holds its lock until a marker file exists) and
``slot-once/served`` (the once-per-slot recipe: a lock name from the scheduled
start time plus a minimum hold). Each run executes in a new process that gets
the flow by cloudpickle, which is what this file exists to test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, serve
from prefect.runtime import flow_run

from prefect_blocks import singleton

BLOCK = os.environ["SERVED_BLOCK"]
LOCK = os.environ["SERVED_LOCK"]
#: The slot recipe's block: a store that keeps a minimum hold.
SLOT_BLOCK = os.environ.get("SERVED_SLOT_BLOCK", BLOCK)


@flow(name="served-singleton")
@singleton(block=BLOCK, lock_name=LOCK + "-{slot}")
def guarded(slot: str, release_when: str, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while not Path(release_when).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return os.getpid()


@flow(name="slot-once")
@singleton(block=SLOT_BLOCK, min_hold_seconds=600,
           lock_name=lambda _: f"{LOCK}-slot-{flow_run.scheduled_start_time:%Y-%m-%dT%H:%M}")
def slot_once() -> int:
    return os.getpid()


if __name__ == "__main__":
    serve(guarded.to_deployment(name="served"), slot_once.to_deployment(name="served"),
          pause_on_shutdown=False, print_starting_message=True)
