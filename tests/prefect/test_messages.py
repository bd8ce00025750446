"""Conflict messages: the holder first, in Prefect's terms; ids left to the event payload."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from prefect_blocks._messages import conflict, fan_out, waiting
from singleton_integrations import LockRecord

SINCE = datetime(2026, 12, 1, 0, 0, 5, tzinfo=timezone.utc)
RUN = {
    "prefect_flow_run_id": "0b7c5c1e-0000-4000-8000-000000000001",
    "prefect_flow_run_name": "witty-heron",
    "prefect_flow_name": "nightly-export",
    "prefect_deployment_id": "9d3f0000-0000-4000-8000-000000000002",
    "prefect_deployment_name": "prod",
}


def record(metadata: dict[str, str]) -> LockRecord:
    return LockRecord(name="nightly", owner_token="t" * 32, fencing_token=7, host="worker-2", pid=4242,
                      created_at=SINCE, expires_at=None, metadata=metadata)


def test_a_prefect_holder_is_named_by_run_and_deployment() -> None:
    message = str(conflict("nightly", record(RUN)))
    assert message == ("lock 'nightly' is held by flow run 'witty-heron' of deployment 'nightly-export/prod' "
                       "on worker-2 (pid 4242) since 2026-12-01T00:00:05Z")


def test_a_task_holder_and_a_wait() -> None:
    metadata = {**RUN, "prefect_task_run_name": "refresh-eu-0", "prefect_task_run_id": "x"}
    del metadata["prefect_deployment_name"]
    message = str(conflict("nightly", record(metadata), waited=2.5))
    assert message.startswith("lock 'nightly' is held by task run 'refresh-eu-0' in flow run 'witty-heron' "
                              "of flow 'nightly-export' on worker-2 (pid 4242) since ")
    assert message.endswith(" (after waiting 2.5 s)")


def test_other_holders_keep_their_metadata() -> None:
    message = str(conflict("nightly", record({"source": "cron", "dag_id": "export"})))
    assert message == "lock 'nightly' is held by worker-2 (pid 4242, dag_id=export, source=cron) since 2026-12-01T00:00:05Z"
    assert str(conflict("nightly", None)) == "lock 'nightly' is held by another process"


def test_a_released_record_in_its_minimum_hold_says_the_slot_ran() -> None:
    done = replace(record(RUN), released_at=datetime(2026, 12, 1, 0, 0, 30, tzinfo=timezone.utc),
                   hold_until=datetime(2026, 12, 1, 1, 0, 5, tzinfo=timezone.utc))
    assert str(conflict("nightly", done)) == (
        "lock 'nightly' already ran: flow run 'witty-heron' of deployment 'nightly-export/prod' on worker-2 "
        "(pid 4242) ran it at 2026-12-01T00:00:05Z and finished at 2026-12-01T00:00:30Z; "
        "held until 2026-12-01T01:00:05Z for the minimum hold")


def test_waiting_lines_name_the_holder_then_how_long() -> None:
    assert waiting("nightly", record(RUN)) == ("waiting for lock 'nightly' held by flow run 'witty-heron' of deployment "
                                                "'nightly-export/prod' on worker-2 (pid 4242) since 2026-12-01T00:00:05Z")
    assert waiting("nightly", record(RUN), waited=61.4).startswith(
        "still waiting for lock 'nightly' after 61 s, held by flow run 'witty-heron' ")
    assert waiting("nightly", None) == "waiting for lock 'nightly' held by nobody right now (the next attempt may take it)"
    done = replace(record(RUN), released_at=SINCE, hold_until=datetime(2026, 12, 1, 1, 0, 5, tzinfo=timezone.utc))
    assert waiting("nightly", done) == ("waiting for lock 'nightly' held for the minimum hold until 2026-12-01T01:00:05Z: "
                                        "flow run 'witty-heron' of deployment 'nightly-export/prod' on worker-2 (pid 4242) "
                                        "ran its slot")


def test_fan_out_names_the_sibling_and_the_recipe() -> None:
    sibling = record({**RUN, "prefect_task_run_name": "process-0", "prefect_task_run_id": "x"})
    message = fan_out("process", sibling, "process-3", "process-{item}")
    assert message.startswith("task run 'process-3' was skipped: lock 'process' is held by task run 'process-0' "
                              "of this same flow run. ")
    assert '@singleton(..., lock_name="process-{item}")' in message and 'on_conflict="wait"' in message
