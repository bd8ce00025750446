"""Stores for locks, chosen by class or by URL scheme.

Built in: ``memory://``, ``sqlite:///path`` (the embedded default), ``redis://``
and ``rediss://`` (with ``redis+sentinel://`` and ``redis+cluster://``), ``mongodb://`` and ``mongodb+srv://``, ``postgresql://``, ``mysql://`` and ``mariadb://``.
Third parties add schemes through the ``singleton_integrations.persisters``
entry-point group (name: the scheme; value: a ``Persister`` subclass that
overrides ``Persister.from_url(url, **options)``, whose docstring says what it
must do, and declares what it can do with the flags in ``CAPABILITIES``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .._urls import redact_url, scheme_of
from ._base import (
    CAPABILITIES,
    DEFAULT_PURGE_AFTER_SECONDS,
    HubWatch,
    Persister,
    ReleaseHub,
    ReleaseWatch,
    SleepWatch,
    run_blocking,
)

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from .memory import Memory
    from .mongodb import MongoDb
    from .mysql import MySql
    from .postgres import Postgres
    from .redis import Redis
    from .sqlite import Sqlite

__all__ = [
    "CAPABILITIES",
    "DEFAULT_PURGE_AFTER_SECONDS",
    "ENTRY_POINT_GROUP",
    "HubWatch",
    "Memory",
    "MongoDb",
    "MySql",
    "Persister",
    "Postgres",
    "Redis",
    "ReleaseHub",
    "ReleaseWatch",
    "SleepWatch",
    "Sqlite",
    "from_url",
    "preload",
    "run_blocking",
    "schemes",
]

ENTRY_POINT_GROUP = "singleton_integrations.persisters"

# Each persister's module is imported on first use: the core imports no driver, and a process
# that locks on one store pays for that store's module only (a fresh process per task pays it per run).
_LAZY = {
    "Memory": "memory",
    "Sqlite": "sqlite",
    "Redis": "redis",
    "MongoDb": "mongodb",
    "Postgres": "postgres",
    "MySql": "mysql",
}
_BUILTIN_SCHEMES = {
    "memory": "Memory",
    "sqlite": "Sqlite",
    "redis": "Redis",
    "rediss": "Redis",
    "unix": "Redis",
    "redis+sentinel": "Redis",
    "rediss+sentinel": "Redis",
    "redis+cluster": "Redis",
    "rediss+cluster": "Redis",
    "mongodb": "MongoDb",
    "mongodb+srv": "MongoDb",
    "postgresql": "Postgres",
    "postgres": "Postgres",
    "mysql": "MySql",
    "mariadb": "MySql",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = f"{__name__}.{_LAZY[name]}"
        __import__(module)  # the import statement's own path, which ``python -X importtime`` reports
        cls = getattr(sys.modules[module], name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _plugins() -> list[EntryPoint]:
    """The installed plug-in stores; read only for a scheme that is not built in (the scan costs tens of ms)."""
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def schemes() -> dict[str, type[Persister]]:
    """Every URL scheme known here, built in or added by an installed package."""
    found: dict[str, type[Persister]] = {}
    for point in _plugins():
        found[point.name.lower()] = point.load()
    for scheme, class_name in _BUILTIN_SCHEMES.items():
        found[scheme] = __getattr__(class_name)
    return found


def preload(*stores: str) -> None:
    """Import the persisters and drivers for ``stores`` (URL schemes such as ``"redis"``, or URLs) now.

    Drivers are imported at a store's first use, which a fresh process pays for:
    ``import redis`` alone costs about 270 ms of CPU. A long-lived process that forks
    short-lived ones (an Airflow worker's task processes) calls this once at start.
    Nothing connects.
    """
    for store in stores:
        _class_for(store if "://" in store else f"{store}://", store).preload()


def _class_for(url: str, shown: str) -> Any:
    scheme = scheme_of(url)
    class_name = _BUILTIN_SCHEMES.get(scheme)
    if class_name is not None:
        return __getattr__(class_name)
    plugins = _plugins()
    matches = [p for p in plugins if p.name.lower() == scheme]
    if not matches:
        known = ", ".join(sorted({*_BUILTIN_SCHEMES, *(p.name for p in plugins)}))
        raise ValueError(f"no persister for scheme {scheme!r} in {redact_url(shown)!r}; known schemes: {known}")
    return matches[0].load()


def from_url(url: str, **options: Any) -> Persister:
    """A persister for ``url``; keyword options override the URL's query options.

    Nothing connects here: the first lock operation does.
    """
    persister: Persister = _class_for(url, url).from_url(url, **options)  # each class's own from_url
    return persister

