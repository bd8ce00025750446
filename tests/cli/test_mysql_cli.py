"""``singleton list``, ``status`` and ``release`` on a MySQL/MariaDB store, through the real console script."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from singleton_integrations.cli import EXIT_FREE, EXIT_UNAVAILABLE, EXIT_USAGE
from singleton_integrations.testing.conformance import with_query
from tests.servers import free_port, mysql_server

from .conftest import Cli, _cli, finish

SECRET = "s3cret-Maria"


@pytest.fixture
def mysql_cli(tmp_path: Path) -> Iterator[Cli]:
    """The CLI on the test server, in a table of its own (dropped after)."""
    base = mysql_server.url()
    table = f"singleton_cli_{uuid.uuid4().hex[:10]}"
    try:
        yield from _cli(with_query(base, table=table), tmp_path)
    finally:
        mysql_server.drop_store_tables(base, table)


def test_status_and_list_describe_the_holder_in_mysql(mysql_cli: Cli) -> None:
    cli = mysql_cli
    assert cli.run("status", cli.name).returncode == EXIT_FREE
    holder = cli.start("run", cli.name, "--metadata", "team=data", "--", *cli.child("holder"))
    _pid, token = cli.wait_ready("holder")

    status = cli.run("status", cli.name)
    assert status.returncode == 0, status.stderr
    assert f"pid {holder.pid}" in status.stdout and f"fencing token {token}" in status.stdout
    data = json.loads(cli.run("status", cli.name, "--json").stdout)
    assert data["held"] is True and data["holder"]["pid"] == holder.pid
    assert data["holder"]["host"] == socket.gethostname() and data["holder"]["fencing_token"] == token
    assert data["holder"]["expires_at"] is not None and "owner_token" not in data["holder"]

    table = cli.run("list", "--prefix", cli.name).stdout.splitlines()
    assert table[0].split() == ["NAME", "HOLDER", "SINCE", "EXPIRES", "FENCE", "METADATA"]
    (row,) = [line for line in table[1:] if line.startswith(cli.name)]
    assert f"{socket.gethostname()}:{holder.pid}" in row and str(token) in row.split() and "team=data" in row
    assert [entry["name"] for entry in json.loads(cli.run("list", "--prefix", cli.name, "--json").stdout)] == [cli.name]
    # The prefix is literal: LIKE's wildcards match nothing here.
    assert json.loads(cli.run("list", "--prefix", cli.name[:4] + "%", "--json").stdout) == []

    cli.go()
    assert finish(holder)[0] == 0
    assert json.loads(cli.run("status", cli.name, "--json").stdout) == {"name": cli.name, "held": False, "holder": None,
                                                                        "holders": []}
    assert cli.run("list", "--prefix", cli.name, "--json").stdout.strip() == "[]", "a released name is not listed"


def test_release_force_frees_a_mysql_lock(mysql_cli: Cli) -> None:
    cli = mysql_cli
    holder = cli.start("run", cli.name, "--no-renew", "--", *cli.child("holder"))
    _pid, token = cli.wait_ready("holder")
    refused = cli.run("release", cli.name)
    assert refused.returncode == EXIT_USAGE and "--force" in refused.stderr
    assert cli.run("status", cli.name).returncode == 0, "without --force nothing is released"

    forced = cli.run("release", cli.name, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "force-released" in forced.stderr and f"pid {holder.pid}" in forced.stderr
    assert cli.run("status", cli.name).returncode == EXIT_FREE
    assert cli.run("release", cli.name, "--force").returncode == EXIT_FREE, "nothing left to release"

    # The next holder's fencing token is above the broken one's.
    cli.go()
    finish(holder)
    second = cli.start("run", cli.name, "--", *cli.child("second"))
    _pid, next_token = cli.wait_ready("second")
    assert next_token > token
    finish(second)


def test_an_unreachable_mysql_store_exits_69_without_the_password(mysql_cli: Cli) -> None:
    cli = mysql_cli
    url = f"mysql://app:{SECRET}@127.0.0.1:{free_port()}/test?connect_timeout=1"
    for args in (("status", cli.name), ("list",), ("release", cli.name, "--force")):
        result = cli.run(*args, env={**cli.env, "SINGLETON_URL": url})
        assert result.returncode == EXIT_UNAVAILABLE, (args, result.stderr)
        assert SECRET not in result.stderr + result.stdout and len(result.stderr.strip().splitlines()) == 1
