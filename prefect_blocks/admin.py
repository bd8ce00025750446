"""Operating locks from Prefect: flows an operator runs from the UI's Run button, and a "held too long" automation.

Serve the two flows once, and they run from the UI with a form for their parameters::

    from prefect import serve
    from prefect_blocks.admin import force_release, list_locks

    serve(list_locks.to_deployment(name="locks"), force_release.to_deployment(name="force-release"))

``list_locks`` publishes every live lock of a saved Singleton block as the table
artifact ``singleton-locks``, one row per hold (a name held under ``limit=N`` has a
row for each holder). ``force_release`` releases a hold only while the hold
an operator looked at (its fencing token) still has it, leaving the name's other holds alone, and emits
``singleton.lock.force-released``. ``held_too_long_automation`` builds the automation
that acts when a lock is held longer than a given time. The rows, the guard and the
errors are the core's (``singleton_integrations.admin``), as the ``singleton`` CLI shows them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypedDict

from prefect import flow
from prefect.artifacts import create_table_artifact

from singleton_integrations import validate_name
from singleton_integrations.admin import LockRow, NotHeld, TokenChanged, lock_rows
from singleton_integrations.admin import force_release as release_hold

from ._block import SingletonBlock
from ._context import current_run, run_logger
from ._events import HOLD_LABEL, emit_lock_event, lock_resource_id

if TYPE_CHECKING:
    from prefect.automations import Automation
    from prefect.events.actions import ActionTypes
    from typing_extensions import Unpack

__all__ = [
    "ARTIFACT_KEY",
    "HOLD_ENDED_EVENTS",
    "NotHeld",
    "TokenChanged",
    "create_held_too_long_automation",
    "force_release",
    "held_too_long_automation",
    "list_locks",
]

#: The key of the table artifact ``list_locks`` publishes: the UI's Artifacts page keeps its history.
ARTIFACT_KEY = "singleton-locks"
#: The events that end a hold, any of which the "held too long" automation expects after ``acquired``.
HOLD_ENDED_EVENTS = ("singleton.lock.released", "singleton.lock.lost", "singleton.lock.force-released")


def _load(block: str) -> SingletonBlock:
    if not isinstance(block, str) or not block.strip():
        raise ValueError("block must name a saved Singleton block (prefect block ls lists them)")
    return SingletonBlock.load(block, _sync=True)  # type: ignore[call-arg,no-any-return]


def _shown(block: SingletonBlock, row: LockRow) -> LockRow:
    """``row`` named as the block's users name it, without the block's name prefix."""
    prefix = block.name_prefix or ""
    if prefix and row.name.startswith(prefix):
        return dataclasses.replace(row, name=row.name[len(prefix):])
    return row


def _cell(moment: datetime | None) -> str:
    """A time in a table cell: UTC to the second, short enough to leave room for the holder."""
    return "never" if moment is None else moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _table_row(row: LockRow) -> dict[str, Any]:
    """One row of the ``singleton-locks`` table: what an operator reads before releasing a lock."""
    holder = row.holder.describe()
    if row.released_at is not None:
        holder += f" (ran; released {_cell(row.released_at)})"
    return {
        "name": row.name,
        "holder": holder,
        "since": _cell(row.since),
        "expires": _cell(row.expires),
        "fencing token": row.fencing_token,
        "metadata": ", ".join(f"{key}={value}" for key, value in sorted(row.metadata.items())),
    }


@flow(name="singleton-list-locks", description="Every live lock of a Singleton block, as the table artifact "
                                                "'singleton-locks' (name, holder, since, expires, fencing token).")
def list_locks(block: str, prefix: str = "") -> list[dict[str, Any]]:
    """Publish every live lock of the saved Singleton block ``block`` whose name starts with ``prefix``.

    Names are shown as the block's users write them (without its name prefix), so a
    row's name and fencing token are what ``force_release`` takes. Returns the rows
    as ``singleton_integrations.admin.LockRow.to_json()`` dicts.
    """
    singleton_block = _load(block)
    rows = [_shown(singleton_block, row) for row in lock_rows(singleton_block.get_persister(),
                                                                singleton_block.lock_name(prefix))]
    looked = datetime.now(timezone.utc).isoformat(timespec="seconds")
    where = f" starting with {prefix!r}" if prefix else ""
    counted = _counted(rows)
    create_table_artifact(
        table=[_table_row(row) for row in rows],
        key=ARTIFACT_KEY,
        description=f"{counted}{where} in Singleton block `{block}` at {looked}. To free a hold whose holder is gone, "
                    "run `singleton-force-release` with its name and fencing token (a name's other holds stay).",
    )
    run_logger().info("%s%s in Singleton block %r", counted, where, block)
    return [row.to_json() for row in rows]


def _counted(rows: list[LockRow]) -> str:
    """``3 live lock(s)``, or ``4 live hold(s) of 3 lock(s)`` when a name has several holds (``limit=N``)."""
    names = len({row.name for row in rows})
    return f"{names} live lock(s)" if names == len(rows) else f"{len(rows)} live hold(s) of {names} lock(s)"


@flow(name="singleton-force-release", description="Release a lock's hold only while the hold with the given fencing "
                                                  "token has it (a name's other holds stay); fails and releases nothing "
                                                  "otherwise.")
def force_release(block: str, lock_name: str, fencing_token: int, reason: str) -> dict[str, Any]:
    """Release ``lock_name`` of Singleton block ``block`` while the hold with ``fencing_token`` has it.

    Under ``limit=N`` only that hold is released; the name's other holds are untouched.

    The run fails with ``NotHeld`` (the name is free, or only a finished run's minimum
    hold keeps it) or ``TokenChanged`` (another hold has it now), and releases nothing.
    Otherwise it emits ``singleton.lock.force-released`` (payload: ``reason``,
    ``previous_holder``, ``fencing_token``) and returns the previous holder's row.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("say why the lock is released (reason): it goes into the event and the log")
    singleton_block = _load(block)
    name = validate_name(singleton_block.lock_name(lock_name))
    persister = singleton_block.get_persister()
    log = run_logger()
    try:
        record = release_hold(persister, name, fencing_token, reason=reason)
    except (NotHeld, TokenChanged) as error:
        log.error("%s", error)
        raise
    previous = _shown(singleton_block, LockRow.from_record(record)).to_json()
    message = (f"force-released lock {name!r}, held by {record.describe()}; "
               f"reason: {reason}")
    related = []
    if record.metadata.get("prefect_flow_run_id"):  # the run that held it, so automations can find it
        related.append({"prefect.resource.id": f"prefect.flow-run.{record.metadata['prefect_flow_run_id']}",
                        "prefect.resource.role": "previous-holder"})
    emit_lock_event("force-released", name, run=current_run(), backend=persister.backend, message=message,
                    payload={"reason": reason, "previous_holder": previous, "fencing_token": fencing_token},
                    related=related, fencing_token=record.fencing_token)
    log.warning("%s", message)
    return previous


