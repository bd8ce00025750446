"""``--airflow-conn``, ``--prefect-block`` and Airflow connection URIs in ``--url``, where no orchestrator is installed.

The real resolvers run in the Airflow and Prefect sessions (tests/airflow/test_cli_store.py,
tests/prefect/test_cli_store.py); here: the missing orchestrator, Airflow URIs read
without Airflow against real stores, and the entry-point mechanism itself.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from singleton_integrations import stores
from singleton_integrations.cli import EXIT_FREE, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.conftest import store_url_for

from ._secret_store import PASSWORD, assert_hidden, redis_requiring_password
from .conftest import Cli, finish


def _one_clean_line(result, code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert_hidden(result.stdout, result.stderr)
    return result.stderr.strip()


@pytest.mark.parametrize(
    ("option", "extra", "module"),
    [("--airflow-conn", "airflow", "airflow"), ("--prefect-block", "prefect", "prefect")],
)
def test_a_missing_orchestrator_names_the_extra_to_install(cli: Cli, option: str, extra: str, module: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed in this environment; its own session tests {option}")
    for command, *args in (["list"], ["status", cli.name], ["release", cli.name, "--force"],
                           ["run", cli.name, "--", "true"]):
        line = _one_clean_line(cli.run(command, option, "locks", *args), EXIT_UNAVAILABLE)
        assert line.startswith(f"singleton: {option} needs the '{extra}' extra: "
                               f"pip install 'singleton-integrations[{extra}]'"), line
        assert f"No module named '{module}'" in line


def test_sources_exclude_each_other_and_the_url(cli: Cli) -> None:
    for args in (["--url", cli.url, "--airflow-conn", "a"], ["--airflow-conn", "a", "--prefect-block", "b"],
                 ["--prefect-block", "b", "--url", cli.url]):
        line = _one_clean_line(cli.run("list", *args), EXIT_USAGE)
        assert "not allowed with argument" in line
    assert "expected a name" in _one_clean_line(cli.run("list", "--airflow-conn", ""), EXIT_USAGE)


@pytest.fixture(scope="module")
def redis_with_password() -> Iterator[str]:
    with redis_requiring_password() as url:
        yield url


def test_an_airflow_redis_uri_reaches_the_store_with_its_password(cli: Cli, redis_with_password: str) -> None:
    uri = f"singletonredis://:{quote(PASSWORD, safe='')}@127.0.0.1:{urlsplit(redis_with_password).port}/0"
    assert stores.store_url(uri) == redis_with_password
    holder = cli.start("run", "--url", redis_with_password, cli.name, "--metadata", "via=redis", "--",
                       *cli.child("holder"))
    _pid, token = cli.wait_ready("holder")

    status = cli.run("status", cli.name, "--url", uri)
    assert status.returncode == 0, status.stderr
    assert f"pid {holder.pid}" in status.stdout and f"fencing token {token}" in status.stdout
    listed = cli.run("list", "--prefix", cli.name, "--json", "--url", uri)
    assert [entry["name"] for entry in json.loads(listed.stdout)] == [cli.name]
    for output in (status, listed):
        assert_hidden(output.stdout, output.stderr)

    released = cli.run("release", cli.name, "--force", "--url", uri)
    assert released.returncode == 0 and "force-released" in released.stderr
    assert_hidden(released.stdout, released.stderr)
    assert cli.run("status", cli.name, "--url", uri).returncode == EXIT_FREE
    cli.go()
    finish(holder)


def test_a_wrong_password_in_an_airflow_uri_is_not_shown(cli: Cli, redis_with_password: str) -> None:
    port = urlsplit(redis_with_password).port
    uri = f"singletonredis://:{quote(PASSWORD[::-1], safe='')}@127.0.0.1:{port}/0"
    result = cli.run("status", cli.name, "--url", uri)
    assert result.returncode == EXIT_UNAVAILABLE
    assert_hidden(result.stderr, password=PASSWORD[::-1])
    assert f"store unavailable at redis://:***@127.0.0.1:{port}/0 (--url singletonredis://:***@127.0.0.1:{port}/0)" \
        in result.stderr, result.stderr


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_airflow_uris_of_every_own_type_name_the_same_lock(cli: Cli, tmp_path: Path, kind: str) -> None:
    url = store_url_for(kind, tmp_path)
    if kind == "postgres":
        parts = urlsplit(url)  # the test server trusts loopback: the password is carried, not checked
        conn = f"{quote(parts.username or '', safe='')}:{quote(PASSWORD, safe='')}@{parts.hostname}:{parts.port}"
        uris = [f"singletonpostgres://{conn}{parts.path}", f"singleton-postgres://{conn}{parts.path}",
                f"singleton://:{quote(url, safe='')}@"]
    else:
        path = url.removeprefix("sqlite:///")
        uris = [f"singletonsqlite://{quote(path, safe='')}", f"singleton://:{quote(url, safe='')}@"]
    holder = cli.start("run", "--url", url, cli.name, "--", *cli.child("holder"))
    cli.wait_ready("holder")
    for uri in uris:
        status = cli.run("status", cli.name, "--json", "--url", uri)
        assert status.returncode == 0, (uri, status.stderr)
        assert json.loads(status.stdout)["holder"]["pid"] == holder.pid
        assert_hidden(status.stdout, status.stderr)
    cli.go()
    assert finish(holder)[0] == 0


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("singletonredis://:p%40ss%2Fw@r:6380/2", "redis://:p%40ss%2Fw@r:6380/2"),
        ("singleton-redis://r:6380", "redis://r:6380/"),  # a connection of the earlier type name
        ("singletonredis://r/?__extra__=%7B%22ssl%22%3A+true%2C+%22options%22%3A+%22key_prefix%3Dx%22%7D",
         "rediss://r/?key_prefix=x"),  # extras that are not flat strings travel as JSON
        ("singletonredis://r:1/?ssl=true&timeout=5", "rediss://r:1/?timeout=5"),
        ("singletonmongodb://u:p@a%3A1%2Cb%3A2/locks", "mongodb://u:p@a:1,b:2/locks"),
        ("singletonmongodb://cluster.example/db?srv=true&authSource=admin",
         "mongodb+srv://cluster.example/db?authSource=admin"),
        ("singletonpostgres://u@pg:5432/db?sslmode=require", "postgresql://u@pg:5432/db?sslmode=require"),
        ("singletonsqlite://%2Fvar%2Flib%2FLocks.db", "sqlite:////var/lib/Locks.db"),  # the path keeps its case
        ("singleton://:redis%3A%2F%2F%3Apw%40h%3A1%2F0@", "redis://:pw@h:1/0"),
        ("redis://h:1/0", "redis://h:1/0"),  # a store URL stays as it is
    ],
)
def test_airflow_uris_map_as_the_hook_maps_connections(uri: str, expected: str) -> None:
    assert stores.store_url(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (f"singleton://:{quote(PASSWORD, safe='')}@", "needs its Store URL"),  # a password that is no URL
        (f"singletonredis://:{quote(PASSWORD, safe='')}@h:port/0", "malformed Airflow connection URI"),
        (f"singletonredis://h://x://:{quote(PASSWORD, safe='')}@y", "at most two"),
    ],
)
def test_bad_airflow_uris_exit_64_without_the_password(cli: Cli, uri: str, message: str) -> None:
    line = _one_clean_line(cli.run("list", "--url", uri), EXIT_USAGE)
    assert message in line, line


# -- the entry-point mechanism, with a resolver installed the way a third party would ---------


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution on sys.path that registers a ``test-source`` kind and a ``testuri`` URL scheme."""
    root = tmp_path / "plugin"
    info = root / "storeplugin-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: storeplugin\nVersion: 0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [singleton_integrations.stores]
        test-source = storeplugin:resolve
        needs-extra = storeplugin_missing:resolve [fancy]

        [singleton_integrations.store_urls]
        testuri = storeplugin:translate
    """))
    (root / "storeplugin.py").write_text(textwrap.dedent(f"""\
        from singleton_integrations.stores import SourceNotFound, StoreLocation

        def resolve(name):
            if name == "missing":
                raise SourceNotFound("test-source", name, "nothing by that name")
            if name == "plain":
                return "sqlite:////tmp/plain.db"
            return StoreLocation("redis://:{PASSWORD}@h:1/0", name_prefix="team/", description="test " + name)

        def translate(url):
            return "sqlite:///" + url.split("://", 1)[1]
    """))
    monkeypatch.syspath_prepend(str(root))
    return root


def test_resolvers_are_found_by_kind(plugin: Path) -> None:
    assert {"test-source", "needs-extra"} <= set(stores.kinds())
    location = stores.resolve("test-source", "x")
    assert (location.url, location.name_prefix, location.description) == (
        f"redis://:{PASSWORD}@h:1/0", "team/", "test x")
    assert PASSWORD not in repr(location)
    assert stores.resolve("test-source", "plain") == stores.StoreLocation("sqlite:////tmp/plain.db",
                                                                           description="test-source 'plain'")
    assert stores.store_url("testuri:///tmp/x.db") == "sqlite:////tmp/x.db"


def test_resolver_errors_are_typed_and_pickle(plugin: Path) -> None:
    with pytest.raises(stores.SourceNotFound, match="nothing by that name") as found:
        stores.resolve("test-source", "missing")
    assert isinstance(found.value, LookupError) and (found.value.kind, found.value.name) == ("test-source", "missing")
    with pytest.raises(stores.SourceNotInstalled) as missing:
        stores.resolve("needs-extra", "x")
    assert missing.value.install == "pip install 'storeplugin[fancy]'"
    assert "No module named 'storeplugin_missing'" in str(missing.value)
    with pytest.raises(stores.SourceUnavailable, match="no resolver is installed for 'no-such-kind'"):
        stores.resolve("no-such-kind", "x")
    for error in (found.value, missing.value):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.kind == error.kind


def test_a_translated_scheme_works_in_the_cli(cli: Cli, plugin: Path, tmp_path: Path) -> None:
    env = {**cli.env, "PYTHONPATH": str(plugin)}
    path = tmp_path / "via-plugin.sqlite3"
    holder = cli.start("run", "--url", f"sqlite:///{path}", cli.name, "--", *cli.child("holder"))
    cli.wait_ready("holder")
    assert cli.run("status", cli.name, "--url", f"testuri://{path}", env=env).returncode == 0
    cli.go()
    finish(holder)
