"""The Prefect examples in ``examples/prefect/`` run, and yield to another holder of the same lock name (or,
under ``limit=N``, count its hold)."""

from __future__ import annotations

import runpy
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from singleton_integrations import Singleton

from .conftest import ROOT, held_elsewhere

EXAMPLES = ROOT / "examples" / "prefect"


@pytest.fixture
def example_env(monkeypatch: pytest.MonkeyPatch, store_url: str, tmp_path: Path) -> str:
    monkeypatch.setenv("SINGLETON_URL", store_url)
    monkeypatch.setenv("RESULTS_FOLDER", str(tmp_path / "results"))
    return store_url


def load(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name=f"example_{uuid.uuid4().hex[:6]}")


def test_block_example(example_env: str) -> None:
    example = load("block_flow.py")
    example["save_block"]()
    done = example["nightly_export"](batches=2, return_state=True)
    assert done.name == "Completed" and done.result() >= 1
    with held_elsewhere(example_env, "nightly-export", "--metadata", "source=cron") as cron:
        skipped = example["nightly_export"](return_state=True)
    assert skipped.name == "Skipped" and f"pid {cron.pid}" in skipped.message and "source=cron" in skipped.message


def test_decorator_example_as_a_user_runs_it(example_env: str, child_env: dict[str, str]) -> None:
    env = {**child_env, "SINGLETON_URL": example_env}
    command = [sys.executable, str(EXAMPLES / "decorator_flow.py"), "eu"]
    ran = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=ROOT, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "state=Completed" in ran.stdout and "eu refreshed with fencing token" in ran.stdout
    with held_elsewhere(example_env, "nightly-export") as other:
        skipped = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=ROOT, timeout=300)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "state=Skipped" in skipped.stdout and "lock 'nightly-export' is held by" in skipped.stdout
    assert f"pid {other.pid}" in skipped.stdout and "refreshed" not in skipped.stdout


def test_transaction_example(example_env: str) -> None:
    example = load("transaction_flow.py")
    first, again, totals = example["report"]("2026-02-03")
    assert (first, again, totals) == ("Completed", "Cached", {"orders": 42})


def test_limit_example_runs_at_most_two_exports_and_counts_a_cron_jobs_hold(example_env: str,
                                                                            child_env: dict[str, str]) -> None:
    env = {**child_env, "SINGLETON_URL": example_env}
    command = [sys.executable, str(EXAMPLES / "limit_flow.py"), "eu", "us", "apac"]

    def exports() -> list[str]:
        ran = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=ROOT, timeout=300)
        assert ran.returncode == 0, ran.stderr[-2000:]
        lines = [line for line in ran.stdout.splitlines() if " exported with fencing token " in line]
        assert sorted(line.split()[0] for line in lines) == ["apac", "eu", "us"], ran.stdout
        return lines

    assert all(line.endswith(("1 of 2 holds taken", "2 of 2 holds taken")) for line in exports())
    cron = Singleton("warehouse-export", example_env, limit=2, metadata={"source": "cron"})
    assert cron.lock()
    try:
        beside_cron = exports()  # one hold left for the flow: the exports run one at a time
    finally:
        cron.release()
    assert all(line.endswith("2 of 2 holds taken") for line in beside_cron), beside_cron
