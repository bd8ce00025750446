"""``limit=N`` (issue 21) through the blocks: ``@singleton(limit=N)``, ``block.lock(name, limit=N)``, the
block's core locks, the conflict's message and event, the waiting line, and the admin flows' rows.

The holds "elsewhere" are core locks on the block's own persister in this process: the runs see them
as any other holder. Served runs in other processes are in ``test_served_limit.py``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prefect import flow, get_client, task
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType

from prefect_blocks import HOLD_LABEL, LockConflict, SingletonBlock, current_lock, singleton
from prefect_blocks._messages import conflict, fan_out, waiting_at_limit
from prefect_blocks.admin import ARTIFACT_KEY, force_release, list_locks
from singleton_integrations import LockRecord, Singleton
from tests.conftest import store_url_for

from .conftest import STORES, EventsRecorder
from .test_states import SHAPES, api_state, run_shape


@pytest.fixture
def block(request: pytest.FixtureRequest, tmp_path: Path) -> SingletonBlock:
    """A block on a store that keeps several holds: ``memory://`` (this process's), or each store of
    ``STORES`` where a test is marked ``on_every_store``."""
    return SingletonBlock(url=store_url_for(getattr(request, "param", "memory"), tmp_path), lock_expire_seconds=30)


#: The rows of the states table at the limit, and the block's lock, run on every store as ``test_states`` does.
on_every_store = pytest.mark.parametrize("block", STORES, indirect=True)


@contextmanager
def held(block: SingletonBlock, name: str, *deployments: str, limit: int = 2) -> Iterator[list[Singleton]]:
    """Hold ``name`` once per deployment, as cron jobs with ``limit`` would, until the block ends."""
    with ExitStack() as stack:
        locks = []
        for deployment in deployments:
            lock = Singleton(block.lock_name(name), block.get_persister(), limit=limit, auto_renew=False,
                             metadata={"deployment": deployment})
            assert lock.lock(), f"{deployment} could not take {name!r}"
            stack.callback(lock.release)
            locks.append(lock)
        yield locks


@pytest.fixture
def without_limits(block: SingletonBlock, monkeypatch: pytest.MonkeyPatch) -> SingletonBlock:
    """The block's store, as a store that keeps one hold per name sees it."""
    monkeypatch.setattr(block.get_persister(), "limits", False)
    return block


# -- checked up front ------------------------------------------------------------------------------


