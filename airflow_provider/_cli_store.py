"""``singleton --airflow-conn ID``: the store an Airflow connection names, looked up the way Airflow does.

Registered in the ``singleton_integrations.stores`` entry-point group; Airflow is
imported on the first call, so a missing Airflow reads as the extra to install.
"""

from __future__ import annotations

from typing import Any

from singleton_integrations.stores import SourceNotFound, SourceUnavailable, StoreLocation, StoreSourceError

__all__ = ["KIND", "airflow_connection"]

KIND = "airflow-conn"


def airflow_connection(conn_id: str) -> StoreLocation:
    """The store of connection ``conn_id``: from the configured secrets backend, ``AIRFLOW_CONN_<ID>``, or the
    metadata database, as ``airflow connections get`` finds it."""
    from airflow_provider.hooks.singleton import store_url  # imports Airflow

    conn = _lookup(conn_id)
    try:
        url = store_url(conn, label="the connection")
    except ValueError as error:
        raise StoreSourceError(KIND, conn_id, str(error)) from None
    return StoreLocation(url, description=f"Airflow connection {conn_id!r}")


def _lookup(conn_id: str) -> Any:  # Airflow's Connection, from airflow-core or the task SDK
    try:  # airflow-core: secrets backend, environment variables, metadata database
        from airflow.models.connection import Connection

        get = Connection.get_connection_from_secrets
    except ImportError:  # the task SDK alone (a worker): secrets backend and environment variables
        from airflow.sdk import Connection as SdkConnection

        get = SdkConnection.get
    try:
        return get(conn_id)
    except Exception as error:  # noqa: BLE001  (a backend's or configuration's error: Airflow cannot answer)
        # By name: the class lives in airflow.exceptions or airflow.sdk.exceptions, by version.
        if any(cls.__name__ == "AirflowNotFoundException" for cls in type(error).__mro__):
            raise SourceNotFound(KIND, conn_id, "Airflow has no such connection (looked in its secrets backend, "
                                                f"AIRFLOW_CONN_{conn_id.upper()} and its metadata database)") from None
        raise SourceUnavailable(KIND, conn_id, f"Airflow could not look it up: {type(error).__name__}: "
                                               f"{error}") from None

