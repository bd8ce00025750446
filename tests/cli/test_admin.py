"""``status``, ``list``, ``release --force`` and ``--fencing-token``, ``python -m``, and errors: one line, a documented
code, no secrets."""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path

import pytest

from singleton_integrations.cli import EXIT_CONFLICT, EXIT_FREE, EXIT_UNAVAILABLE, EXIT_USAGE

from .conftest import Cli, finish

PASSWORD = "s3cret-Pa55word"


def test_status_list_and_json_describe_the_holder(any_cli: Cli) -> None:
    cli = any_cli
    assert cli.run("status", cli.name).returncode == EXIT_FREE
    holder = cli.start("run", cli.name, "--metadata", "team=data", "--", *cli.child("holder"))
    _pid, token = cli.wait_ready("holder")

    status = cli.run("status", cli.name)
    assert status.returncode == 0
    assert f"pid {holder.pid}" in status.stdout and f"fencing token {token}" in status.stdout

    data = json.loads(cli.run("status", cli.name, "--json").stdout)
    assert data["held"] is True and data["name"] == cli.name
    assert data["holder"]["pid"] == holder.pid and data["holder"]["host"] == socket.gethostname()
    assert data["holder"]["fencing_token"] == token and data["holder"]["expires_at"] is not None
    assert "owner_token" not in data["holder"], "the owner token is a capability, never printed"
    assert data["holders"] == [data["holder"]], "one hold: the holder is the only one"

    table = cli.run("list", "--prefix", cli.name).stdout.splitlines()
    assert table[0].split() == ["NAME", "HOLDER", "SINCE", "EXPIRES", "FENCE", "METADATA"]
    (row,) = [line for line in table[1:] if line.startswith(cli.name)]
    assert f"{socket.gethostname()}:{holder.pid}" in row and str(token) in row.split() and "team=data" in row

    listed = json.loads(cli.run("list", "--prefix", cli.name, "--json").stdout)
    assert [entry["name"] for entry in listed] == [cli.name]
    assert json.loads(cli.run("list", "--prefix", f"{cli.name}-other", "--json").stdout) == []
    cli.go()
    assert finish(holder)[0] == 0
    assert json.loads(cli.run("status", cli.name, "--json").stdout) == {"name": cli.name, "held": False, "holder": None,
                                                                        "holders": []}


def test_release_force_breaks_the_lock_and_is_logged(cli: Cli) -> None:
    holder = cli.start("run", cli.name, "--no-renew", "--", *cli.child("holder"))
    cli.wait_ready("holder")
    refused = cli.run("release", cli.name)
    assert refused.returncode == EXIT_USAGE and "--force" in refused.stderr
    assert cli.run("status", cli.name).returncode == 0, "without --force nothing is released"

    forced = cli.run("release", cli.name, "--force")
    assert forced.returncode == 0
    assert "force-released" in forced.stderr and f"pid {holder.pid}" in forced.stderr
    assert cli.run("status", cli.name).returncode == EXIT_FREE
    assert cli.run("release", cli.name, "--force").returncode == EXIT_FREE, "nothing left to release"
    cli.go()
    finish(holder)


AIRFLOW_TASK = {"deployment": "blue", "dag_id": "etl", "run_id": "r1", "task_id": "load", "map_index": "2"}


def test_list_json_gives_the_operators_rows(any_cli: Cli) -> None:
    cli = any_cli
    tags = [arg for key, value in AIRFLOW_TASK.items() for arg in ("--metadata", f"{key}={value}")]
    holder = cli.start("run", cli.name, *tags, "--", *cli.child("holder"))
    _pid, token = cli.wait_ready("holder")
    (row,) = json.loads(cli.run("list", "--prefix", cli.name, "--json").stdout)
    assert set(row) == {"name", "holder", "since", "expires", "fencing_token", "min_hold_until", "released_at",
                        "metadata"}, "the fields of singleton_integrations.admin.LockRow.to_json(), no more"
    assert row["name"] == cli.name and row["fencing_token"] == token
    assert row["holder"] == {"host": socket.gethostname(), "pid": holder.pid, "deployment": "blue", "dag_id": "etl",
                             "run_id": "r1", "task_id": "load", "map_index": 2}
    since, expires = datetime.fromisoformat(row["since"]), datetime.fromisoformat(row["expires"])
    assert since.utcoffset() is not None and since.utcoffset().total_seconds() == 0 and expires > since
    assert row["min_hold_until"] is None and row["released_at"] is None
    assert row["metadata"] == {**AIRFLOW_TASK, "command": os.path.basename(sys.executable)}
    cli.go()
    assert finish(holder)[0] == 0


