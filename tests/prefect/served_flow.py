"""``@singleton`` flows served from this process, as users deploy them: ``flow.serve()``.

    SERVED_BLOCK=name SERVED_LOCK=name python served_flow.py

Serves ``served-singleton/served`` (holds its lock until a marker file exists),
``slot-once/served`` (the once-per-slot recipe: a lock name from the scheduled
start time plus a minimum hold), and on ``SERVED_SHORT_BLOCK`` (a lease of a few
seconds, renewed every second): ``held-short/served`` (holds until a marker
file exists), ``waits/served`` (``on_conflict="wait"``, its "still waiting" line
every ``SERVED_WAIT_LOG_INTERVAL`` seconds), ``fan-out/served`` (``.map()`` over a
``@singleton`` task with the default lock name), ``pauses/served``
(``pause_flow_run()`` while holding) and ``suspends/served`` (``suspend_flow_run()``
while holding; each start appends a line to a file). Each run executes in a new process that
gets the flow by cloudpickle, which is what this file exists to test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, serve, task
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.futures import as_completed
from prefect.runtime import flow_run

import prefect_blocks._waiting
from prefect_blocks import singleton

BLOCK = os.environ["SERVED_BLOCK"]
LOCK = os.environ["SERVED_LOCK"]
#: The slot recipe's block: a store that keeps a minimum hold.
SLOT_BLOCK = os.environ.get("SERVED_SLOT_BLOCK", BLOCK)
SHORT_BLOCK = os.environ.get("SERVED_SHORT_BLOCK", BLOCK)
# Runs import this file: the interval applies in each run's process.
prefect_blocks._waiting.WAIT_LOG_INTERVAL = float(os.environ.get("SERVED_WAIT_LOG_INTERVAL", "60"))


def wait_for(marker: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.1)


@flow(name="served-singleton")
@singleton(block=BLOCK, lock_name=LOCK + "-{slot}")
def guarded(slot: str, release_when: str, timeout: float = 120.0) -> int:
    wait_for(release_when, timeout)
    return os.getpid()


@flow(name="slot-once")
@singleton(block=SLOT_BLOCK, min_hold_seconds=600,
           lock_name=lambda _: f"{LOCK}-slot-{flow_run.scheduled_start_time:%Y-%m-%dT%H:%M}")
def slot_once() -> int:
    return os.getpid()


@flow(name="held-short")
@singleton(block=SHORT_BLOCK, lock_name=LOCK + "-short-{slot}")
def held_short(slot: str, release_when: str) -> int:
    wait_for(release_when)
    return os.getpid()


@flow(name="waits")
@singleton(block=SHORT_BLOCK, lock_name=LOCK + "-wait-{slot}", on_conflict="wait", wait_timeout=120)
def waits(slot: str) -> int:
    return os.getpid()


@task
@singleton(block=BLOCK, lock_name=LOCK + "-fan-out")  # names no parameter, as the default name does
def fan_out_item(item: int, release_when: str) -> int:
    wait_for(release_when)  # the one that takes the lock holds it until its siblings have skipped
    return item


@flow(name="fan-out")
def fan_out(release_when: str, items: int = 6) -> list[int | None]:
    futures = fan_out_item.map(range(items), release_when=release_when)
    for finished, _ in enumerate(as_completed(futures), start=1):
        if finished == items - 1:
            Path(release_when).touch()
    return [future.result() for future in futures]


@flow(name="pauses")
@singleton(block=SHORT_BLOCK, lock_name=LOCK + "-pause-{slot}")
def pauses(slot: str) -> int:
    pause_flow_run(timeout=120)
    return os.getpid()


@flow(name="suspends")
@singleton(block=SHORT_BLOCK, lock_name=LOCK + "-suspend-{slot}", on_conflict="wait", wait_timeout=120)
def suspends(slot: str, starts: str) -> int:
    with open(starts, "a") as file:
        file.write("started\n")
    suspend_flow_run(timeout=120)
    return os.getpid()


if __name__ == "__main__":
    serve(guarded.to_deployment(name="served"), slot_once.to_deployment(name="served"),
          held_short.to_deployment(name="served"), waits.to_deployment(name="served"),
          fan_out.to_deployment(name="served"), pauses.to_deployment(name="served"),
          suspends.to_deployment(name="served"),
          pause_on_shutdown=False, print_starting_message=True)
