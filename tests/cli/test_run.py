"""``singleton run``: one winner, exit codes passed through, signals forwarded, the lock released."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from singleton_integrations.cli import EXIT_CONFLICT, EXIT_LOCK_LOST

from .conftest import Cli, finish


def test_racing_processes_one_runs_the_others_exit_75_naming_the_holder(any_cli: Cli) -> None:
    racers = {f"racer{i}": any_cli.start("run", any_cli.name, "--", *any_cli.child(f"racer{i}")) for i in range(4)}
    deadline = time.monotonic() + 60
    while sum(p.poll() is not None for p in racers.values()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    running = [label for label, process in racers.items() if process.poll() is None]
    assert len(running) == 1, "exactly one racer must hold the lock and wait for go()"
    winner = racers[running[0]]
    any_cli.wait_ready(running[0])
    for label, process in racers.items():
        if process is winner:
            continue
        code, _out, err = finish(process)
        assert code == EXIT_CONFLICT
        assert not any_cli.ran(label), "a loser must never run its command"
        assert f"pid {winner.pid}" in err and socket.gethostname() in err and "since" in err
        assert f"command={os.path.basename(sys.executable)}" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    any_cli.go()
    assert finish(winner)[0] == 0
    assert any_cli.run("status", any_cli.name).returncode == 1, "the winner released on exit"


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_code_is_the_commands(cli: Cli, code: int) -> None:
    cli.go()
    result = cli.run("run", cli.name, "--", *cli.child("job", "--exit", str(code)))
    assert result.returncode == code
    assert cli.run("status", cli.name).returncode == 1


def test_command_killed_by_a_signal_gives_128_plus_the_signal(cli: Cli) -> None:
    result = cli.run("run", cli.name, "--", "sh", "-c", "kill -KILL $$")
    assert result.returncode == 128 + signal.SIGKILL


def test_command_without_double_dash(cli: Cli) -> None:
    cli.go()
    assert cli.run("run", cli.name, *cli.child("job", "--exit", "4")).returncode == 4


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_reach_the_command_and_the_lock_is_released(cli: Cli, signum: signal.Signals) -> None:
    process = cli.start("run", cli.name, "--", *cli.child("job", "--trap"))
    cli.wait_ready("job")
    assert cli.run("status", cli.name).returncode == 0
    process.send_signal(signum)
    code, _out, err = finish(process)
    assert code == 7, err  # the command's own exit code after handling the signal
    assert (cli.workdir / "job.signal").read_text() == signum.name
    assert cli.run("status", cli.name).returncode == 1


def test_a_signal_ignored_when_started_stays_ignored(cli: Cli) -> None:
    # As from a shell: a background job's ignored SIGHUP is not forwarded, and the command runs on.
    process = cli.start("run", cli.name, "--", *cli.child("job", "--trap"), ignoring=(signal.SIGHUP,))
    cli.wait_ready("job")
    process.send_signal(signal.SIGHUP)
    assert cli.run("status", cli.name).returncode == 0, "the lock is still held"
    cli.go()
    code, _out, err = finish(process)
    assert code == 0, err
    assert not (cli.workdir / "job.signal").exists(), "the ignored signal reached the command"
    assert cli.run("status", cli.name).returncode == 1


def test_command_ended_by_a_forwarded_signal_gives_128_plus_it(cli: Cli) -> None:
    process = cli.start("run", cli.name, "--", *cli.child("job"))
    cli.wait_ready("job")
    process.send_signal(signal.SIGTERM)
    assert finish(process)[0] == 128 + signal.SIGTERM
    assert cli.run("status", cli.name).returncode == 1


def test_conflict_exit_code_option(cli: Cli) -> None:
    holder = cli.start("run", cli.name, "--", *cli.child("holder"))
    cli.wait_ready("holder")
    result = cli.run("run", cli.name, "--conflict-exit-code", "0", "--", *cli.child("second"))
    assert result.returncode == 0 and "is held by" in result.stderr and not cli.ran("second")
    assert cli.run("run", cli.name, "--conflict-exit-code", "9", "--", "true").returncode == 9
    cli.go()
    assert finish(holder)[0] == 0


def test_wait_acquires_after_the_holder_finishes_with_a_higher_fencing_token(any_cli: Cli) -> None:
    cli = any_cli
    holder = cli.start("run", cli.name, "--", *cli.child("holder"))
    _pid, first_token = cli.wait_ready("holder")
    waiter = cli.start("run", cli.name, "--wait", "60", "--", *cli.child("waiter"))
    assert cli.run("status", cli.name, "--json").returncode == 0
    assert not cli.ran("waiter")
    cli.go()
    assert finish(holder)[0] == 0
    assert finish(waiter)[0] == 0
    _pid, second_token = cli.wait_ready("waiter")
    assert second_token > first_token


def test_signal_while_waiting_cancels_the_wait(cli: Cli) -> None:
    holder = cli.start("run", cli.name, "--", *cli.child("holder"))
    cli.wait_ready("holder")
    waiter = cli.start("run", cli.name, "--wait", "60", "-v", "--", *cli.child("waiter"))
    assert waiter.stderr is not None
    for line in waiter.stderr:  # -v logs "locking" once the signal relay is in place
        if "locking" in line:
            break
    waiter.send_signal(signal.SIGTERM)
    assert finish(waiter)[0] == 128 + signal.SIGTERM
    assert not cli.ran("waiter")
    cli.go()
    assert finish(holder)[0] == 0


def test_lost_lock_terminates_the_command_with_exit_79(any_cli: Cli) -> None:
    cli = any_cli
    process = cli.start("run", cli.name, "--ttl", "1.5", "--", *cli.child("job", "--trap"))
    cli.wait_ready("job")
    forced = cli.run("release", cli.name, "--force")
    assert forced.returncode == 0 and "force-released" in forced.stderr
    code, _out, err = finish(process)  # the next renewal, within 0.5 s, finds the lock gone
    assert code == EXIT_LOCK_LOST
    assert (cli.workdir / "job.signal").read_text() == "SIGTERM"
    assert "lost" in err and "terminating" in err and "Traceback" not in err


def test_no_renew_lets_the_lease_expire_and_the_next_run_takes_over(cli: Cli) -> None:
    holder = cli.start("run", cli.name, "--ttl", "0.5", "--no-renew", "--", *cli.child("holder"))
    cli.wait_ready("holder")
    taker = cli.run("run", cli.name, "--wait", "30", "--", "true")
    assert taker.returncode == 0
    assert "expired" in taker.stderr, "taking over an expired lock is reported"
    cli.go()
    code, _out, err = finish(holder)
    assert code == 0 and "lost" in err, "the first holder learns at release that it lost the lock"


def test_metadata_is_shown_to_whoever_finds_the_lock_held(cli: Cli) -> None:
    holder = cli.start("run", cli.name, "--metadata", "team=data", "--metadata", "ticket=OPS-1", "--",
                       *cli.child("holder"))
    cli.wait_ready("holder")
    conflict = cli.run("run", cli.name, "--", "true")
    assert "team=data" in conflict.stderr and "ticket=OPS-1" in conflict.stderr
    status = json.loads(cli.run("status", cli.name, "--json").stdout)
    command = os.path.basename(sys.executable)
    assert status["holder"]["metadata"] == {"command": command, "team": "data", "ticket": "OPS-1"}
    cli.go()
    assert finish(holder)[0] == 0


def test_missing_and_unexecutable_commands_give_127_and_126(cli: Cli, tmp_path: Path) -> None:
    missing = cli.run("run", cli.name, "--", "no-such-command-anywhere")
    assert missing.returncode == 127 and "command not found" in missing.stderr
    plain = tmp_path / "not-executable"
    plain.write_text("echo hi\n")
    assert cli.run("run", cli.name, "--", str(plain)).returncode == 126
    assert cli.run("status", cli.name).returncode == 1, "the lock is released when CMD cannot start"


def test_store_outage_while_running_ends_in_a_lost_lock_and_exit_79(cli: Cli) -> None:
    """Renewals fail while the store is down; when the lease runs out, CMD is stopped: it may no longer be alone."""
    redis_persister = importlib.util.find_spec("singleton_integrations.persisters.redis")
    if redis_persister is None or shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("the Redis persister and redis-server are needed for this check")
        pytest.skip("needs the Redis persister and redis-server")
    from tests.servers.redis_server import start_throwaway

    server = start_throwaway()
    try:
        env = {**cli.env, "SINGLETON_URL": f"{server.url}?socket_timeout=0.5"}
        process = cli.start("run", cli.name, "--ttl", "2", "--", *cli.child("job", "--trap"), env=env)
        cli.wait_ready("job")
        server.stop()  # the store goes away mid-run
        code, _out, err = finish(process)
    finally:
        server.stop()
    assert code == EXIT_LOCK_LOST, err
    assert "renewing lock" in err and "retrying until the lease ends" in err
    assert "lost" in err and (cli.workdir / "job.signal").read_text() == "SIGTERM"
    assert "Traceback" not in err