def test_release_with_a_fencing_token_frees_only_that_hold(any_cli: Cli) -> None:
    cli = any_cli
    holder = cli.start("run", cli.name, "--no-renew", "--", *cli.child("holder"))
    _pid, token = cli.wait_ready("holder")

    stale = cli.run("release", cli.name, "--fencing-token", str(token - 1))
    _assert_one_clean_line(stale, EXIT_CONFLICT)
    assert f"fencing token {token - 1} no longer holds lock {cli.name!r}, so nothing was released" in stale.stderr
    assert f"is held by {socket.gethostname()} pid {holder.pid}" in stale.stderr
    assert f"fencing token {token}" in stale.stderr
    assert cli.run("status", cli.name).returncode == 0, "another token releases nothing"

    released = cli.run("release", cli.name, "--fencing-token", str(token))
    assert released.returncode == 0, released.stderr
    assert "force-released" in released.stderr and f"(fencing token {token})" in released.stderr
    assert cli.run("status", cli.name).returncode == EXIT_FREE

    again = cli.run("release", cli.name, "--fencing-token", str(token))
    _assert_one_clean_line(again, EXIT_FREE)
    assert f"lock {cli.name!r} is not held; nothing released" in again.stderr
    cli.go()
    finish(holder)


def test_release_with_a_fencing_token_inside_a_minimum_hold(cli: Cli) -> None:
    """A running hold is released into its minimum hold, as its own release would be; a finished one is left."""
    holder = cli.start("run", cli.name, "--no-renew", "--min-hold", "600", "--", *cli.child("holder"))
    _pid, token = cli.wait_ready("holder")
    released = cli.run("release", cli.name, "--fencing-token", str(token))
    assert released.returncode == 0, released.stderr
    assert f"lock {cli.name!r} stays taken for its minimum hold, until" in released.stderr
    status = cli.run("status", cli.name, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["holder"]["released_at"] is not None

    ran = cli.run("release", cli.name, "--fencing-token", str(token))
    _assert_one_clean_line(ran, EXIT_FREE)
    assert "already ran this slot" in ran.stderr and "nothing was released" in ran.stderr
    assert "release --force" in ran.stderr, "says how to end the hold"
    assert cli.run("status", cli.name).returncode == 0, "the minimum hold still keeps the name"
    assert cli.run("release", cli.name, "--force").returncode == 0
    assert cli.run("status", cli.name).returncode == EXIT_FREE
    cli.go()
    finish(holder)


def test_python_dash_m_is_the_same_command(cli: Cli) -> None:
    assert cli.run("status", cli.name, module=True).returncode == EXIT_FREE
    cli.go()
    assert cli.run("run", cli.name, "--", *cli.child("job", "--exit", "5"), module=True).returncode == 5
    version = cli.run("--version", module=True)
    assert version.returncode == 0 and "singleton-integrations" in version.stdout


def test_default_store_is_sqlite_in_the_state_directory(cli: Cli, tmp_path: Path) -> None:
    env = {k: v for k, v in cli.env.items() if k != "SINGLETON_URL"}
    holder = cli.start("run", cli.name, "--", *cli.child("holder"), env=env)
    cli.wait_ready("holder")
    assert (tmp_path / "state" / "singleton-integrations" / "locks.sqlite3").exists()
    assert cli.run("status", cli.name, env=env).returncode == 0
    assert cli.run("status", cli.name).returncode == EXIT_FREE, "a different store does not see it"
    cli.go()
    assert finish(holder)[0] == 0


def test_url_option_overrides_the_environment(cli: Cli, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    holder = cli.start("run", "--url", other, cli.name, "--", *cli.child("holder"))
    cli.wait_ready("holder")
    assert cli.run("status", "--url", other, cli.name).returncode == 0
    assert cli.run("status", cli.name).returncode == EXIT_FREE
    cli.go()
    assert finish(holder)[0] == 0


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed when the with-block ends: nothing listens there


def _assert_one_clean_line(result, code: int) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert PASSWORD not in result.stderr and PASSWORD not in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["run"],
        ["run", "NAME"],
        ["run", "NAME", "--ttl", "0", "--", "true"],
        ["run", "NAME", "--ttl", "soon", "--", "true"],
        ["run", "NAME", "--wait", "-1", "--", "true"],
        ["run", "NAME", "--conflict-exit-code", "256", "--", "true"],
        ["run", "NAME", "--metadata", "novalue", "--", "true"],
        ["run", "NAME", "--metadata", "$bad=1", "--", "true"],
        ["run", "NAME", "--ttl", "5", "true"],
        ["run", "", "--", "true"],
        ["run", "a\x01b", "--", "true"],
        ["status"],
        ["release", "NAME"],
        ["release", "NAME", "--fencing-token", "-1"],
        ["release", "NAME", "--fencing-token", "seven"],
        ["release", "NAME", "--fencing-token", "\u00b2"],
        ["list", "--frobnicate"],
    ],
)
def test_bad_arguments_exit_64_in_one_line(cli: Cli, args: list[str]) -> None:
    result = cli.run(*args)
    _assert_one_clean_line(result, EXIT_USAGE)


