"""A ``@singleton`` flow served from this process, whose runs record the lock's metrics through OpenTelemetry.

    METERED_BLOCK=name METERED_LOCK=name PYTHONPATH=tests/prefect/otel_site:. python metered_flow.py

Serves ``metered/served``: it holds its lock until a marker file exists. Nothing
here knows of OpenTelemetry: ``otel_site/sitecustomize.py`` configures it in each
run's process, as an operator would beside a worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow

from prefect_blocks import singleton

BLOCK = os.environ["METERED_BLOCK"]
LOCK = os.environ["METERED_LOCK"]


@flow(name="metered")
@singleton(block=BLOCK, lock_name=LOCK + "-{slot}")
def metered(slot: str, release_when: str = "", timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while release_when and not Path(release_when).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return os.getpid()


if __name__ == "__main__":
    metered.serve(name="served", pause_on_shutdown=False, print_starting_message=True)
