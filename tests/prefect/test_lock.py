"""``block.lock(name)`` with ``with`` and ``async with``: acquire, conflict, renew, release on every exit."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from prefect import flow, task
from prefect.context import FlowRunContext, TaskRunContext

import prefect_blocks._waiting
from prefect_blocks import LockConflict, LockLost, SingletonBlock, current_lock, singleton

from .conftest import ROOT, held_elsewhere


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def block(store_url: str) -> SingletonBlock:
    return SingletonBlock(url=store_url, lock_expire_seconds=30)


def test_with_holds_then_releases(block: SingletonBlock, lock_name: str) -> None:
    with block.lock(lock_name) as held:
        record = block.holder(lock_name)
        assert record is not None and record.fencing_token == held.fencing_token and record.pid == os.getpid()
    assert block.holder(lock_name) is None


def test_conflict_names_the_other_process(block: SingletonBlock, store_url: str, lock_name: str) -> None:
    with held_elsewhere(store_url, lock_name, "--metadata", "job=cron") as other:
        with pytest.raises(LockConflict, match=f"pid {other.pid}.*job=cron") as raised, block.lock(lock_name):
            pytest.fail("the body must not run")
        assert raised.value.holder.fencing_token == other.fencing_token
        with pytest.raises(LockConflict, match=r"after waiting 0\.3 s"), block.lock(lock_name, wait=0.3):
            pytest.fail("the body must not run")
    with block.lock(lock_name, wait=5) as held:  # free again once the other released
        assert held.fencing_token > other.fencing_token


def test_released_on_exception(block: SingletonBlock, lock_name: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), block.lock(lock_name):
        raise RuntimeError("boom")
    assert block.holder(lock_name) is None


def test_name_prefix_and_lease_override(store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=30, name_prefix="team-a/")
    with block.lock(lock_name, lock_expire_seconds=120):
        record = block.get_persister().get(f"team-a/{lock_name}")
        assert record is not None
        assert 100 < (record.expires_at - record.created_at).total_seconds() <= 120
        assert block.holder(lock_name) == record


def test_renews_while_held(store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=1.5, auto_renew=True)
    with block.lock(lock_name) as held:
        first = block.holder(lock_name)
        renewals: list[str] = []
        held.on("renewed", renewals.append)
        wait_until(lambda: len(renewals) >= 4)  # well past the 1.5 s lease
        now = block.holder(lock_name)
        assert now is not None and now.fencing_token == first.fencing_token
        assert now.expires_at > first.expires_at
        held.ensure_held()
    assert block.holder(lock_name) is None


def test_loss_without_renewal_raises_lock_lost(store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=0.3, auto_renew=False)
    with pytest.raises(LockLost, match="was lost"), block.lock(lock_name):
        wait_until(lambda: block.holder(lock_name) is None)  # the lease ran out
        with held_elsewhere(store_url, lock_name):
            pass


def test_holder_metadata_names_the_runs(block: SingletonBlock, lock_name: str) -> None:
    @task
    def in_task() -> dict[str, str]:
        with block.lock(f"{lock_name}-task"):
            return {**block.holder(f"{lock_name}-task").metadata, "expected": str(TaskRunContext.get().task_run.id)}

    @flow(name="metadata-flow")
    def in_flow() -> tuple[dict[str, str], dict[str, str], str]:
        with block.lock(lock_name):
            metadata = dict(block.holder(lock_name).metadata)
        return metadata, in_task(), str(FlowRunContext.get().flow_run.id)

    flow_metadata, task_metadata, flow_run_id = in_flow()
    assert flow_metadata["prefect_flow_run_id"] == flow_run_id
    assert flow_metadata["prefect_flow_name"] == "metadata-flow"
    assert "prefect_task_run_id" not in flow_metadata
    assert task_metadata["prefect_task_run_id"] == task_metadata["expected"]
    assert task_metadata["prefect_flow_run_id"] == flow_run_id


# -- async ---------------------------------------------------------------------------


async def test_async_with_holds_then_releases(block: SingletonBlock, store_url: str, lock_name: str) -> None:
    async with block.lock(lock_name) as held:
        assert (await held.holder()).fencing_token == held.fencing_token
    assert block.holder(lock_name) is None
    with held_elsewhere(store_url, lock_name), pytest.raises(LockConflict):
        async with block.lock(lock_name):
            pytest.fail("the body must not run")


async def test_cancelled_while_holding_releases(block: SingletonBlock, lock_name: str) -> None:
    entered = asyncio.Event()

    async def guarded() -> None:
        async with block.lock(lock_name):
            entered.set()
            await asyncio.sleep(3600)

    running = asyncio.create_task(guarded())
    await asyncio.wait_for(entered.wait(), 30)
    assert block.holder(lock_name) is not None
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert block.holder(lock_name) is None


async def test_cancelled_while_waiting_leaks_nothing(block: SingletonBlock, store_url: str, lock_name: str) -> None:
    with held_elsewhere(store_url, lock_name) as other:
        waiting = asyncio.create_task(_hold_briefly(block, lock_name))
        await asyncio.sleep(0.3)  # let it start waiting; correctness does not depend on this
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert block.holder(lock_name).pid == other.pid
    assert block.holder(lock_name) is None


async def _hold_briefly(block: SingletonBlock, name: str) -> None:
    async with block.lock(name, wait=3600):
        pytest.fail("the other process holds the lock throughout")


class RunLines(logging.Handler):
    """Records of Prefect's run loggers, whose flow_run_id is what sends a line to the run's log."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, text: str) -> list[logging.LogRecord]:
        return [record for record in list(self.records) if text in record.getMessage()]


