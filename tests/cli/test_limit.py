"""``singleton run --limit N``: up to N commands at once; the next exits 75 naming every holder."""

from __future__ import annotations

import json
import time

from singleton_integrations.cli import EXIT_CONFLICT

from .conftest import Cli, finish


def test_n_commands_run_at_once_and_the_next_exits_75_naming_each_holder(any_cli: Cli) -> None:
    runners = [any_cli.start("run", "--limit", "3", any_cli.name, "--", *any_cli.child(f"run{i}")) for i in range(3)]
    tokens = sorted(any_cli.wait_ready(f"run{i}")[1] for i in range(3))
    assert len(set(tokens)) == 3, "each hold has its own fencing token"

    code, _out, err = finish(any_cli.start("run", "--limit", "3", any_cli.name, "--", *any_cli.child("extra")))
    assert code == EXIT_CONFLICT
    assert not any_cli.ran("extra"), "a refused run never starts its command"
    assert f"lock {any_cli.name!r} is at its limit: 3 of 3 held" in err
    for runner, token in zip(runners, tokens, strict=True):
        assert f"pid {runner.pid} " in err and f"fencing token {token}" in err
    assert "Traceback" not in err

    status = any_cli.run("status", "--json", any_cli.name)
    assert status.returncode == 0
    shown = json.loads(status.stdout)
    assert shown["held"] is True and [hold["fencing_token"] for hold in shown["holders"]] == tokens
    assert shown["holder"]["fencing_token"] == tokens[0]
    text = any_cli.run("status", any_cli.name).stdout.splitlines()
    assert len(text) == 3 and all(any_cli.name in line for line in text)
    listed = json.loads(any_cli.run("list", "--json", "--prefix", any_cli.name).stdout)
    assert sorted(row["fencing_token"] for row in listed) == tokens

    any_cli.go()
    assert all(finish(runner)[0] == 0 for runner in runners)
    assert any_cli.run("status", any_cli.name).returncode == 1, "every run released its hold"


def test_a_run_with_a_smaller_limit_counts_the_holds_of_larger_ones(any_cli: Cli) -> None:
    first = any_cli.start("run", "--limit", "2", any_cli.name, "--", *any_cli.child("first"))
    any_cli.wait_ready("first")
    assert any_cli.run("run", any_cli.name, "--", "true").returncode == EXIT_CONFLICT, "limit 1: one hold is enough"
    second = any_cli.start("run", "--limit", "2", any_cli.name, "--", *any_cli.child("second"))
    any_cli.wait_ready("second")
    refused = any_cli.run("run", "--limit", "2", any_cli.name, "--", "true")
    assert refused.returncode == EXIT_CONFLICT and "2 of 2 held" in refused.stderr
    assert any_cli.run("run", "--limit", "3", any_cli.name, "--", "true").returncode == 0
    any_cli.go()
    assert finish(first)[0] == 0 and finish(second)[0] == 0


def test_a_waiting_run_starts_when_any_hold_is_released(any_cli: Cli) -> None:
    holders = [any_cli.start("run", "--limit", "2", any_cli.name, "--", *any_cli.child(f"hold{i}", "--exit", "0"))
               for i in range(2)]
    for i in range(2):
        any_cli.wait_ready(f"hold{i}")
    waiter = any_cli.start("run", "--limit", "2", "--wait", "120", any_cli.name, "--", "true")
    time.sleep(0.5)  # not a timing assertion: give the waiter the chance to (wrongly) start early
    assert waiter.poll() is None, "the waiter must not run while both holds are live"
    any_cli.go()  # both holders end; the waiter is woken by the first release
    assert finish(waiter)[0] == 0
    assert all(finish(holder)[0] == 0 for holder in holders)


def test_bad_limits_are_usage_errors(cli: Cli) -> None:
    for bad in ("0", "-1", "x", "1001"):
        result = cli.run("run", "--limit", bad, cli.name, "--", "true")
        assert result.returncode == 64 and "--limit" in result.stderr, result.stderr
