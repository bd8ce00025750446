"""The locks page and its API on a real ``airflow api-server``, with Airflow's own login (simple auth manager).

Two users: ``admin`` (role admin) and ``viewer`` (role viewer). The api-server runs
alone (``deployments.Deployment``'s environment and metadata database, no scheduler):
the locks are held by other processes (``tests/holder.py``) with an Airflow task's
holder metadata, as a task in another deployment would hold them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

from tests.airflow.conftest import Holder, Store
from tests.airflow.deployments import Deployment
from tests.servers import free_port

pytestmark = [pytest.mark.timeout(600)]

TAG = uuid.uuid4().hex[:8]
USERS = {"admin": "admin", "viewer": "viewer"}  # user name: role (and password)
API = "/singleton/api/v1"
#: The holder metadata of a task in another deployment (``airflow_provider._holders.holder_metadata``).
TASK_HOLDER = {"deployment": "eu-west", "dag_id": "nightly_load", "run_id": "scheduled__2026-12-07",
               "task_id": "load", "map_index": "2", "try_number": "1", "host": "worker-7"}
STANDARD_DB = "3"  # the standard redis connection's database, so its locks are not the provider connection's


class ApiServer(Deployment):
    """A deployment's api-server alone; its requests carry a user's bearer token."""

    token: str | None = None

    def start(self) -> None:
        log = open(self.home / "api-server.log", "wb")  # noqa: SIM115  (kept open for the child)
        self.processes["api-server"] = subprocess.Popen(
            [sys.executable, "-m", "airflow", "api-server", "--workers", "1"], env=self.env(), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_serving(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes["api-server"]
            if process.poll() is not None:
                raise RuntimeError(f"api-server exited ({process.returncode}):\n{self.log('api-server')}")
            if call(self.base_url, "GET", "/api/v2/monitor/health")[0] == 200:
                return
            time.sleep(0.5)
        raise RuntimeError(f"api-server not serving after {timeout} s\n{self.log('api-server')}")

    def login(self, user: str) -> str:
        status, body = call(self.base_url, "POST", "/auth/token", {"username": user, "password": USERS[user]})
        assert status == 201 or status == 200, (status, body)
        return str(body["access_token"])

    def request(self, method: str, path: str, body: Any = None, missing_ok: bool = False) -> Any:
        status, answer = call(self.base_url, method, path, body, token=self.token)
        if missing_ok and status == 404:
            return None
        if status >= 400:
            raise RuntimeError(f"{method} {path} -> {status}: {answer}")
        return answer


def call(base: str, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """One HTTP call; (status, JSON body or text). Status 0: nothing answered."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    except OSError:
        return 0, None
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text.decode(errors="replace")


