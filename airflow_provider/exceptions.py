"""Lock outcomes that are errors, as Airflow exceptions so retry rules and policies can name them.

    AirflowException
    ├── SingletonLockConflict   on_conflict="retry": the task goes up_for_retry (retries apply)
    │   └── SingletonWaitTimeout  on_conflict="wait": wait_timeout ran out, retries apply too
    └── AirflowFailException
        └── SingletonLockLost   exclusivity was lost while the task ran: failed, no retry

Use them in a retry policy by dotted path, e.g.
``RetryRule(exception="airflow_provider.SingletonLockConflict", action=RetryAction.RETRY)``.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

__all__ = ["SingletonLockConflict", "SingletonLockLost", "SingletonWaitTimeout"]


class SingletonLockConflict(AirflowException):
    """Another task or process holds the lock; ``holder`` is its one-line description."""

    def __init__(self, lock_name: str, holder: str | None = None, message: str | None = None) -> None:
        self.lock_name = lock_name
        self.holder = holder
        super().__init__(message or f"lock {lock_name!r} is held by {holder or 'another process'}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.lock_name, self.holder, str(self)))


class SingletonWaitTimeout(SingletonLockConflict):
    """``on_conflict="wait"`` waited ``wait_timeout`` seconds and the lock was still held."""


class SingletonLockLost(AirflowFailException):
    """The lock was ours but expired or was taken over before the work ended: exclusivity is not guaranteed."""

    def __init__(self, lock_name: str, message: str | None = None) -> None:
        self.lock_name = lock_name
        super().__init__(message or f"exclusivity on lock {lock_name!r} was lost while the task ran")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.lock_name, str(self)))
