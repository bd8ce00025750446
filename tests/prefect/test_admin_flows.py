"""The admin flows (``list_locks``, ``force_release``), the released event's ``follows``, and the
"held too long" automation, on a real Prefect API; the artifact also in a real browser.

The flows run in the test process against the session's test harness, with real
stores; the automation and the UI need ``prefect server start`` (its triggers
service and its UI), where the runs and holders are other processes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from prefect import flow, get_client
from prefect.automations import DoNothing, Posture
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from prefect_blocks import EVENT_NAMES, HOLD_LABEL, SingletonBlock, lock_resource_id
from prefect_blocks.admin import (
    ARTIFACT_KEY,
    HOLD_ENDED_EVENTS,
    create_held_too_long_automation,
    force_release,
    held_too_long_automation,
    list_locks,
)
from singleton_integrations import persisters

from .conftest import EventsRecorder, held_elsewhere
from .real_server import ROOT, PrefectServer
from .test_ui import browser, page, shot  # noqa: F401 - the browser fixtures of the UI tests

AIRFLOW_TASK = ("dag_id=etl", "run_id=manual__1", "task_id=load", "map_index=4", "deployment=blue")
#: Bound on waiting for the server to record an event or fire an automation (never a timing claim).
SERVER_WAIT = 120.0


@pytest.fixture
def block_name(store_url: str) -> str:
    """A saved Singleton block on the test store, with a name prefix that the flows hide."""
    name = f"admin-{uuid.uuid4().hex[:8]}"
    SingletonBlock(url=store_url, lock_expire_seconds=60, name_prefix="team-").save(name)
    return name


def stored(lock_name: str) -> str:
    return f"team-{lock_name}"


# -- list_locks ------------------------------------------------------------------------------------


def test_list_locks_publishes_the_table_artifact(block_name: str, store_url: str, lock_name: str) -> None:
    with held_elsewhere(store_url, stored(lock_name), "--metadata", *AIRFLOW_TASK) as other:
        state = list_locks(block_name, prefix=lock_name, return_state=True)
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert row["name"] == lock_name, "shown as the block's users name it, without its name prefix"
    assert row["fencing_token"] == other.fencing_token
    assert row["holder"]["pid"] == other.pid and row["holder"]["dag_id"] == "etl" and row["holder"]["map_index"] == 4
    assert row["holder"]["deployment"] == "blue" and row["since"] and row["expires"]

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
        )
    assert artifact.type == "table" and block_name in (artifact.description or "")
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    (cells,) = table
    assert set(cells) == {"name", "holder", "since", "expires", "fencing token", "metadata"}
    assert cells["name"] == lock_name and cells["fencing token"] == other.fencing_token
    assert f"pid {other.pid}" in cells["holder"] and "deployment blue" in cells["holder"]
    assert "dag etl, run manual__1, task load, map index 4" in cells["holder"]
    assert cells["since"] == datetime.fromisoformat(row["since"]).strftime("%Y-%m-%d %H:%M:%SZ")
    assert "dag_id=etl" in cells["metadata"]


def test_list_locks_with_nothing_held_publishes_an_empty_table(block_name: str, lock_name: str) -> None:
    state = list_locks(block_name, prefix=lock_name, return_state=True)
    assert state.is_completed() and state.result() == []


# -- force_release ------------------------------------------------------------------------------------


def test_force_release_frees_that_hold_and_emits_the_event(events: EventsRecorder, block_name: str, store_url: str,
                                                           lock_name: str) -> None:
    holder_run = str(uuid.uuid4())
    with held_elsewhere(store_url, stored(lock_name), "--metadata", *AIRFLOW_TASK,
                        f"prefect_flow_run_id={holder_run}") as other:
        state = force_release(block_name, lock_name, other.fencing_token, "worker-7 was decommissioned",
                              return_state=True)
        assert state.is_completed(), state.message
        assert persisters.from_url(store_url).get(stored(lock_name)) is None, "the name is free"
    previous = state.result()
    assert previous["name"] == lock_name and previous["fencing_token"] == other.fencing_token
    assert previous["holder"]["pid"] == other.pid and previous["holder"]["task_id"] == "load"

    (event,) = events.lock_events(stored(lock_name))
    assert event.event == "singleton.lock.force-released" and event.event in EVENT_NAMES
    assert event.resource.id == lock_resource_id(stored(lock_name)) and event.resource["singleton.store"] == "sqlite"
    assert event.payload["reason"] == "worker-7 was decommissioned"
    assert event.payload["fencing_token"] == other.fencing_token and event.payload["previous_holder"] == previous
    related = {resource.role: resource.id for resource in event.related}
    assert related["flow-run"] == f"prefect.flow-run.{state.state_details.flow_run_id}", "the admin run"
    assert related["previous-holder"] == f"prefect.flow-run.{holder_run}"


def test_force_release_of_a_changed_or_free_lock_fails_and_releases_nothing(block_name: str, store_url: str,
                                                                            lock_name: str) -> None:
    store = persisters.from_url(store_url)
    with held_elsewhere(store_url, stored(lock_name)) as other:
        stale = other.fencing_token - 1
        state = force_release(block_name, lock_name, stale, "looked an hour ago", return_state=True)
        assert state.is_failed()
        assert "TokenChanged" in state.message
        assert f"is no longer held with fencing token {stale}" in state.message
        assert f"pid {other.pid}" in state.message and "nothing was released" in state.message
        held = store.get(stored(lock_name))
        assert held is not None and held.fencing_token == other.fencing_token, "the current hold was kept"

        state = force_release(block_name, lock_name, other.fencing_token, "  ", return_state=True)
        assert state.is_failed() and "say why the lock is released" in state.message
        assert store.get(stored(lock_name)) is not None

    state = force_release(block_name, lock_name, other.fencing_token, "gone already", return_state=True)
    assert state.is_failed() and "NotHeld" in state.message and "is not held" in state.message


# -- follows -------------------------------------------------------------------------------------------


def test_each_released_event_follows_its_acquired_event(events: EventsRecorder, store_url: str,
                                                        lock_name: str) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=30)

    @flow
    def twice() -> None:
        with block.lock(lock_name):
            pass
        with block.lock(lock_name):
            pass

    @flow
    async def twice_async() -> None:
        async with block.lock(lock_name):
            pass

    twice()
    asyncio.run(twice_async())
    seen = events.lock_events(lock_name)
    assert [event.event for event in seen] == ["singleton.lock.acquired", "singleton.lock.released"] * 3
    for acquired, released in zip(seen[::2], seen[1::2], strict=True):
        assert released.follows == acquired.id
        assert acquired.follows is None


# -- the "held too long" automation, on prefect server start -------------------------------------------


def test_the_automation_is_built_as_documented() -> None:
    automation = held_too_long_automation(timedelta(minutes=30), [DoNothing()], lock_name="team-nightly")
    trigger = automation.trigger
    assert trigger.posture == Posture.Proactive and trigger.within == timedelta(minutes=30)
    assert trigger.after == {"singleton.lock.acquired"} and trigger.expect == set(HOLD_ENDED_EVENTS)
    assert trigger.for_each == {"prefect.resource.id", HOLD_LABEL}, "each hold timed apart (limit=N)"
    assert trigger.match.model_dump() == {"prefect.resource.id": "singleton.lock.team-nightly"}
    assert automation.name == "singleton: lock 'team-nightly' held longer than 30 min"
    assert held_too_long_automation(timedelta(hours=2), [DoNothing()]).trigger.match.model_dump() == {
        "prefect.resource.id": "singleton.lock.*"}
    with pytest.raises(ValueError, match="at least 10 seconds"):
        held_too_long_automation(timedelta(seconds=5), [DoNothing()])
    with pytest.raises(ValueError, match="at least one action"):
        held_too_long_automation(timedelta(minutes=1), [])


@pytest.fixture
def automations(server: PrefectServer) -> Iterator[list[Any]]:
    """Automations a test creates on the real server, deleted at its end."""
    created: list[Any] = []
    yield created
    with get_client(sync_client=True) as client:
        for automation in created:
            client.delete_automation(automation.id)


def test_the_automation_is_created_and_read_back(automations: list[Any]) -> None:
    name = f"held-too-long-{uuid.uuid4().hex[:6]}"
    created = create_held_too_long_automation(timedelta(minutes=20), [DoNothing()], lock_name="nightly-*", name=name)
    automations.append(created)
    assert created.id is not None
    with get_client(sync_client=True) as client:
        read = client.read_automation(created.id)
    assert read is not None and read.name == name and read.enabled
    trigger = read.trigger
    assert trigger.posture == Posture.Proactive and trigger.within == timedelta(minutes=20)
    assert trigger.after == {"singleton.lock.acquired"} and trigger.expect == set(HOLD_ENDED_EVENTS)
    assert trigger.for_each == {"prefect.resource.id", HOLD_LABEL} and trigger.threshold == 1
    assert trigger.match.model_dump() == {"prefect.resource.id": "singleton.lock.nightly-*"}
    assert [action.type for action in read.actions] == ["do-nothing"]


#: Holds a lock through a block outside any flow (events go to PREFECT_API_URL) until a line arrives on stdin;
#: a third argument is the limit.
HOLD_SCRIPT = """
import sys
from prefect_blocks import SingletonBlock
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 1
with SingletonBlock(url=sys.argv[1], lock_expire_seconds=60).lock(sys.argv[2], limit=limit) as held:
    print(held.fencing_token, flush=True)
    sys.stdin.readline()
