"""Prefect events for a lock's life, one resource per lock name, so Automations can react."""

from __future__ import annotations

from typing import Any

from singleton_integrations import LockRecord

from ._context import RunInfo

__all__ = ["EVENT_NAMES", "emit_lock_event", "lock_resource_id"]

#: Every event this package emits, as ``singleton.lock.<what>``.
EVENT_NAMES = (
    "singleton.lock.acquired",
    "singleton.lock.conflict",
    "singleton.lock.expired",
    "singleton.lock.lost",
    "singleton.lock.released",
)


def lock_resource_id(name: str) -> str:
    """The event resource id of lock ``name``: the same name is the same resource everywhere."""
    return f"singleton.lock.{name}"


def emit_lock_event(
    what: str,
    name: str,
    *,
    run: RunInfo,
    backend: str,
    message: str,
    record: LockRecord | None = None,
) -> None:
    """Send ``singleton.lock.<what>``; never raises (an event must not break locking).

    Outside any run with no Prefect API configured there is no one to tell, and
    Prefect would start an ephemeral server just for the event: skip it.
    """
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    if not (run.flow_run_id or run.task_run_id) and PREFECT_API_URL.value() is None:
        return

    event = f"singleton.lock.{what}"
    assert event in EVENT_NAMES, event
    payload: dict[str, Any] = {"message": message, "store": backend}
    if record is not None:
        payload["holder"] = record.to_dict()
    resource = {"prefect.resource.id": lock_resource_id(name), "prefect.resource.name": name, "singleton.store": backend}
    try:
        emit_event(event=event, resource=resource, related=run.related(), payload=payload)
    except Exception:  # e.g. EventTooLarge from a huge message; the lock matters more than its event
        import logging

        logging.getLogger("prefect_blocks").exception("could not emit %s for lock %r", event, name)
