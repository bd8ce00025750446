"""``@singleton`` under ``@flow`` and ``@task``: the lock's outcome is the run's state.

    SINGLETON_URL=redis://127.0.0.1:6379/0 python examples/prefect/decorator_flow.py eu

- ``nightly_export`` skips (Completed, named "Skipped") while anyone else holds
  ``nightly-export``; the message names the holder.
- ``refresh_region`` locks one name per region (``refresh-eu``...), filled from the
  task's parameters, and waits up to a minute for it, then fails.
"""

from __future__ import annotations

import asyncio
import os
import sys

from prefect import flow, task

from prefect_blocks import SingletonBlock, current_lock, singleton

block = SingletonBlock(url=os.environ.get("SINGLETON_URL", "sqlite://"), lock_expire_seconds=120)


@task
@singleton(block=block, lock_name="refresh-{region}", on_conflict="wait", wait_timeout=60)
async def refresh_region(region: str) -> str:
    await asyncio.sleep(0.1)
    return f"{region} refreshed with fencing token {current_lock().fencing_token}"


@flow(name="nightly-export-decorated")
@singleton(block=block, lock_name="nightly-export")  # on_conflict="skip" by default
async def nightly_export(region: str = "eu") -> str:
    return await refresh_region(region)


if __name__ == "__main__":
    state = asyncio.run(nightly_export(sys.argv[1] if len(sys.argv) > 1 else "eu", return_state=True))
    print(f"state={state.name} message={state.message!r}")
    if state.is_completed() and state.name != "Skipped":
        print(state.result())