@pytest.mark.parametrize(
    "url",
    [
        f"bogus://user:{PASSWORD}@127.0.0.1/x",
        f"user:{PASSWORD}@127.0.0.1:5432/db",
        f"sqlite://user:{PASSWORD}@host/x.db",
        "memory://",
    ],
)
def test_bad_urls_exit_64_without_the_password(cli: Cli, url: str) -> None:
    for args in (["run", "--url", url, cli.name, "--", "true"], ["status", cli.name], ["list"]):
        env = {**cli.env, "SINGLETON_URL": url}
        _assert_one_clean_line(cli.run(*args, env=env), EXIT_USAGE)


@pytest.mark.parametrize(
    "make_url",
    [
        lambda port, tmp: f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/test?connect_timeout=3",
        lambda port, tmp: f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
        lambda port, tmp: f"sqlite:///{tmp / 'a-file' / 'locks.sqlite3'}",
    ],
    ids=["postgres", "redis", "sqlite-unwritable"],
)
def test_unreachable_store_exits_69_in_one_line(cli: Cli, tmp_path: Path, make_url) -> None:
    (tmp_path / "a-file").write_text("a file where a directory should be")
    env = {**cli.env, "SINGLETON_URL": make_url(_closed_port(), tmp_path)}
    for args in (["run", cli.name, "--", *cli.child("never")], ["status", cli.name], ["list"],
                 ["release", cli.name, "--force"]):
        result = cli.run(*args, env=env)
        _assert_one_clean_line(result, EXIT_UNAVAILABLE)
        assert "store unavailable" in result.stderr
    assert not cli.ran("never")


def test_unwritable_sqlite_directory_exits_69(cli: Cli, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        locked = Path("/proc/self/no-such-dir")  # even root cannot create directories in /proc
    else:
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
    result = cli.run("status", "--url", f"sqlite:///{locked / 'locks.sqlite3'}", cli.name)
    _assert_one_clean_line(result, EXIT_UNAVAILABLE)


def test_internal_errors_are_one_line_unless_debugging(cli: Cli, tmp_path: Path) -> None:
    # A persister registered through the entry-point group that is broken on purpose.
    plugin = tmp_path / "plugin"
    (plugin / "brokenstore-0.dist-info").mkdir(parents=True)
    (plugin / "brokenstore-0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: brokenstore\nVersion: 0\n")
    (plugin / "brokenstore-0.dist-info" / "entry_points.txt").write_text(
        "[singleton_integrations.persisters]\nbroken = brokenstore:Broken\n")
    (plugin / "brokenstore.py").write_text(
        "from singleton_integrations.persisters import Memory\n"
        "class Broken(Memory):\n"
        "    multiprocess = True\n"
        "    @classmethod\n"
        "    def from_url(cls, url, **options):\n"
        "        return cls()\n"
        "    def get(self, name):\n"
        "        raise ZeroDivisionError('a bug')\n"
        "    def holders(self, name):\n"
        "        raise ZeroDivisionError('a bug')\n"
        "    def list(self, prefix=''):\n"
        "        return 42\n"
    )
    env = {**cli.env, "SINGLETON_URL": "broken://x", "PYTHONPATH": str(plugin)}
    result = cli.run("list", env=env)
    _assert_one_clean_line(result, 70)
    assert "internal error" in result.stderr
    debug = cli.run("list", env={**env, "SINGLETON_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    # A driver error a persister leaked is still "store unavailable", not a crash.
    leaked = cli.run("status", "x", env=env)
    _assert_one_clean_line(leaked, EXIT_UNAVAILABLE)


def test_help_exits_zero(cli: Cli) -> None:
    for args in (["--help"], ["run", "--help"], ["list", "--help"]):
        result = cli.run(*args)
        assert result.returncode == 0 and "usage:" in result.stdout
    assert sys.executable  # the console script lives next to this interpreter (see conftest.SCRIPT)
