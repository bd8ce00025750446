"""Who holds a lock, in Airflow's terms: the metadata a task stores and the line a conflict prints.

Shared by the operator, the sensor's trigger and the guarded group, so a holder reads the
same wherever it is named (deployment first, then DAG, run, task, map index and try).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from typing import TYPE_CHECKING

from airflow.sdk import conf

if TYPE_CHECKING:
    from airflow.sdk import Context

    from singleton_integrations import LockRecord

__all__ = ["deployment_name", "describe_conflict", "describe_holder", "holder_metadata", "same_task_earlier_try"]


@lru_cache(maxsize=1)
def deployment_name() -> str:
    """This deployment's name in holder metadata: ``[singleton] deployment``, else ``[api] base_url``, else the host."""
    for section, key in (("singleton", "deployment"), ("api", "base_url")):
        value = (conf.get(section, key, fallback="") or "").strip()
        if value:
            return value
    return socket.gethostname()


def describe_holder(record: LockRecord | None, *, ours: str | None = None) -> str:
    """A conflict's holder, deployment first: "deployment X (dag d, run r, task t) on host h since T ..."."""
    if record is None:
        return "another process (it released as we looked)"
    meta = dict(record.metadata)
    if "dag_id" not in meta:  # not an Airflow holder: the core's wording
        return record.describe()
    deployment = meta.pop("deployment", "")
    where = f"deployment {deployment}" if deployment else "a deployment"
    if ours is not None and deployment == ours:
        where = f"this deployment ({deployment})"
    task = f"dag {meta.pop('dag_id')}, run {meta.pop('run_id', '?')}, task {meta.pop('task_id', '?')}"
    map_index = meta.pop("map_index", "-1")
    if map_index not in ("-1", ""):
        task += f", map index {map_index}"
    if "try_number" in meta:
        task += f", try {meta.pop('try_number')}"
    host = meta.pop("host", record.host)
    extra = "".join(f", {key}={value}" for key, value in sorted(meta.items()))

    def iso(moment: datetime | None) -> str:
        return moment.astimezone(timezone.utc).isoformat(timespec="seconds") if moment else "?"

    released_at = getattr(record, "released_at", None)
    if released_at is not None:
        until = getattr(record, "hold_until", None) or record.expires_at
        return (f"{where} ({task}{extra}), which ran this slot at {iso(record.created_at)} on host {host} and "
                f"released at {iso(released_at)}; held until {iso(until)} for the minimum hold "
                f"(fencing token {record.fencing_token})")
    until = f" until {iso(record.expires_at)}" if record.expires_at else ""
    return (f"{where} ({task}{extra}) on host {host} pid {record.pid}, since {iso(record.created_at)}{until} "
            f"(fencing token {record.fencing_token})")


def describe_conflict(name: str, holder: LockRecord | None, holders: Sequence[LockRecord] = (), limit: int = 1,
                      *, ours: str | None = None) -> str:
    """Why an attempt on ``name`` was refused, in the core's words, each holder in Airflow's terms.

    One holder: "lock 'n' is held by <holder>" (or "was run by" for a slot kept by its minimum
    hold). Under ``limit=N``: "lock 'n' is at its limit, 2 of 2 held: <holder>; <holder>".
    """
    if limit > 1:
        seen = tuple(holders) or ((holder,) if holder is not None else ())
        if not seen:  # refused only because earlier waiters in the store's queue take the free holds
            return f"lock {name!r} has no hold free for this task (limit {limit}): earlier waiters take them first"
        named = "; ".join(describe_holder(hold, ours=ours) for hold in seen)
        return f"lock {name!r} is at its limit, {len(holders) or limit} of {limit} held: {named}"
    described = describe_holder(holder, ours=ours)
    verb = "was run by" if "ran this slot" in described else "is held by"
    return f"lock {name!r} {verb} {described}"


def holder_metadata(context: Context, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Who holds the lock, in Airflow terms, so a conflict names the deployment, DAG, run and task."""
    ti = context["ti"]
    metadata = {
        "deployment": deployment_name(),
        "dag_id": str(ti.dag_id),
        "run_id": str(ti.run_id),
        "task_id": str(ti.task_id),
        "map_index": str(ti.map_index if ti.map_index is not None else -1),
        "try_number": str(ti.try_number),
        "host": str(getattr(ti, "hostname", None) or socket.gethostname()),
    }
    metadata.update({str(k): str(v) for k, v in (extra or {}).items()})
    return metadata


def same_task_earlier_try(record: LockRecord | None, context: Context) -> bool:
    """Whether ``record`` was taken by an earlier try of this very task instance, in this deployment.

    A cleared task's earlier try may have left its hold behind (its teardown was cleared
    with it); the new try recognises it by the holder metadata it wrote itself.
    """
    if record is None or getattr(record, "released", False):
        return False
    meta, ti = record.metadata, context["ti"]
    try:
        earlier = int(meta.get("try_number", "")) < int(ti.try_number)
    except ValueError:
        return False
    mine = {"deployment": deployment_name(), "dag_id": str(ti.dag_id), "run_id": str(ti.run_id),
            "task_id": str(ti.task_id), "map_index": str(ti.map_index if ti.map_index is not None else -1)}
    return earlier and all(meta.get(key) == value for key, value in mine.items())
