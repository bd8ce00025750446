"""Conflict messages for Prefect users: said once, the holder first, in Prefect's terms.

A holder that is a Prefect run is named by its flow run name and deployment,
not by UUIDs; any other holder (the CLI, Airflow, a cron job) by its host, pid
and metadata. UUIDs, the fencing token and the lease stay in the event payload
and in ``LockConflict.holder``.
"""

from __future__ import annotations

from datetime import datetime, timezone

from singleton_integrations import LockConflict, LockRecord

__all__ = ["conflict", "describe_holder", "fan_out", "waiting", "waiting_at_limit"]

#: Metadata written by this package; the friendly ones are said in words, the ids left out.
_PREFECT_KEYS = (
    "prefect_flow_run_id",
    "prefect_flow_run_name",
    "prefect_flow_name",
    "prefect_deployment_id",
    "prefect_deployment_name",
    "prefect_task_run_id",
    "prefect_task_run_name",
)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "an unknown time"
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def describe_holder(record: LockRecord) -> str:
    """``flow run 'x' of deployment 'flow/dep' on host (pid N)``, or host, pid and metadata for others."""
    metadata = dict(record.metadata)
    task_run = metadata.get("prefect_task_run_name")
    flow_run = metadata.get("prefect_flow_run_name")
    flow_name = metadata.get("prefect_flow_name")
    deployment = metadata.get("prefect_deployment_name")
    words: list[str] = []
    if task_run:
        words.append(f"task run {task_run!r}" + (" in" if flow_run else ""))
    if flow_run:
        words.append(f"flow run {flow_run!r}")
    if deployment:
        full = f"{flow_name}/{deployment}" if flow_name else deployment
        words.append(f"of deployment {full!r}")
    elif flow_name and (flow_run or task_run):
        words.append(f"of flow {flow_name!r}")
    others = ", ".join(f"{key}={value}" for key, value in sorted(metadata.items()) if key not in _PREFECT_KEYS)
    where = f"{record.host} (pid {record.pid}{', ' + others if others else ''})"
    return " ".join([*words, f"on {where}"]) if words else where


def _hold(record: LockRecord) -> str:
    """One hold in a sentence: who, then since when (or when it ran, for a minimum hold)."""
    who = describe_holder(record)
    if record.released_at is not None:
        return f"{who}, ran at {_when(record.created_at)}, held until {_when(record.hold_until)} for the minimum hold"
    return f"{who} since {_when(record.created_at)}"


def _at_limit(name: str, holders: tuple[LockRecord, ...], limit: int) -> str:
    """``lock 'x' is at its limit, 2 of 2 held: <each hold>``: the core's words, each holder in Prefect's terms."""
    named = "; ".join(_hold(record) for record in holders) or "holders the store did not name"
    return f"lock {name!r} is at its limit, {len(holders) or limit} of {limit} held: {named}"


def conflict(name: str, record: LockRecord | None, waited: float | None = None,
             holders: tuple[LockRecord, ...] = (), limit: int = 1) -> LockConflict:
    """The ``LockConflict`` a run reports: one sentence, holder first, then since when.

    Under ``limit=N`` (N > 1) it names every hold the refused attempt saw, as the core's message does.
    """
    after = f" (after waiting {waited:g} s)" if waited else ""
    if limit > 1:
        seen = holders or ((record,) if record is not None else ())
        return LockConflict(name, record, f"{_at_limit(name, seen, limit)}{after}", holders=seen, limit=limit)
    if record is None:
        return LockConflict(name, None, f"lock {name!r} is held by another process{after}")
    who = describe_holder(record)
    if record.released_at is not None:
        message = (f"lock {name!r} already ran: {who} ran it at {_when(record.created_at)} and finished at "
                   f"{_when(record.released_at)}; held until {_when(record.hold_until)} for the minimum hold{after}")
    else:
        message = f"lock {name!r} is held by {who} since {_when(record.created_at)}{after}"
    return LockConflict(name, record, message)


def waiting(name: str, record: LockRecord | None, waited: float | None = None) -> str:
    """The run log's line while a run waits for ``name``: who holds it, since when; ``waited`` after the first."""
    head = f"waiting for lock {name!r}" if waited is None else f"still waiting for lock {name!r} after {waited:.0f} s,"
    if record is None:
        return f"{head} held by nobody right now (the next attempt may take it)"
    if record.released_at is not None:
        return f"{head} held for the minimum hold until {_when(record.hold_until)}: {describe_holder(record)} ran its slot"
    return f"{head} held by {describe_holder(record)} since {_when(record.created_at)}"


def waiting_at_limit(name: str, holders: list[LockRecord], limit: int, waited: float | None = None) -> str:
    """``waiting`` under ``limit=N``: every hold of the name, since when."""
    head = f"waiting for lock {name!r}" if waited is None else f"still waiting for lock {name!r} after {waited:.0f} s,"
    if len(holders) < limit:
        return f"{head} {len(holders)} of {limit} held right now (the next attempt may take one)"
    return f"{head} at its limit, {len(holders)} of {limit} held: {'; '.join(_hold(record) for record in holders)}"


def fan_out(name: str, record: LockRecord, task_run_name: str | None, recipe: str, limit: int = 1) -> str:
    """The warning for a task run skipped by a sibling task run of its own flow run (``.map()``, ``.submit()``)."""
    holder = record.metadata.get("prefect_task_run_name") or "another task run"
    skipped = f"task run {task_run_name!r}" if task_run_name else "this task run"
    return (f"{skipped} was skipped: lock {name!r} is held by task run {holder!r} of this same flow run. "
            f"Every call of a @singleton task in .map() or .submit() gets the same lock name unless lock_name "
            f"names a parameter; to run the items in parallel, give each its own lock, e.g. @singleton(..., "
            f'lock_name="{recipe}"), or on_conflict="wait" to run them {_at_a_time(limit)}')


def _at_a_time(limit: int) -> str:
    return "one at a time" if limit == 1 else f"{limit} at a time"
