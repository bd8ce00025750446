"""Only one instance of a job at a time, across processes, hosts and deployments.

``Singleton`` / ``AsyncSingleton`` hold a name for as long as one object holds it;
``Lease`` / ``AsyncLease`` hold it for an owner token that any task or process may
renew or release. Integrations build on these public names only, never on the
private modules, so the validators and URL helpers they share are exported here too.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import metrics, persisters
    from ._errors import (
        LockConflict,
        LockLost,
        MissingDependency,
        NotHeld,
        PersisterError,
        SingletonError,
        TokenChanged,
    )
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

# Every task of an orchestrator runs in a fresh process, which pays for each import: a
# public name is imported at its first use, so a sync lock never loads asyncio, the
# SQLite store or the plug-in scan. The module each name comes from:
_SOURCES = {
    "LockConflict": "_errors",
    "LockLost": "_errors",
    "MissingDependency": "_errors",
    "NotHeld": "_errors",
    "PersisterError": "_errors",
    "SingletonError": "_errors",
    "TokenChanged": "_errors",
    "EVENTS": "_events",
    "AsyncLease": "_lease",
    "Lease": "_lease",
    "MAX_LIMIT": "_record",
    "AcquireResult": "_record",
    "LockRecord": "_record",
    "Owner": "_record",
    "validate_limit": "_record",
    "validate_metadata": "_record",
    "validate_min_hold": "_record",
    "validate_name": "_record",
    "validate_owner_token": "_record",
    "validate_ttl": "_record",
    "DEFAULT_LOCK_EXPIRE_SECONDS": "_singleton",
    "AsyncSingleton": "_singleton",
    "Singleton": "_singleton",
    "redact_url": "_urls",
    "scheme_of": "_urls",
}
_SUBMODULES = frozenset({"metrics", "persisters"})

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


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = _submodule(name)
    elif name in _SOURCES:
        value = getattr(_submodule(_SOURCES[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def _submodule(name: str) -> ModuleType:
    full = f"{__name__}.{name}"
    __import__(full)  # the import statement's own path, which ``python -X importtime`` reports
    return sys.modules[full]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