class AutomationOptions(TypedDict, total=False):
    """``held_too_long_automation``'s keywords, shared with ``create_held_too_long_automation``."""

    lock_name: str
    name: str | None
    description: str


def held_too_long_automation(
    within: timedelta,
    actions: Sequence[ActionTypes],
    *,
    lock_name: str = "*",
    name: str | None = None,
    description: str = "",
) -> Automation:
    """The automation "a lock held longer than ``within``", not yet created (``.create()`` or ``create_...`` does).

    A proactive trigger per hold (``for_each`` on the lock's resource id and the hold's
    fencing token, ``HOLD_LABEL``, so each of a name's holds under ``limit=N`` is timed
    apart): after ``singleton.lock.acquired``, it expects that hold to end (``released``,
    ``lost`` or ``force-released``) within ``within``, and runs ``actions`` when it does not.
    ``lock_name`` is a stored lock name (with the block's name prefix), or a prefix
    ending in ``*``; the default watches every lock. Prefect needs ``within`` of at least 10 s.
    """
    from prefect.automations import Automation, EventTrigger, Posture

    if not isinstance(within, timedelta):
        raise TypeError(f"within must be a timedelta, not {type(within).__name__}")
    if within < timedelta(seconds=10):
        raise ValueError(f"within must be at least 10 seconds (Prefect's least for a proactive trigger), not {within}")
    if not actions:
        raise ValueError("an automation needs at least one action (e.g. SendNotification, CancelFlowRun)")
    watched = lock_resource_id(lock_name)
    trigger = EventTrigger(
        posture=Posture.Proactive,
        match={"prefect.resource.id": watched},
        after={"singleton.lock.acquired"},
        expect=set(HOLD_ENDED_EVENTS),
        for_each={"prefect.resource.id", HOLD_LABEL},
        threshold=1,
        within=within,
    )
    lock_words = "a lock" if lock_name == "*" else f"lock {lock_name!r}"
    span = _span(within)
    return Automation(
        name=name or f"singleton: {lock_words} held longer than {span}",
        description=description or (f"Acts when {lock_words} (Prefect resource {watched}) is not released, lost or "
                                    f"force-released within {span} of being acquired."),
        trigger=trigger,
        actions=list(actions),
    )


def _span(within: timedelta) -> str:
    seconds = within.total_seconds()
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def create_held_too_long_automation(
    within: timedelta, actions: Sequence[ActionTypes], **options: Unpack[AutomationOptions]
) -> Automation:
    """Create ``held_too_long_automation(...)`` through the Prefect API; returns it with its ``id``.

    From a coroutine, create it with ``await held_too_long_automation(...).acreate()``.
    """
    automation = held_too_long_automation(within, actions, **options)
    return automation.create(_sync=True)  # type: ignore[call-arg,no-any-return]
