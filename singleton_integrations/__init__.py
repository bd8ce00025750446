"""Only one instance of a job at a time, across processes, hosts and deployments."""

from __future__ import annotations

from . import persisters
from ._errors import LockConflict, LockLost, MissingDependency, PersisterError, SingletonError
from ._events import EVENTS
from ._record import AcquireResult, LockRecord, Owner
from ._singleton import DEFAULT_LOCK_EXPIRE_SECONDS, AsyncSingleton, Singleton

__all__ = [
    "DEFAULT_LOCK_EXPIRE_SECONDS",
    "EVENTS",
    "AcquireResult",
    "AsyncSingleton",
    "LockConflict",
    "LockLost",
    "LockRecord",
    "MissingDependency",
    "Owner",
    "PersisterError",
    "Singleton",
    "SingletonError",
    "persisters",
]

__version__ = "0.1.0"
