"""Only one instance of a job at a time, across processes, hosts and deployments.

``Singleton`` / ``AsyncSingleton`` hold a name for as long as one object holds it;
``Lease`` / ``AsyncLease`` hold it for an owner token that any task or process may
renew or release. Integrations build on these public names only, never on the
private modules, so the validators and URL helpers they share are exported here too.
"""

from __future__ import annotations

from . import metrics, persisters
from ._errors import LockConflict, LockLost, MissingDependency, NotHeld, PersisterError, SingletonError, TokenChanged
from ._events import EVENTS
from ._lease import AsyncLease, Lease
from ._record import (
    MAX_LIMIT,
    AcquireResult,
    LockRecord,
    Owner,
    validate_limit,
    validate_metadata,
    validate_min_hold,
    validate_name,
    validate_owner_token,
    validate_ttl,
)
from ._singleton import DEFAULT_LOCK_EXPIRE_SECONDS, AsyncSingleton, Singleton
from ._urls import redact_url, scheme_of

__all__ = [
    "DEFAULT_LOCK_EXPIRE_SECONDS",
    "EVENTS",
    "MAX_LIMIT",
    "AcquireResult",
    "AsyncLease",
    "AsyncSingleton",
    "Lease",
    "LockConflict",
    "LockLost",
    "LockRecord",
    "MissingDependency",
    "NotHeld",
    "Owner",
    "PersisterError",
    "Singleton",
    "SingletonError",
    "TokenChanged",
    "metrics",
    "persisters",
    "redact_url",
    "scheme_of",
    "validate_limit",
    "validate_metadata",
    "validate_min_hold",
    "validate_name",
    "validate_owner_token",
    "validate_ttl",
]

__version__ = "0.1.0"