def test_limit_is_checked_where_it_is_written(block: SingletonBlock) -> None:
    for wrong, error in ((0, ValueError), (-2, ValueError), ("2", TypeError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match="limit must be"):
            singleton(block=block, limit=wrong)  # type: ignore[arg-type]
        with pytest.raises(error, match="limit must be"):
            singleton(block="saved-later", limit=wrong)  # type: ignore[arg-type]
        with pytest.raises(error, match="limit must be"):
            block.lock("x", limit=wrong)  # type: ignore[arg-type]
        with pytest.raises(error, match="limit must be"):
            block.get_singleton("x", limit=wrong)  # type: ignore[typeddict-item]
    assert block.lock("x", limit=3).limit == 3 and block.lock("x").limit == 1
    assert block.get_singleton("x", limit=3).limit == 3
    assert block.get_async_singleton("x", limit=3).limit == 3
    assert block.get_singleton("x").limit == 1


def test_a_store_without_several_holds_refuses_a_limit_before_any_run(without_limits: SingletonBlock,
                                                                      lock_name: str) -> None:
    refusal = r"limit=2 needs a store that keeps several holds of a lock name; the memory:// store does not"
    with pytest.raises(ValueError, match=refusal):
        singleton(block=without_limits, limit=2)
    with pytest.raises(ValueError, match=refusal):
        without_limits.lock(lock_name, limit=2)
    with pytest.raises(ValueError, match=refusal):
        without_limits.get_async_singleton(lock_name, limit=2)
    singleton(block=without_limits, limit=1)  # the default is every store's lock
    with without_limits.lock(lock_name) as lock:
        assert lock.limit == 1


def test_a_saved_block_on_such_a_store_fails_the_run_and_says_why(without_limits: SingletonBlock,
                                                                  lock_name: str) -> None:
    block_name = f"limits-{uuid.uuid4().hex[:8]}"
    without_limits.save(block_name)

    @flow
    @singleton(block=block_name, lock_name=lock_name, limit=2)  # loaded at the run: checked then
    def job() -> None: ...

    state = job(return_state=True)
    assert state.type is StateType.FAILED and "limit=2 needs a store that keeps several holds" in state.message


# -- block.lock ----------------------------------------------------------------------------------


@on_every_store
def test_block_lock_lets_n_in_then_names_every_holder(block: SingletonBlock, lock_name: str,
                                                      events: EventsRecorder) -> None:
    with block.lock(lock_name, limit=2) as first, block.lock(lock_name, limit=2) as second:
        tokens = [first.fencing_token, second.fencing_token]
        assert tokens[1] > tokens[0] and [hold.fencing_token for hold in block.holders(lock_name)] == tokens
        with pytest.raises(LockConflict) as raised, block.lock(lock_name, limit=2):
            pass
        # limit=1 counts every live hold, whatever N its holders gave
        with pytest.raises(LockConflict, match=f"lock '{lock_name}' is held by "), block.lock(lock_name):
            pass
    assert block.holders(lock_name) == []
    refused = raised.value
    assert refused.limit == 2 and [hold.fencing_token for hold in refused.holders] == tokens
    assert str(refused).startswith(f"lock '{lock_name}' is at its limit, 2 of 2 held: ")
    assert str(refused).count(" since 20") == 2
    conflicts = [event for event in events.lock_events(lock_name) if event.event == "singleton.lock.conflict"]
    assert conflicts[0].payload["limit"] == 2 and conflicts[0].payload["message"] == str(refused)
    assert [hold["fencing_token"] for hold in conflicts[0].payload["holders"]] == tokens
    assert "limit" not in conflicts[1].payload, "a limit=1 conflict's payload is as before"
    for ended in ("singleton.lock.acquired", "singleton.lock.released"):  # each event names its hold
        labels = [event.resource[HOLD_LABEL] for event in events.lock_events(lock_name) if event.event == ended]
        assert sorted(int(label) for label in labels) == tokens, ended
    assert all(HOLD_LABEL not in event.resource for event in conflicts)


@on_every_store
def test_async_block_lock_lets_n_in(block: SingletonBlock, lock_name: str) -> None:
    async def scenario() -> tuple[list[int], LockConflict]:
        async with block.lock(lock_name, limit=3) as one, block.lock(lock_name, limit=3) as two, \
                block.lock(lock_name, limit=3) as three:
            tokens = [one.fencing_token, two.fencing_token, three.fencing_token]
            assert await one.holders() == block.holders(lock_name)
            try:
                async with block.lock(lock_name, limit=3):
                    pass
            except LockConflict as refused:
                return tokens, refused
        raise AssertionError("a fourth holder got in")

    tokens, refused = asyncio.run(scenario())
    assert tokens == sorted(set(tokens)) and "3 of 3 held" in str(refused) and len(refused.holders) == 3


@on_every_store
def test_a_waiting_block_lock_gets_in_when_any_holder_leaves(block: SingletonBlock, lock_name: str) -> None:
    with held(block, lock_name, "cron-a", "cron-b") as (first, second):
        threading.Timer(0.2, first.release).start()  # whichever hold ends lets the next one in
        with block.lock(lock_name, wait=60, limit=2) as third:
            assert third.fencing_token > second.fencing_token
            assert {hold.fencing_token for hold in block.holders(lock_name)} == {second.fencing_token,
                                                                                  third.fencing_token}


# -- @singleton ------------------------------------------------------------------------------------


def limited_flow(block: SingletonBlock | str, lock_name: str, **options):
    @flow(name=f"limited-{uuid.uuid4().hex[:6]}")
    @singleton(block=block, lock_name=lock_name, limit=2, **options)
    def job() -> int:
        lock = current_lock()
        assert lock is not None and lock.held and lock.limit == 2
        return lock.fencing_token

    return job


def test_a_run_takes_a_free_hold_beside_another(block: SingletonBlock, lock_name: str) -> None:
    with held(block, lock_name, "cron-a") as (other,):
        token = other.fencing_token
        state = limited_flow(block, lock_name)(return_state=True)
        assert [hold.fencing_token for hold in block.holders(lock_name)] == [token], "released; the other stays"
    assert (state.type, state.name) == (StateType.COMPLETED, "Completed") and state.result() > token


@on_every_store
def test_all_held_skip_is_skipped_and_names_every_holder(block: SingletonBlock, lock_name: str) -> None:
    with held(block, lock_name, "cron-a", "cron-b"):
        state = limited_flow(block, lock_name)(return_state=True)
    assert (state.type, state.name) == (StateType.COMPLETED, "Skipped")
    assert state.message.startswith(f"lock '{lock_name}' is at its limit, 2 of 2 held: ")
    assert "deployment=cron-a" in state.message and "deployment=cron-b" in state.message
    assert api_state(state).message == state.message


@on_every_store
def test_all_held_fail_is_failed_with_every_holder(block: SingletonBlock, lock_name: str) -> None:
    with held(block, lock_name, "cron-a", "cron-b") as locks:
        tokens = [lock.fencing_token for lock in locks]
        state = limited_flow(block, lock_name, on_conflict="fail")(return_state=True)
    assert state.type is StateType.FAILED and "LockConflict" in api_state(state).message
    with pytest.raises(LockConflict, match="2 of 2 held") as raised:
        state.result()
    assert raised.value.limit == 2
    assert [hold.fencing_token for hold in raised.value.holders] == tokens


@on_every_store
def test_all_held_wait_runs_once_a_hold_ends_or_fails_after_the_timeout(block: SingletonBlock, lock_name: str) -> None:
    with held(block, lock_name, "cron-a", "cron-b") as (first, second):
        tokens = [first.fencing_token, second.fencing_token]
        timed_out = limited_flow(block, lock_name, on_conflict="wait", wait_timeout=0.3)(return_state=True)
        threading.Timer(0.2, second.release).start()
        waited = limited_flow(block, lock_name, on_conflict="wait", wait_timeout=60)(return_state=True)
        assert [hold.fencing_token for hold in block.holders(lock_name)] == tokens[:1]
    assert timed_out.type is StateType.FAILED
    with pytest.raises(LockConflict, match=r"2 of 2 held: .* \(after waiting 0\.3 s\)"):
        timed_out.result()
    assert waited.name == "Completed" and waited.result() > tokens[1]


def limited_shape(shape: str, block: SingletonBlock, lock_name: str):
    """A flow whose guarded unit, under ``limit=2``, is a sync/async flow/task (as ``test_states.make_shape``)."""
    kind, mode = shape.split("-")
    if mode == "sync":
        def unit(value: int) -> int:
            return value + 1
    else:
        async def unit(value: int) -> int:
            return value + 1
    guarded = singleton(block=block, lock_name=lock_name + "-{value}", limit=2)(unit)
    if kind == "flow":
        return flow(name=f"limited-{shape}")(guarded)
    unit_task = task(name=f"limited-{shape}")(guarded)
    if mode == "sync":
        @flow(name=f"limited-parent-{shape}")
        def parent(value: int):
            return unit_task(value, return_state=True)
    else:
        @flow(name=f"limited-parent-{shape}")
        async def parent(value: int):
            return await unit_task(value, return_state=True)
    return parent


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_runs_beside_a_hold_and_skips_at_the_limit(shape: str, block: SingletonBlock,
                                                              lock_name: str) -> None:
    with held(block, f"{lock_name}-7", "cron-a"):
        beside = run_shape(shape, limited_shape(shape, block, lock_name), 7)
        with held(block, f"{lock_name}-7", "cron-b"):
            skipped = run_shape(shape, limited_shape(shape, block, lock_name), 7)
    assert beside.name == "Completed" and beside.result() == 8
    assert (skipped.type, skipped.name) == (StateType.COMPLETED, "Skipped")
    assert "2 of 2 held" in skipped.message and "deployment=cron-b" in skipped.message


# -- what a run says -------------------------------------------------------------------------------

SINCE = datetime(2026, 12, 1, 0, 0, 5, tzinfo=timezone.utc)


def record(token: int, **metadata: str) -> LockRecord:
    return LockRecord(name="exports", owner_token=f"{token:032d}", fencing_token=token, host="worker-2", pid=4200 + token,
                      created_at=SINCE, expires_at=None, metadata=metadata)


def test_the_messages_name_each_hold_in_prefect_terms() -> None:
    run = record(7, prefect_flow_run_name="witty-heron", prefect_flow_name="export",
                 prefect_deployment_name="prod", prefect_flow_run_id="x")
    cron = record(9, source="cron")
    refused = conflict("exports", run, 2.5, (run, cron), 2)
    assert str(refused) == ("lock 'exports' is at its limit, 2 of 2 held: flow run 'witty-heron' of deployment "
                            "'export/prod' on worker-2 (pid 4207) since 2026-12-01T00:00:05Z; worker-2 (pid 4209, "
                            "source=cron) since 2026-12-01T00:00:05Z (after waiting 2.5 s)")
    assert refused.holders == (run, cron) and refused.limit == 2 and refused.holder is run
    ran = replace(cron, released_at=SINCE, hold_until=SINCE)
    assert "for the minimum hold" in str(conflict("exports", None, None, (ran,), 3))
    assert waiting_at_limit("exports", [run, cron], 2).startswith("waiting for lock 'exports' at its limit, 2 of 2 held: "
                                                                  "flow run 'witty-heron'")
    assert fan_out("exports", run, "export-3", "export-{region}", 2).endswith('on_conflict="wait" to run them 2 at a time')
    assert waiting_at_limit("exports", [cron], 2, waited=61) == (
        "still waiting for lock 'exports' after 61 s, 1 of 2 held right now (the next attempt may take one)")


# -- the admin flows -------------------------------------------------------------------------------


def test_list_locks_shows_each_hold_and_force_release_frees_only_one(block: SingletonBlock, lock_name: str) -> None:
    block_name = f"limits-{uuid.uuid4().hex[:8]}"
    block.save(block_name)
    with held(block, lock_name, "cron-a", "cron-b", limit=3) as (first, second):
        tokens = [first.fencing_token, second.fencing_token]
        listed = list_locks(block_name, prefix=lock_name, return_state=True)
        freed = force_release(block_name, lock_name, first.fencing_token, "cron-a's host is gone", return_state=True)
        left = block.holders(lock_name)
        assert not first.verify() and second.verify()
    rows = listed.result()
    assert [(row["name"], row["fencing_token"]) for row in rows] == [(lock_name, token) for token in tokens]
    assert [row["holder"]["deployment"] for row in rows] == ["cron-a", "cron-b"]
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[listed.state_details.flow_run_id])),
        )
    assert (artifact.description or "").startswith("2 live hold(s) of 1 lock(s)")
    assert freed.is_completed() and freed.result()["fencing_token"] == tokens[0]
    assert [hold.fencing_token for hold in left] == tokens[1:], "the other hold stays"
