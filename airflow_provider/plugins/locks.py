"""``SingletonLocksPlugin``: the "Singleton locks" page in the Admin menu and its API, on the api-server only.

The provider declares it in its provider info (``plugins``, read by Airflow 3.1+), so
installing the package is enough. Every Airflow process imports plugin classes; this
module stays cheap there, and builds the FastAPI app and the views only in an
api-server that serves the UI's API (``AIRFLOW_API_APPS`` names ``core``).

* ``GET /singleton/api/v1/locks?conn_id=&prefix=``: the live locks, one error row per
  store that cannot be read;
* ``POST /singleton/api/v1/locks/release``: the guarded release, audited as
  ``singleton.force_release``;
* ``/singleton/locks``: the page (Admin > Singleton locks), and a "Singleton lock" tab on
  each task instance showing the lock that task holds or held.
"""

from __future__ import annotations

import os
import sys
from typing import Any
from urllib.parse import urlsplit

try:  # the Task SDK's class (Airflow 3.2+), which core and workers both accept
    from airflow.sdk.plugins_manager import AirflowPlugin
except ImportError:
    from airflow.plugins_manager import AirflowPlugin  # type: ignore[no-redef]

__all__ = ["SingletonLocksPlugin", "entry_point_plugin", "on_api_server"]

#: Where the app is mounted, under the api-server's base path.
URL_PREFIX = "/singleton"


def on_api_server() -> bool:
    """Whether this process is an api-server serving the UI's API (where the page and API belong)."""
    apps = os.environ.get("AIRFLOW_API_APPS")
    if apps is not None:  # set by ``airflow api-server`` for itself and its workers
        return bool({"core", "all"} & {app.strip() for app in apps.split(",")})
    return sys.argv[1:2] == ["api-server"]


def _conf() -> Any:
    try:  # the Task SDK's view of airflow.cfg: what a worker that has no airflow-core reads
        from airflow.sdk import conf
    except ImportError:
        from airflow.configuration import conf
    return conf


def _base_path() -> str:
    """The path of ``[api] base_url`` (Airflow behind a reverse proxy at /airflow), without its trailing slash."""
    base = _conf().get("api", "base_url", fallback="/") or "/"
    path = urlsplit(base).path if base.startswith(("http://", "https://")) else base
    return path.rstrip("/")


def _fastapi_apps() -> list[dict[str, Any]]:
    from airflow_provider.plugins._app import create_app

    return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Singleton locks"}]


def _external_views() -> list[dict[str, Any]]:
    page = f"{_base_path()}{URL_PREFIX}/locks"
    return [
        {"name": "Singleton locks", "href": page, "destination": "nav", "category": "admin",
         "url_route": "singleton_locks"},
        # The UI fills in the task instance it shows (a mapped one's map index too).
        {"name": "Singleton lock", "destination": "task_instance", "url_route": "singleton_lock",
         "href": f"{page}?dag_id={{DAG_ID}}&run_id={{RUN_ID}}&task_id={{TASK_ID}}&map_index={{MAP_INDEX}}"},
    ]


class SingletonLocksPlugin(AirflowPlugin):
    """The locks page and API; empty outside an api-server."""

    name = "singleton_locks"
    if on_api_server():
        fastapi_apps = _fastapi_apps()
        external_views = _external_views()


def _providers_load_plugins() -> bool:
    """Whether Airflow loads the plugins providers declare: only with ``[core] lazy_discover_providers = False``."""
    return not _conf().getboolean("core", "lazy_discover_providers", fallback=True)


#: What the ``airflow.plugins`` entry point names. Airflow loads a provider's declared plugins only
#: when providers are discovered eagerly; otherwise the entry point brings the plugin in. Never
#: both: a second registration under the same name would be reported as a plugin import error.
entry_point_plugin: type[AirflowPlugin] | None = None if _providers_load_plugins() else SingletonLocksPlugin
