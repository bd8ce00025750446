"""Prefect events for a lock's life, one resource per lock name, so Automations can react.

Each ``singleton.lock.released`` event ``follows`` the ``singleton.lock.acquired``
event of its hold, as Prefect's own concurrency-limit events do, so the event feed
and automations order the pair even when they arrive out of order (Prefect keeps
``follows`` only for events less than five minutes apart).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from singleton_integrations import LockRecord

from ._context import RunInfo

if TYPE_CHECKING:
    from prefect.events import Event

__all__ = ["EVENT_NAMES", "HOLD_LABEL", "emit_lock_event", "lock_resource_id"]

#: The resource label naming the hold an event is about (its fencing token): acquired, released, lost, force-released.
HOLD_LABEL = "singleton.fencing-token"

#: Every event this package emits, as ``singleton.lock.<what>``.
EVENT_NAMES = (
    "singleton.lock.acquired",
    "singleton.lock.conflict",
    "singleton.lock.expired",
    "singleton.lock.force-released",
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
    follows: Event | None = None,
    payload: Mapping[str, Any] | None = None,
    related: list[dict[str, str]] | None = None,
    fencing_token: int | None = None,
) -> Event | None:
    """Send ``singleton.lock.<what>``; never raises (an event must not break locking).

    Returns the event sent (for a later event to ``follow``), or None when none was.
    ``payload`` and ``related`` add to the message, store and holder, and to the run.
    ``fencing_token`` labels the resource with the hold the event is about (``HOLD_LABEL``),
    so an automation can tell apart the holds of one name under ``limit=N``.
    Outside any run with no Prefect API configured there is no one to tell, and
    Prefect would start an ephemeral server just for the event: skip it.
    """
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    if not (run.flow_run_id or run.task_run_id) and PREFECT_API_URL.value() is None:
        return None

    event = f"singleton.lock.{what}"
    assert event in EVENT_NAMES, event
    body: dict[str, Any] = {"message": message, "store": backend}
    if record is not None:
        body["holder"] = record.to_dict()
    body.update(payload or {})
    resource = {"prefect.resource.id": lock_resource_id(name), "prefect.resource.name": name, "singleton.store": backend}
    if fencing_token is not None:
        resource[HOLD_LABEL] = str(fencing_token)
    try:
        return emit_event(event=event, resource=resource, related=[*run.related(), *(related or [])], payload=body,
                          follows=follows)
    except Exception:  # e.g. EventTooLarge from a huge message; the lock matters more than its event
        import logging

        logging.getLogger("prefect_blocks").exception("could not emit %s for lock %r", event, name)
        return None
