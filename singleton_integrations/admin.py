"""Operating locks: every live lock as a row, and releasing one hold named by its fencing token.

For operators' tools (``singleton list`` and ``singleton release --fencing-token``,
Prefect's admin flows, Airflow's admin page), so each shows the same fields and
breaks a lock by the same guard. The guard is the point: an operator looks at a
lock, decides its holder is gone, and asks to release *that* hold. If the lock
changed hands in between (the holder released and another run took it, or it
expired and was taken over), the new holder must keep it, so ``force_release``
names the hold by its fencing token and releases through the store's
owner-checked release, never its unconditional one.

>>> from singleton_integrations import Singleton, persisters
>>> store = persisters.Memory()
>>> job = Singleton("nightly", store, metadata={"dag_id": "etl", "run_id": "r1", "task_id": "load"})
>>> job.lock()
True
>>> (row,) = lock_rows(store)
>>> row.holder.dag_id, row.holder.task_id, row.fencing_token == job.fencing_token
('etl', 'load', True)
>>> force_release(store, "nightly", row.fencing_token + 1)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
singleton_integrations._errors.TokenChanged: lock 'nightly' is no longer held with fencing token ...
>>> force_release(store, "nightly", row.fencing_token).fencing_token == row.fencing_token
True
>>> lock_rows(store)
[]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ._errors import NotHeld, PersisterError, SingletonError, TokenChanged
from ._record import LockRecord, validate_name
from .persisters import Persister

__all__ = [
    "Holder",
    "LockRow",
    "NotHeld",
    "TokenChanged",
    "aforce_release",
    "alock_rows",
    "force_release",
    "lock_rows",
]

_logger = logging.getLogger("singleton_integrations.admin")


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the process, and, when its metadata says so, the deployment and Airflow task.

    ``deployment`` is the holder metadata's ``deployment`` (what the Airflow provider
    writes), else its Prefect deployment (``flow/deployment``). ``dag_id``, ``run_id``,
    ``task_id`` and ``map_index`` are set only for an Airflow task's hold (its metadata
    has a ``dag_id``); ``map_index`` is -1 for a task that is not mapped, as in Airflow.
    """

    host: str
    pid: int
    deployment: str | None = None
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    map_index: int | None = None

    @classmethod
    def from_record(cls, record: LockRecord) -> Holder:
        """The holder ``record`` names, read from its host, pid and metadata keys."""
        meta = record.metadata
        deployment = meta.get("deployment") or _prefect_deployment(meta)
        if "dag_id" not in meta:
            return cls(host=record.host, pid=record.pid, deployment=deployment)
        return cls(host=record.host, pid=record.pid, deployment=deployment, dag_id=meta["dag_id"],
                   run_id=meta.get("run_id"), task_id=meta.get("task_id"), map_index=_integer(meta.get("map_index")))

    @property
    def is_airflow_task(self) -> bool:
        """True when the hold is an Airflow task's."""
        return self.dag_id is not None

    def describe(self) -> str:
        """One line for a table cell: ``host pid N``, then the deployment and the Airflow task if known."""
        words = [f"{self.host} pid {self.pid}"]
        if self.deployment:
            words.append(f"deployment {self.deployment}")
        if self.dag_id is not None:
            task = f"dag {self.dag_id}, run {self.run_id or '?'}, task {self.task_id or '?'}"
            if self.map_index is not None and self.map_index >= 0:
                task += f", map index {self.map_index}"
            words.append(task)
        return ", ".join(words)

    def to_json(self) -> dict[str, Any]:
        """Every field, ``None`` where unknown, so a script sees one shape for every holder."""
        return {"host": self.host, "pid": self.pid, "deployment": self.deployment, "dag_id": self.dag_id,
                "run_id": self.run_id, "task_id": self.task_id, "map_index": self.map_index}


