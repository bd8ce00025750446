"""A Prefect flow that guards its critical section with a saved ``SingletonBlock``.

    SINGLETON_URL=redis://127.0.0.1:6379/0 python examples/prefect/block_flow.py

The first run saves the block as ``nightly-locks`` (in the UI: Blocks → Singleton).
The lock name ``nightly-export`` is shared with the cron job, the Python worker and
the Airflow DAG in ``examples/``, so this flow never runs alongside them.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger
from prefect.states import Completed

from prefect_blocks import LockConflict, SingletonBlock

BLOCK_NAME = "nightly-locks"
LOCK_NAME = "nightly-export"


def save_block() -> None:
    """What you would otherwise do once in the UI or with a deployment script."""
    SingletonBlock(url=os.environ.get("SINGLETON_URL", "sqlite://"), lock_expire_seconds=120, auto_renew=True).save(
        BLOCK_NAME, overwrite=True
    )


@flow(name="nightly-export-block")
def nightly_export(batches: int = 3):
    singleton_block = SingletonBlock.load(BLOCK_NAME)
    logger = get_run_logger()
    try:
        with singleton_block.lock(LOCK_NAME) as lock:
            for batch in range(batches):
                lock.ensure_held()  # raises LockLost before a write if exclusivity was lost
                logger.info("batch %s written with fencing token %s", batch, lock.fencing_token)
            return lock.fencing_token
    except LockConflict as conflict:
        return Completed(name="Skipped", message=f"Skipped: {conflict}")


if __name__ == "__main__":
    save_block()
    state = nightly_export(return_state=True)
    print(f"state={state.name} message={state.message!r}")