"""


def events_named(event: str, resource_id: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        # limit: the client's default (100) is more than the server takes (50) in Prefect 3.9
        page = client.read_events(EventFilter(event=EventNameFilter(name=[event]),
                                              resource=EventResourceFilter(id=[resource_id])), limit=50)
    return list(page.events)


def wait_for_event(event: str, resource_id: str, holder: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + SERVER_WAIT
    while not (found := events_named(event, resource_id)):
        assert holder.poll() is None, "the holder ended early"
        assert time.monotonic() < deadline, f"no {event} for {resource_id} within {SERVER_WAIT:g} s"
        time.sleep(0.5)
    return found[0]


def test_a_lock_held_past_the_limit_fires_the_automation(automations: list[Any], server: PrefectServer,
                                                         store_url: str, lock_name: str) -> None:
    created = create_held_too_long_automation(timedelta(seconds=10), [DoNothing()], lock_name=lock_name,
                                              name=f"held-too-long-{uuid.uuid4().hex[:6]}")
    automations.append(created)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, store_url, lock_name], env=server.env(), cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        token = holder.stdout.readline().strip()
        assert token.isdigit()
        acquired = wait_for_event("singleton.lock.acquired", lock_resource_id(lock_name), holder)
        # Held on, past the 10 s limit: the server's proactive evaluation fires the automation.
        triggered = wait_for_event("prefect.automation.triggered", f"prefect.automation.{created.id}", holder)
    finally:
        if holder.poll() is None:
            assert holder.stdin is not None
            holder.stdin.write("release\n")
            holder.stdin.flush()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert triggered.payload["triggering_labels"] == {"prefect.resource.id": lock_resource_id(lock_name),
                                                      HOLD_LABEL: token}
    assert triggered.payload["triggering_event"]["id"] == str(acquired.id), "fired for the hold that began then"


def test_under_a_limit_another_holds_release_does_not_hide_a_hold_held_too_long(
        automations: list[Any], server: PrefectServer, store_url: str, lock_name: str) -> None:
    """Two holds of one name (``limit=2``): the second comes and goes, the first stays past the limit and is reported."""
    created = create_held_too_long_automation(timedelta(seconds=10), [DoNothing()], lock_name=lock_name,
                                              name=f"held-too-long-{uuid.uuid4().hex[:6]}")
    automations.append(created)
    holders = [subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, store_url, lock_name, "2"], env=server.env(),
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    stuck, brief = holders
    try:
        tokens = []
        for holder in holders:  # one at a time: the stuck hold's acquired event comes first
            assert holder.stdout is not None and holder.stdin is not None
            tokens.append(holder.stdout.readline().strip())
            assert tokens[-1].isdigit()
            wait_for_event("singleton.lock.acquired", lock_resource_id(lock_name), holder)
        brief.stdin.write("release\n")  # type: ignore[union-attr]
        brief.stdin.flush()  # type: ignore[union-attr]
        assert brief.wait(timeout=60) == 0
        triggered = wait_for_event("prefect.automation.triggered", f"prefect.automation.{created.id}", stuck)
    finally:
        for holder in holders:
            if holder.poll() is None:
                assert holder.stdin is not None
                holder.stdin.write("release\n")
                holder.stdin.flush()
            holder.wait(timeout=60)
    assert triggered.payload["triggering_labels"] == {"prefect.resource.id": lock_resource_id(lock_name),
                                                      HOLD_LABEL: tokens[0]}, "the stuck hold, not the name"


# -- the artifact in a real browser ------------------------------------------------------------------------


LIST_SCRIPT = """
import sys
from prefect_blocks.admin import list_locks
list_locks(sys.argv[1], prefix=sys.argv[2])
"""


def test_the_locks_artifact_in_the_ui(page, server: PrefectServer, store_url: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    block = f"ui-admin-{uuid.uuid4().hex[:6]}"
    SingletonBlock(url=store_url, lock_expire_seconds=600).save(block, _sync=True)  # type: ignore[call-arg]
    prefix = f"nightly-{uuid.uuid4().hex[:4]}"
    with held_elsewhere(store_url, f"{prefix}-export", "--ttl", "600", "--metadata", *AIRFLOW_TASK) as airflow, \
            held_elsewhere(store_url, f"{prefix}-report", "--ttl", "600", "--metadata", "command=report.sh") as cron:
        listed = subprocess.run([sys.executable, "-c", LIST_SCRIPT, block, prefix], env=server.env(), cwd=ROOT,
                                capture_output=True, text=True, timeout=180)
        assert listed.returncode == 0, listed.stderr[-3000:]
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])),
                                            limit=1, sort="CREATED_DESC")
    page.set_viewport_size({"width": 1920, "height": 760})  # the table's six columns side by side
    page.goto(f"/artifacts/artifact/{artifact.id}")
    page.get_by_text(f"{prefix}-export").first.wait_for()
    content = page.content()
    assert f"{prefix}-report" in content and str(airflow.fencing_token) in content and str(cron.fencing_token) in content
    assert "dag etl, run manual__1, task load, map index 4" in content
    shot(page, "prefect-locks-artifact.png")
