"""Airflow provider for singleton-integrations: one run of a task at a time across deployments.

Lock conflicts become native task states (skipped, failed, up_for_retry, deferred);
connections for Redis, MongoDB, PostgreSQL and SQLite appear in the Airflow UI.
Needs Apache Airflow 3 (``pip install 'singleton-integrations[airflow]'``).

The public names load on first use: Airflow imports ``get_provider_info`` from this
package while its own configuration is still initialising, so nothing here may
import Airflow eagerly.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_provider.decorators.singleton import singleton_task
    from airflow_provider.exceptions import SingletonLockConflict, SingletonLockLost, SingletonWaitTimeout
    from airflow_provider.hooks.singleton import (
        SingletonHook,
        SingletonMongoDbHook,
        SingletonPostgresHook,
        SingletonRedisHook,
        SingletonSqliteHook,
    )
    from airflow_provider.operators.singleton import ON_CONFLICT, SingletonOperator, SingletonReleaseOperator
    from airflow_provider.sensors.singleton import SingletonSensor
    from airflow_provider.triggers.singleton import SingletonTrigger

__all__ = [
    "ON_CONFLICT",
    "SingletonHook",
    "SingletonLockConflict",
    "SingletonLockLost",
    "SingletonMongoDbHook",
    "SingletonOperator",
    "SingletonPostgresHook",
    "SingletonRedisHook",
    "SingletonReleaseOperator",
    "SingletonSensor",
    "SingletonSqliteHook",
    "SingletonTrigger",
    "SingletonWaitTimeout",
    "singleton_task",
]

_MODULE_OF = {
    "singleton_task": ".decorators.singleton",
    "SingletonLockConflict": ".exceptions",
    "SingletonLockLost": ".exceptions",
    "SingletonWaitTimeout": ".exceptions",
    "SingletonHook": ".hooks.singleton",
    "SingletonMongoDbHook": ".hooks.singleton",
    "SingletonPostgresHook": ".hooks.singleton",
    "SingletonRedisHook": ".hooks.singleton",
    "SingletonSqliteHook": ".hooks.singleton",
    "ON_CONFLICT": ".operators.singleton",
    "SingletonOperator": ".operators.singleton",
    "SingletonReleaseOperator": ".operators.singleton",
    "SingletonSensor": ".sensors.singleton",
    "SingletonTrigger": ".triggers.singleton",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
