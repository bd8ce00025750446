"""``singleton run --min-hold``: once per slot across deployments; a run inside the hold exits 75 saying where it ran."""

from __future__ import annotations

import json
import signal
import socket
import time

from singleton_integrations import persisters
from singleton_integrations._record import Owner
from singleton_integrations.cli import EXIT_CONFLICT, EXIT_USAGE

from .conftest import Cli, finish


def test_a_run_inside_the_hold_is_refused_and_says_when_and_where_the_slot_ran(any_cli: Cli) -> None:
    any_cli.go()
    first = any_cli.run("run", any_cli.name, "--min-hold", "60", "--metadata", "deployment=a", "--",
                        *any_cli.child("first"))
    assert first.returncode == 0 and any_cli.ran("first"), first.stderr
    second = any_cli.run("run", any_cli.name, "--min-hold", "60", "--metadata", "deployment=b", "--",
                         *any_cli.child("second"))
    assert second.returncode == EXIT_CONFLICT and not any_cli.ran("second"), "the slot already ran"
    err = second.stderr
    assert "already ran this slot" in err and f"on {socket.gethostname()} pid" in err and "deployment=a" in err
    assert "held until" in err and "for the minimum hold" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    status = any_cli.run("status", any_cli.name, "--json")
    holder = json.loads(status.stdout)["holder"]
    assert status.returncode == 0 and holder["released_at"] and holder["hold_until"], "held, marked released"
    assert "(ran)" in any_cli.run("list").stdout


def test_conflict_exit_code_applies_inside_the_hold(cli: Cli) -> None:
    cli.go()
    assert cli.run("run", cli.name, "--min-hold", "60", "--", *cli.child("first")).returncode == 0
    skipped = cli.run("run", cli.name, "--conflict-exit-code", "0", "--", *cli.child("second"))
    assert skipped.returncode == 0 and not cli.ran("second")


def test_a_short_hold_ends_and_the_next_slot_runs_with_a_higher_token(cli: Cli) -> None:
    cli.go()
    assert cli.run("run", cli.name, "--min-hold", "0.5", "--", *cli.child("first")).returncode == 0
    _pid, first_token = cli.wait_ready("first")
    deadline = time.monotonic() + 30
    while cli.run("status", cli.name).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    later = cli.run("run", cli.name, "--min-hold", "0.5", "--", *cli.child("second"))
    assert later.returncode == 0
    assert cli.wait_ready("second")[1] > first_token


def test_sigterm_during_the_job_releases_into_the_hold(cli: Cli) -> None:
    running = cli.start("run", cli.name, "--min-hold", "60", "--", *cli.child("job", "--trap"))
    cli.wait_ready("job")
    running.send_signal(signal.SIGTERM)
    assert finish(running)[0] == 7, "CMD's own exit code after the forwarded SIGTERM"
    refused = cli.run("run", cli.name, "--", *cli.child("again"))
    assert refused.returncode == EXIT_CONFLICT and "already ran this slot" in refused.stderr


def test_the_hold_outlasts_a_shorter_ttl(cli: Cli) -> None:
    cli.go()
    assert cli.run("run", cli.name, "--ttl", "1", "--min-hold", "60", "--", *cli.child("first")).returncode == 0
    time.sleep(1.2)  # past the lease: only the hold keeps the name
    assert cli.run("run", cli.name, "--", *cli.child("second")).returncode == EXIT_CONFLICT


def test_a_hold_recorded_by_another_client_is_reported_the_same_way(cli: Cli) -> None:
    store = persisters.from_url(cli.url)
    owner = Owner(host="deploy-a.internal", pid=4242, metadata={"deployment": "a"})
    store.acquire(cli.name, owner, 30, 60)
    assert store.release(cli.name, owner.owner_token)
    refused = cli.run("run", cli.name, "--", *cli.child("b"))
    assert refused.returncode == EXIT_CONFLICT and not cli.ran("b")
    assert "already ran this slot" in refused.stderr and "deploy-a.internal pid 4242 (deployment=a)" in refused.stderr


def test_bad_min_hold_values_are_usage_errors(cli: Cli) -> None:
    for value in ("0", "-1", "soon", "inf"):
        result = cli.run("run", cli.name, "--min-hold", value, "--", "true")
        assert result.returncode == EXIT_USAGE and "min-hold" in result.stderr