@dataclass(frozen=True)
class LockRow:
    """A live lock as an operator sees it; times are the store's, in UTC. No owner token: it is a capability.

    ``released_at`` is set (and ``expires`` is ``min_hold_until``) while a finished hold
    only keeps the name for its minimum hold.
    """

    name: str
    holder: Holder
    since: datetime
    expires: datetime | None
    fencing_token: int
    min_hold_until: datetime | None = None
    released_at: datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: LockRecord) -> LockRow:
        """The row for ``record``."""
        return cls(name=record.name, holder=Holder.from_record(record), since=_utc(record.created_at),
                   expires=_utc_or_none(record.expires_at), fencing_token=record.fencing_token,
                   min_hold_until=_utc_or_none(record.hold_until), released_at=_utc_or_none(record.released_at),
                   metadata=dict(record.metadata))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 in UTC (``None`` for never), the holder as its own object."""
        return {
            "name": self.name,
            "holder": self.holder.to_json(),
            "since": _iso(self.since),
            "expires": _iso(self.expires),
            "fencing_token": self.fencing_token,
            "min_hold_until": _iso(self.min_hold_until),
            "released_at": _iso(self.released_at),
            "metadata": dict(self.metadata),
        }


def lock_rows(persister: Persister, prefix: str = "") -> list[LockRow]:
    """Every live lock whose name starts with ``prefix``, sorted by name, as rows."""
    return [LockRow.from_record(record) for record in persister.list(_prefix(prefix))]


async def alock_rows(persister: Persister, prefix: str = "") -> list[LockRow]:
    """``lock_rows`` for coroutines."""
    return [LockRow.from_record(record) for record in await persister.alist(_prefix(prefix))]


def force_release(persister: Persister, name: str, fencing_token: int, *, reason: str = "") -> LockRecord:
    """Release ``name`` only while the hold with ``fencing_token`` has it; returns that hold's record.

    The hold is read, its token compared, then released with its own owner token
    through the store's owner-checked release: if it changed hands in between, the
    release is refused and nothing is freed. ``NotHeld`` when the name is free (or
    only kept for a finished hold's minimum hold), ``TokenChanged`` when another hold
    has it. A hold inside its minimum hold is released into it, as its holder's own
    release would be: the name frees when the hold ends. ``reason`` goes into the log line.

    The answer means the hold with ``fencing_token`` is over. When its holder released
    it in the same instant, a store that answers a repeated release as done (Redis)
    makes this call answer with the record too; no other hold is ever touched.
    """
    name, fencing_token = _arguments(name, fencing_token)
    record = _claim(name, fencing_token, persister.holders(name))
    if not persister.release(name, record.owner_token):
        raise _refused(persister, name, fencing_token, persister.holders(name))
    return _released(persister, record, reason)


async def aforce_release(persister: Persister, name: str, fencing_token: int, *, reason: str = "") -> LockRecord:
    """``force_release`` for coroutines."""
    name, fencing_token = _arguments(name, fencing_token)
    record = _claim(name, fencing_token, await persister.aholders(name))
    if not await persister.arelease(name, record.owner_token):
        raise _refused(persister, name, fencing_token, await persister.aholders(name))
    return _released(persister, record, reason)


# -- the rules, no I/O: shared by both faces ------------------------------------------------


def _arguments(name: object, fencing_token: object) -> tuple[str, int]:
    """Bad input fails before any I/O."""
    if isinstance(fencing_token, bool) or not isinstance(fencing_token, int):
        raise TypeError(f"a fencing token must be an int, not {type(fencing_token).__name__}")
    if fencing_token < 0:
        raise ValueError(f"a fencing token is never negative, got {fencing_token}")
    return validate_name(name), fencing_token


def _with_token(holds: list[LockRecord], fencing_token: int) -> LockRecord | None:
    """The hold with ``fencing_token`` among a name's holds; else the one another owner has now, if any."""
    return next((hold for hold in holds if hold.fencing_token == fencing_token), holds[0] if holds else None)


def _claim(name: str, fencing_token: int, holds: list[LockRecord]) -> LockRecord:
    """The record to release, if it is the live hold with ``fencing_token``; else the error that says why not.

    Under ``limit=N`` the name has several holds: only the one with ``fencing_token`` is ever touched.
    """
    record = _with_token(holds, fencing_token)
    if record is None:
        raise NotHeld(name, fencing_token)
    if record.fencing_token != fencing_token:
        raise TokenChanged(name, fencing_token, record)
    if record.released:  # its holder already released; only the minimum hold keeps the name
        raise NotHeld(name, fencing_token, record)
    return record


def _refused(persister: Persister, name: str, fencing_token: int, holds: list[LockRecord]) -> SingletonError:
    """The store refused the owner-checked release: the hold ended or changed hands after it was read."""
    now = _with_token(holds, fencing_token)
    if now is None or (now.released and now.fencing_token == fencing_token):
        return NotHeld(name, fencing_token, now)
    if now.fencing_token != fencing_token:
        return TokenChanged(name, fencing_token, now)
    return PersisterError(persister.backend, f"refused to release lock {name!r} by the owner token of its own live "
                                             f"hold (fencing token {fencing_token}); nothing was released")


def _released(persister: Persister, record: LockRecord, reason: str) -> LockRecord:
    because = f", reason: {reason!r}" if reason else ""  # quoted: a reason typed in a form stays one log line
    _logger.warning("force-released lock %r held by %s (%s)%s", record.name, record.describe(), persister.backend,
                    because)
    return record


def _prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"a name prefix must be a str, not {type(prefix).__name__}")
    return prefix


def _prefect_deployment(meta: Mapping[str, str]) -> str | None:
    deployment = meta.get("prefect_deployment_name")
    flow = meta.get("prefect_flow_name")
    return f"{flow}/{deployment}" if deployment and flow else deployment


def _integer(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc)


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _utc(moment)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
