"""Lock outcomes that are errors, as Airflow exceptions so retry rules and policies can name them.

    AirflowException                    singleton_integrations.LockConflict / LockLost
    ├── SingletonLockConflict ──────────┤ (also a LockConflict)
    │   └── SingletonWaitTimeout        │  on_conflict="wait": wait_timeout ran out, retries apply too
    └── AirflowFailException            │
        └── SingletonLockLost ──────────┘ (also a LockLost): exclusivity was lost, failed, no retry

``SingletonLockConflict`` (on_conflict="retry") sends the task up_for_retry. Each keeps its
Airflow base class, which decides retrying, and subclasses the core's error, so
``except LockConflict`` catches a conflict whichever layer raised it. Use them in a retry
policy by dotted path, e.g.
``RetryRule(exception="airflow_provider.SingletonLockConflict", action=RetryAction.RETRY)``.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from singleton_integrations import LockConflict, LockLost, LockRecord

__all__ = ["SingletonLockConflict", "SingletonLockLost", "SingletonWaitTimeout"]


class SingletonLockConflict(AirflowException, LockConflict):
    """Another task or process holds the lock.

    ``holder`` is its record when known (as for the core's ``LockConflict``);
    ``holder_description`` names it in Airflow's terms (deployment, DAG, run, task).
    Under ``limit=N``, ``holders`` has every hold the refused attempt saw and ``limit`` is N.
    """

    def __init__(self, lock_name: str, holder: LockRecord | str | None = None, message: str | None = None,
                 holders: tuple[LockRecord, ...] = (), limit: int = 1) -> None:
        record = holder if isinstance(holder, LockRecord) else None
        description = holder.describe() if isinstance(holder, LockRecord) else holder
        LockConflict.__init__(self, lock_name, record,
                              message or f"lock {lock_name!r} is held by {description or 'another process'}",
                              holders=holders, limit=limit)
        self.lock_name = lock_name
        self.holder_description = description

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_conflict, (type(self), self.lock_name, self.holder, self.holder_description, str(self),
                                    self.holders, self.limit))


class SingletonWaitTimeout(SingletonLockConflict):
    """``on_conflict="wait"`` waited ``wait_timeout`` seconds and the lock was still held."""


class SingletonLockLost(AirflowFailException, LockLost):
    """The lock was ours but expired or was taken over before the work ended: exclusivity is not guaranteed."""

    def __init__(self, lock_name: str, message: str | None = None) -> None:
        LockLost.__init__(self, lock_name, message or f"exclusivity on lock {lock_name!r} was lost while the task ran")
        self.lock_name = lock_name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.lock_name, str(self)))


def _rebuild_conflict(cls: type[SingletonLockConflict], lock_name: str, record: LockRecord | None,
                      description: str | None, message: str, holders: tuple[LockRecord, ...] = (),
                      limit: int = 1) -> SingletonLockConflict:
    error = cls(lock_name, record if record is not None else description, message, holders=holders, limit=limit)
    error.holder_description = description
    return error
