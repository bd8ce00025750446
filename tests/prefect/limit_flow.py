"""A ``@singleton(limit=2)`` flow served from this process, as users deploy it: ``flow.serve()``.

    LIMIT_BLOCK=name LIMIT_LOCK=name python limit_flow.py

Serves ``limited/served``: each run waits for one of the lock's two holds, appends
``start`` to a shared log once it holds one, stays until the log shows two starts
(so two runs hold at once) and a moment longer, then appends ``end`` and releases.
The log is the checker outside the lock: its lines are written inside the holds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, serve
from prefect.runtime import flow_run

from prefect_blocks import current_lock, singleton

BLOCK = os.environ["LIMIT_BLOCK"]
LOCK = os.environ["LIMIT_LOCK"]


def append(log: str, line: str) -> None:
    """One line in one write to a file opened for appending: lines of several processes never mix."""
    with open(log, "a") as file:
        file.write(line + "\n")


def starts(log: str) -> int:
    return sum(line.startswith("start ") for line in Path(log).read_text().splitlines())


@flow(name="limited")
@singleton(block=BLOCK, lock_name=LOCK, limit=2, on_conflict="wait", wait_timeout=300)
def limited(log: str, stay: float = 1.0, pair_timeout: float = 120.0) -> int:
    token = current_lock().fencing_token
    append(log, f"start {flow_run.id} {token}")
    deadline = time.monotonic() + pair_timeout  # bounds a broken run; the test then finds no pair
    while starts(log) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(stay)  # room for a third run to break in, were the limit not kept
    append(log, f"end {flow_run.id} {token}")
    return token


if __name__ == "__main__":
    serve(limited.to_deployment(name="served"), pause_on_shutdown=False, print_starting_message=True)