@pytest.fixture
def run_lines() -> Iterator[RunLines]:
    handler = RunLines()
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


async def test_an_async_wait_is_said_in_the_run_log(block: SingletonBlock, store_url: str, lock_name: str,
                                                    run_lines: RunLines, monkeypatch: pytest.MonkeyPatch) -> None:
    """The served tests cover ``with``; ``async with`` reports from a task on the loop."""
    monkeypatch.setattr(prefect_blocks._waiting, "WAIT_LOG_INTERVAL", 0.2)

    @flow
    async def waiter() -> str:
        async with block.lock(lock_name, wait=120):
            return str(FlowRunContext.get().flow_run.id)

    with held_elsewhere(store_url, lock_name) as other:
        running = asyncio.create_task(waiter())
        deadline = time.monotonic() + 60
        while len(run_lines.of("waiting for lock")) < 2:
            assert not running.done() and time.monotonic() < deadline, (running, run_lines.records)
            await asyncio.sleep(0.05)
    flow_run_id = await running
    first, again, *_ = run_lines.of("waiting for lock")
    assert first.getMessage().startswith(f"waiting for lock {lock_name!r} held by ") and f"(pid {other.pid})" in first.getMessage()
    assert again.getMessage().startswith(f"still waiting for lock {lock_name!r} after ")
    assert {str(first.flow_run_id), str(again.flow_run_id)} == {flow_run_id}


def test_a_loss_on_the_renewal_thread_is_a_run_log_line(store_url: str, lock_name: str, run_lines: RunLines) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=1.5)

    @flow
    def holder() -> str:
        with block.lock(lock_name):
            block.get_persister().force_release(lock_name)  # an admin breaks it; the next renewal is refused
            wait_until(lambda: run_lines.of("was lost"))
            return str(FlowRunContext.get().flow_run.id)

    state = holder(return_state=True)
    assert state.is_failed() and "was lost" in state.message
    [lost] = [record for record in run_lines.of("was lost") if record.getMessage().startswith("exclusivity on lock")]
    assert lost.threadName.startswith("singleton-renew") and lost.levelno == logging.WARNING
    assert str(lost.flow_run_id) == str(state.state_details.flow_run_id)


# -- SIGTERM: Prefect's TerminationSignal unwinds the lock ------------------------------

SIGTERM_FLOW = """
import sys, time
from prefect import flow
from prefect_blocks import SingletonBlock

@flow
def guarded(url: str, name: str):
    with SingletonBlock(url=url, lock_expire_seconds=600).lock(name):
        print("HELD", flush=True)
        time.sleep(600)

guarded(sys.argv[1], sys.argv[2])
"""


def test_sigterm_releases_through_termination_signal(block: SingletonBlock, store_url: str, lock_name: str, child_env) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_FLOW, store_url, lock_name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env, cwd=ROOT,
    )
    try:
        assert process.stdout.readline().strip() == "HELD"
        assert block.holder(lock_name).pid == process.pid
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Released, not left to its 600 s lease.
    assert block.holder(lock_name) is None, process.stderr.read()[-2000:]
    assert process.returncode != 0


def test_min_hold_keeps_the_slot_after_release(tmp_path, lock_name: str) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import store_url_for

    # On a store that keeps a minimum hold (supports_min_hold).
    block = SingletonBlock(url=store_url_for("mongodb", tmp_path), lock_expire_seconds=30)

    @flow
    @singleton(block=block, lock_name=lock_name, min_hold_seconds=120)
    def job() -> int:
        return current_lock().fencing_token

    first = job(return_state=True)
    assert first.name == "Completed"
    again = job(return_state=True)
    assert (again.type.value, again.name) == ("COMPLETED", "Skipped")
    assert f"lock '{lock_name}' already ran: " in again.message and "for the minimum hold" in again.message
    with pytest.raises(LockConflict, match="already ran") as raised, block.lock(lock_name):
        pass
    assert raised.value.holder.released_at is not None and block.holder(lock_name) is not None
