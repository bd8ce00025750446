"""Airflow discovers the provider: the CLI lists it, the providers manager has its hooks, form fields and decorator."""

from __future__ import annotations

import os
import subprocess
import sys

from airflow_provider.get_provider_info import CONNECTION_TYPES, get_provider_info

OUR_TYPES = {"singleton", "singletonredis", "singletonmongodb", "singletonpostgres", "singletonsqlite"}


def test_no_connection_type_has_an_underscore() -> None:
    """Airflow makes a URI scheme of the type and warns on every use of one with '_' (RFC 3986)."""
    assert not any("_" in conn_type for conn_type in OUR_TYPES)


def test_provider_info_names_the_distribution() -> None:
    info = get_provider_info()
    assert info["package-name"] == "singleton-integrations"
    assert {entry["connection-type"] for entry in info["connection-types"]} == OUR_TYPES
    assert info["task-decorators"] == [
        {"name": "singleton", "class-name": "airflow_provider.decorators.singleton.singleton_task"}]


def test_airflow_providers_list_includes_us() -> None:
    done = subprocess.run([sys.executable, "-m", "airflow", "providers", "list", "--output", "json"],
                          check=False, capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"package_name": "singleton-integrations"' in done.stdout


def test_task_runtime_sees_hooks_and_decorator() -> None:
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    runtime = ProvidersManagerTaskRuntime()
    assert "singleton-integrations" in runtime.providers
    for conn_type in OUR_TYPES:
        info = runtime.hooks[conn_type]
        assert info is not None and info.connection_testable, conn_type
    assert runtime.taskflow_decorators["singleton"].__name__ == "singleton_task"


def test_providers_manager_sees_form_fields() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "singleton-integrations" in manager.providers
    widgets = manager.connection_form_widgets
    assert "extra__singletonredis__ssl" in widgets and "extra__singletonpostgres__sslmode" in widgets
    assert not any(name.startswith(("extra__singleton__", "extra__singletonsqlite__")) for name in widgets), (
        "the URL and SQLite forms keep their one field among the standard (always visible) fields")
    behaviours = manager.field_behaviours
    assert behaviours["singletonredis"]["relabeling"] == {"schema": "Database number"}
    assert behaviours["singleton"]["relabeling"] == {"password": "Store URL (required)"}
    assert behaviours["singletonsqlite"]["relabeling"] == {"host": "Database file (required)"}


def test_hook_methods_match_the_declarations_for_older_airflow() -> None:
    from airflow_provider.hooks.singleton import SingletonRedisHook, SingletonSqliteHook

    declared = next(e for e in CONNECTION_TYPES if e["connection-type"] == "singletonsqlite")
    assert "get_ui_field_behaviour" in SingletonRedisHook.__dict__, "Airflow < 3.2 reads it from the class itself"
    assert SingletonSqliteHook.get_ui_field_behaviour()["hidden_fields"] == declared["ui-field-behaviour"]["hidden-fields"]
