"""What Airflow's providers manager reads through the ``apache_airflow_provider`` entry point.

Connection form fields are declared here (``conn-fields`` / ``ui-field-behaviour``, read
by Airflow 3.2+ without importing the hook); the hook keeps the equivalent methods for 3.0/3.1.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONFIG", "CONNECTION_TYPES", "get_provider_info"]

_HOOKS = "airflow_provider.hooks.singleton"
_OPTIONS = {
    "label": "Store options",
    "schema": {"type": ["string", "null"]},
    "description": "Extra URL query options passed to the lock store, e.g. key_prefix=etl&timeout=5",
}
_NETWORK_HIDDEN = ["extra"]


def _connection_type(suffix: str, hook: str, hook_name: str, *, hidden: list[str], relabeling: dict[str, str],
                     placeholders: dict[str, str], fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """One connection type's entry: ``singleton<suffix>``, its hook, its extra form fields and how Airflow shows it."""
    entry: dict[str, Any] = {
        "connection-type": f"singleton{suffix}",
        "hook-class-name": f"{_HOOKS}.{hook}",
        "hook-name": hook_name,
    }
    if fields is not None:
        entry["conn-fields"] = fields
    entry["ui-field-behaviour"] = {"hidden-fields": hidden, "relabeling": relabeling, "placeholders": placeholders}
    return entry


def _boolean_field(label: str) -> dict[str, Any]:
    return {"label": label, "schema": {"type": ["boolean", "null"], "default": False}}


#: One connection type per lock store; ``singleton`` takes a whole store URL. No type has a '_':
#: Airflow turns a type into a URI scheme, where RFC 3986 forbids it (and logs a warning each time).
CONNECTION_TYPES: list[dict[str, Any]] = [
    # The URL holds the store's password, so it lives in the password field: the one
    # field Airflow always redacts (API, UI) and masks in logs.
    _connection_type(
        "", "SingletonHook", "Singleton lock store (URL)",
        hidden=["host", "schema", "port", "login", "extra"],
        relabeling={"password": "Store URL (required)"},
        placeholders={"password": "redis://:password@redis:6379/0, postgresql://, mongodb://, sqlite:////abs/path.db"},
    ),
    _connection_type(
        "redis", "SingletonRedisHook", "Singleton lock store: Redis",
        fields={"ssl": _boolean_field("Use TLS (rediss://)"), "options": _OPTIONS},
        hidden=_NETWORK_HIDDEN,
        relabeling={"schema": "Database number"},
        placeholders={"host": "127.0.0.1", "port": "6379", "schema": "0", "login": "default (ACL user, optional)"},
    ),
    _connection_type(
        "mongodb", "SingletonMongoDbHook", "Singleton lock store: MongoDB",
        fields={"srv": _boolean_field("DNS seed list (mongodb+srv://)"), "options": _OPTIONS},
        hidden=_NETWORK_HIDDEN,
        relabeling={"schema": "Database"},
        placeholders={"host": "127.0.0.1 or host1:27017,host2:27017", "port": "27017", "schema": "singleton"},
    ),
    _connection_type(
        "postgres", "SingletonPostgresHook", "Singleton lock store: PostgreSQL",
        fields={
            "sslmode": {
                "label": "SSL mode",
                "schema": {
                    "type": ["string", "null"],
                    "enum": [None, "disable", "allow", "prefer", "require", "verify-ca", "verify-full"],
                },
            },
            "options": _OPTIONS,
        },
        hidden=_NETWORK_HIDDEN,
        relabeling={"schema": "Database"},
        placeholders={"host": "127.0.0.1", "port": "5432", "schema": "postgres", "login": "postgres"},
    ),
    _connection_type(
        "sqlite", "SingletonSqliteHook", "Singleton lock store: SQLite (one host only)",
        hidden=["schema", "port", "login", "password", "extra"],
        relabeling={"host": "Database file (required)"},
        placeholders={"host": "/var/lib/airflow/singleton-locks.sqlite3 (absolute path, shared by this host's workers)"},
    ),
]

#: ``[singleton]`` options in airflow.cfg (``AIRFLOW__SINGLETON__DEPLOYMENT`` ...).
CONFIG: dict[str, Any] = {
    "singleton": {
        "description": "The singleton-integrations provider.",
        "options": {
            "deployment": {
                "description": "How lock holders from this deployment are named in other deployments' conflict "
                "messages. Empty: the [api] base_url, else the host name.",
                "version_added": "0.1.0",
                "type": "string",
                "example": "eu-west-prod",
                "default": "",
            },
        },
    },
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("singleton-integrations")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from singleton_integrations import __version__

        return __version__


def get_provider_info() -> dict[str, Any]:
    """The provider's metadata; ``package-name`` is the distribution name, as Airflow requires."""
    modules = {kind: [f"airflow_provider.{kind}.singleton"] for kind in ("hooks", "operators", "sensors", "triggers")}
    integration = "Singleton"
    return {
        "package-name": "singleton-integrations",
        "name": "Singleton",
        "description": "Only one instance of a task at a time across Airflow deployments, "
        "with lock conflicts shown as native task states.",
        "versions": [_version()],
        "integrations": [{"integration-name": integration, "tags": ["software"]}],
        "hooks": [{"integration-name": integration, "python-modules": modules["hooks"]}],
        "operators": [{"integration-name": integration, "python-modules": modules["operators"]}],
        "sensors": [{"integration-name": integration, "python-modules": modules["sensors"]}],
        "triggers": [{"integration-name": integration, "python-modules": modules["triggers"]}],
        "connection-types": [dict(entry) for entry in CONNECTION_TYPES],
        "config": CONFIG,
        # The locks page and API (Airflow 3.1+); the plugin is empty outside the api-server.
        "plugins": [{"name": "singleton_locks", "plugin-class": "airflow_provider.plugins.locks.SingletonLocksPlugin"}],
        "task-decorators": [{"name": "singleton", "class-name": "airflow_provider.decorators.singleton.singleton_task"}],
    }