def _redis() -> str:
    from tests.servers import redis_server

    return redis_server.url()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("admin-plugin")
    passwords = root / "passwords.json"
    passwords.write_text(json.dumps(USERS))
    deployment = ApiServer("locks", root, env_extra={
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{user}:{role}" for user, role in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    })
    try:
        migration = deployment.prepare()
        assert migration.wait(600) == 0, (deployment.home / "db-migrate.log").read_text()[-3000:]
        deployment.start()
        deployment.wait_serving()
        deployment.token = deployment.login("admin")
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def stores(server: ApiServer) -> dict[str, Store]:
    """Three connections, made through Airflow's REST API: ours, a standard redis one, and one nobody answers."""
    parts = urlsplit(_redis())
    password = unquote(parts.password or "") or None
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    own_db = parts.path.lstrip("/") or "0"
    made = {
        f"locks_own_{TAG}": ("singletonredis", own_db, port),
        f"locks_std_{TAG}": ("redis", STANDARD_DB, port),
        f"locks_down_{TAG}": ("singletonredis", "0", free_port()),
    }
    found: dict[str, Store] = {}
    for conn_id, (conn_type, db, conn_port) in made.items():
        server.request("POST", "/api/v2/connections", {"connection_id": conn_id, "conn_type": conn_type, "host": host,
                                                        "port": conn_port, "schema": db, "password": password})
        auth = f":{quote(password, safe='')}@" if password else ""
        found[conn_id.split("_")[1]] = Store("redis", f"redis://{auth}{host}:{conn_port}/{db}", conn_id)
    return found


@pytest.fixture
def name() -> str:
    return f"admin-{TAG}-{uuid.uuid4().hex[:6]}"


def _locks(server: ApiServer, **params: str) -> list[dict[str, Any]]:
    query = "&".join(f"{key}={quote(value)}" for key, value in params.items())
    status, body = call(server.base_url, "GET", f"{API}/locks?{query}", token=server.token)
    assert status == 200, (status, body)
    return list(body["locks"])


def test_the_provider_declares_the_plugin_with_its_page_and_task_instance_tab(server: ApiServer) -> None:
    plugins = server.get("/api/v2/plugins")["plugins"]
    plugin = next(p for p in plugins if p["name"] == "singleton_locks")
    assert [app["url_prefix"] for app in plugin["fastapi_apps"]] == ["/singleton"]
    views = {view["url_route"]: view for view in plugin["external_views"]}
    assert views["singleton_locks"]["destination"] == "nav" and views["singleton_locks"]["category"] == "admin"
    assert views["singleton_locks"]["href"] == "/singleton/locks"
    tab = views["singleton_lock"]
    assert tab["destination"] == "task_instance"
    assert {"{DAG_ID}", "{RUN_ID}", "{TASK_ID}", "{MAP_INDEX}"} <= {part.split("=")[1] for part in
                                                                      tab["href"].split("?")[1].split("&")}


def test_the_api_documents_itself(server: ApiServer) -> None:
    status, schema = call(server.base_url, "GET", "/singleton/openapi.json")
    assert status == 200 and {"/api/v1/locks", "/api/v1/locks/release"} <= set(schema["paths"]), schema
    assert call(server.base_url, "GET", "/singleton/docs")[0] == 200


def test_the_plugin_is_empty_outside_the_api_server() -> None:
    """Schedulers, workers and triggerers import plugin classes too: they build no app and no view."""
    from airflow_provider.plugins.locks import SingletonLocksPlugin, on_api_server

    assert not on_api_server()
    assert SingletonLocksPlugin.fastapi_apps == [] and SingletonLocksPlugin.external_views == []


@pytest.mark.parametrize("lazy", ["True", "False"])
def test_the_plugin_registers_once_however_airflow_discovers_providers(lazy: str) -> None:
    """Eager discovery loads the provider's declared plugin, lazy discovery the entry point; never both."""
    probe = ("from airflow import plugins_manager as m; plugins, errors = m._get_plugins(); "
             "print([p.name for p in plugins].count('singleton_locks'), len(errors))")
    env = {**os.environ, "AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS": lazy, "AIRFLOW_API_APPS": "all"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["1", "0"], done.stdout[-2000:]


def test_no_credentials_is_401(server: ApiServer) -> None:
    assert call(server.base_url, "GET", f"{API}/locks")[0] == 401
    body = {"conn_id": "x", "name": "y", "fencing_token": 1, "reason": "z"}
    assert call(server.base_url, "POST", f"{API}/locks/release", body)[0] == 401
    assert call(server.base_url, "GET", f"{API}/locks", token="not-a-token")[0] in (401, 403)


def test_a_viewer_may_neither_list_nor_release(server: ApiServer, stores: dict[str, Store], name: str,
                                               hold: Callable[..., Holder]) -> None:
    """The simple auth manager gives reading and editing connections to the op role; a viewer has neither."""
    holder = hold(stores["own"], name, metadata=TASK_HOLDER)
    viewer = server.login("viewer")
    status, body = call(server.base_url, "GET", f"{API}/locks", token=viewer)
    assert status == 403, body
    release = {"conn_id": stores["own"].conn_id, "name": name, "fencing_token": holder.fencing_token,
               "reason": "viewer tries"}
    status, body = call(server.base_url, "POST", f"{API}/locks/release", release, token=viewer)
    assert status == 403, body
    assert stores["own"].holder(name).fencing_token == holder.fencing_token


def test_the_list_shows_each_connections_locks_and_an_error_row_for_a_store_nobody_answers(
        server: ApiServer, stores: dict[str, Store], name: str, hold: Callable[..., Holder]) -> None:
    own = hold(stores["own"], f"{name}-own", metadata=TASK_HOLDER)
    std = hold(stores["std"], f"{name}-std", metadata={"purpose": "cron"})
    rows = _locks(server, prefix=name)
    mine = {(row["conn_id"], row["name"]): row for row in rows if row["name"]}
    assert set(mine) == {(stores["own"].conn_id, f"{name}-own"), (stores["std"].conn_id, f"{name}-std")}, rows

    task_lock = mine[(stores["own"].conn_id, f"{name}-own")]
    assert task_lock["fencing_token"] == own.fencing_token
    # The row of ``singleton list --json`` (singleton_integrations.admin), with its connection.
    assert task_lock["holder"] == {"host": socket.gethostname(), "pid": own.process.pid, "deployment": "eu-west",
                                   "dag_id": "nightly_load", "run_id": "scheduled__2026-12-07", "task_id": "load",
                                   "map_index": 2}
    assert task_lock["metadata"] == TASK_HOLDER
    assert task_lock["since"] and task_lock["expires"] and task_lock["since"] < task_lock["expires"]
    assert task_lock["min_hold_until"] is None and task_lock["released_at"] is None and task_lock["error"] is None
    assert "owner_token" not in task_lock

    cron_lock = mine[(stores["std"].conn_id, f"{name}-std")]
    assert cron_lock["fencing_token"] == std.fencing_token
    assert cron_lock["holder"]["pid"] == std.process.pid and cron_lock["holder"]["dag_id"] is None

    errors = {row["conn_id"]: row["error"] for row in rows if row["error"]}
    down = errors[stores["down"].conn_id]
    assert "Connection" in down or "connect" in down.lower(), down
    assert not any(row["error"] for row in rows if row["conn_id"] in (stores["own"].conn_id, stores["std"].conn_id))

    only = _locks(server, conn_id=stores["std"].conn_id, prefix=name)
    assert [(row["conn_id"], row["name"]) for row in only] == [(stores["std"].conn_id, f"{name}-std")]


def test_a_store_that_accepts_but_never_answers_is_an_error_row(server: ApiServer) -> None:
    """Every store call has a deadline: a server that takes the connection and says nothing cannot hold the page."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)  # the kernel completes the handshake; nothing ever reads or answers
        conn_id = f"locks_mute_{TAG}"
        server.request("POST", "/api/v2/connections", {"connection_id": conn_id, "conn_type": "singletonredis",
                                                        "host": "127.0.0.1", "port": mute.getsockname()[1]})
        try:
            rows = _locks(server, conn_id=conn_id)
        finally:
            server.request("DELETE", f"/api/v2/connections/{conn_id}")
    assert len(rows) == 1 and rows[0]["conn_id"] == conn_id and rows[0]["name"] is None, rows
    assert rows[0]["error"], rows


def test_the_release_is_guarded_by_the_fencing_token_and_audited(
        server: ApiServer, stores: dict[str, Store], name: str, hold: Callable[..., Holder]) -> None:
    store = stores["own"]
    holder = hold(store, name, metadata=TASK_HOLDER)
    release = {"conn_id": store.conn_id, "name": name, "reason": f"stuck worker {TAG}"}

    status, body = call(server.base_url, "POST", f"{API}/locks/release",
                        {**release, "fencing_token": holder.fencing_token + 1}, token=server.token)
    assert status == 409, body
    assert body["detail"]["current"]["fencing_token"] == holder.fencing_token
    assert store.holder(name).fencing_token == holder.fencing_token, "a changed token releases nothing"

    status, body = call(server.base_url, "POST", f"{API}/locks/release",
                        {**release, "fencing_token": holder.fencing_token}, token=server.token)
    assert status == 200, body
    assert body["previous_holder"]["fencing_token"] == holder.fencing_token
    assert body["previous_holder"]["holder"]["dag_id"] == "nightly_load"
    assert store.holder(name) is None

    status, body = call(server.base_url, "POST", f"{API}/locks/release",
                        {**release, "fencing_token": holder.fencing_token}, token=server.token)
    assert status == 409 and "is not held" in body["detail"]["message"], body

    logs = server.get("/api/v2/eventLogs?event=singleton.force_release&limit=100")["event_logs"]
    entries = [entry for entry in logs if json.loads(entry["extra"] or "{}").get("name") == name]
    assert len(entries) == 1, logs
    entry = entries[0]
    assert entry["owner"] == "admin"
    extra = json.loads(entry["extra"])
    assert extra["conn_id"] == store.conn_id and extra["fencing_token"] == holder.fencing_token
    assert extra["reason"] == f"stuck worker {TAG}"
    assert extra["previous_holder"]["holder"]["task_id"] == "load"


def test_a_release_needs_a_reason(server: ApiServer, stores: dict[str, Store], name: str,
                                  hold: Callable[..., Holder]) -> None:
    holder = hold(stores["own"], name, metadata=TASK_HOLDER)
    body = {"conn_id": stores["own"].conn_id, "name": name, "fencing_token": holder.fencing_token, "reason": "  "}
    assert call(server.base_url, "POST", f"{API}/locks/release", body, token=server.token)[0] == 422
    assert stores["own"].holder(name).fencing_token == holder.fencing_token


def test_the_page_in_a_real_browser_lists_and_releases_through_its_dialog(
        server: ApiServer, stores: dict[str, Store], name: str, hold: Callable[..., Holder], tmp_path: Path) -> None:
    import shutil

    from tests.airflow.test_deployments import _playwright_dir
    from tests.servers import unavailable

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    modules = _playwright_dir()
    if not (Path(chromium).exists() and shutil.which("node") and modules):
        unavailable("headless Chromium", "needs apt-get install chromium, node and npm's playwright-core")
    store = stores["own"]
    holder = hold(store, name, metadata=TASK_HOLDER)
    script = modules / "locks.mjs"
    shutil.copyfile(Path(__file__).parent / "browser" / "locks.mjs", script)
    shots = Path(os.environ.get("SINGLETON_SCREENSHOTS", tmp_path))
    task = "&".join(f"{key}={quote(TASK_HOLDER[key])}" for key in ("dag_id", "run_id", "task_id", "map_index"))
    done = subprocess.run(["node", str(script), server.base_url, str(shots), name, f"stuck worker {TAG}", task],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "CHROMIUM": chromium, "LOCKS_USER": "admin", "LOCKS_PASSWORD": "admin"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert name in facts["listed"] and str(holder.fencing_token) in facts["listed"], facts
    assert "nightly_load / scheduled__2026-12-07 / load[2]" in facts["listed"], facts
    assert facts["taskTab"]["highlighted"] == 1, facts
    assert facts["released"].startswith(f"Released {name}"), facts
    assert store.holder(name) is None
    logs = server.get("/api/v2/eventLogs?event=singleton.force_release&limit=100")["event_logs"]
    assert any(json.loads(entry["extra"] or "{}").get("name") == name for entry in logs)
