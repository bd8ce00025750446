"""Every example in ``examples/cron`` and ``examples/worker.py`` runs, alone and against each other."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Cli, finish

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CRON = EXAMPLES / "cron" / "nightly-export.sh"
LIMITED_CRON = EXAMPLES / "cron" / "warehouse-export.sh"
WORKER = EXAMPLES / "worker.py"


def _env(cli: Cli, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), cli.env["PATH"]])  # `singleton` on PATH, as installed
    return {**cli.env, "PATH": path, **extra}


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # a process group, so a test can stop the whole job


def _read_until(process: subprocess.Popen[str], text: str) -> str:
    assert process.stdout is not None
    seen = ""
    for line in process.stdout:
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"never printed {text!r}; got {seen!r}")


def _worker(cli: Cli, tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(WORKER), "--output", str(tmp_path / "exports.sqlite3"), *args]


def test_cron_example_runs_the_export_with_a_fencing_token(cli: Cli) -> None:
    result = subprocess.run([str(CRON)], env=_env(cli, EXPORT_SECONDS="0"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"exporting under 'nightly-export' with fencing token \d+", result.stdout)
    assert "export done" in result.stdout


def test_cron_example_skips_quietly_while_another_host_exports(cli: Cli) -> None:
    env = _env(cli, EXPORT_SECONDS="120")
    first = _start([str(CRON)], env)
    _read_until(first, "exporting under")
    second = subprocess.run([str(CRON)], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, "a skipped run is a success for cron"
    assert "another holder is running it" in second.stdout and "exporting" not in second.stdout
    assert "source=cron" in second.stderr, "the conflict line names the holder and its metadata"
    os.killpg(first.pid, signal.SIGTERM)  # stop the whole first job, as a shutdown would
    finish(first)
    status = subprocess.run([*cli.argv("status", "nightly-export")], env=env, capture_output=True, timeout=60)
    assert status.returncode == 1, "the interrupted job released the lock"


def test_limited_cron_example_runs_two_at_once_and_skips_the_third(cli: Cli) -> None:
    env = _env(cli, EXPORT_SECONDS="120")
    running = [_start([str(LIMITED_CRON)], env) for _ in range(2)]
    for job in running:
        _read_until(job, "exporting under 'warehouse-export'")
    third = subprocess.run([str(LIMITED_CRON)], env=env, capture_output=True, text=True, timeout=60)
    assert third.returncode == 0, "a skipped run is a success for cron"
    assert "2 exports are running already" in third.stdout and "exporting" not in third.stdout
    assert "2 of 2 held" in third.stderr and third.stderr.count("source=cron") == 2
    for job in running:
        os.killpg(job.pid, signal.SIGTERM)
        finish(job)
    status = subprocess.run([*cli.argv("status", "warehouse-export")], env=env, capture_output=True, timeout=60)
    assert status.returncode == 1, "every interrupted job released its hold"


def test_worker_example_writes_batches_with_rising_fencing_tokens(cli: Cli, tmp_path: Path) -> None:
    for _ in range(2):
        result = subprocess.run(_worker(cli, tmp_path, "--batches", "2", "--pause", "0"), env=_env(cli),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "batch 1 written" in result.stdout
    with sqlite3.connect(tmp_path / "exports.sqlite3") as db:
        rows = db.execute("SELECT fencing_token, batch FROM exported ORDER BY rowid").fetchall()
    assert [batch for _token, batch in rows] == [0, 1, 0, 1]
    first, second = rows[0][0], rows[2][0]
    assert rows[1][0] == first and rows[3][0] == second and second > first, "one token per run, rising"


def test_worker_example_refuses_a_stale_fencing_token(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("example_worker", WORKER)
    assert spec is not None and spec.loader is not None
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    db = worker.open_output(str(tmp_path / "exports.sqlite3"))
    worker.export_batch(db, 5, 0)
    with pytest.raises(worker.StaleWriter):
        worker.export_batch(db, 4, 1)  # a holder whose lease ended while it was paused
    worker.export_batch(db, 5, 1)
    assert db.execute("SELECT fencing_token, batch FROM exported").fetchall() == [(5, 0), (5, 1)]
    db.close()


def test_worker_and_cron_job_share_one_lock(cli: Cli, tmp_path: Path) -> None:
    env = _env(cli, EXPORT_SECONDS="0")
    worker = _start(_worker(cli, tmp_path, "--batches", "1000", "--pause", "0.05"), env)
    _read_until(worker, "batch 0 written")
    cron = subprocess.run([str(CRON)], env=env, capture_output=True, text=True, timeout=60)
    assert cron.returncode == 0 and "another holder is running it" in cron.stdout
    assert "source=worker" in cron.stderr
    worker.send_signal(signal.SIGTERM)  # the library releases held locks on SIGTERM
    code, _out, _err = finish(worker)
    assert code == -signal.SIGTERM
    conflict = subprocess.run(_worker(cli, tmp_path, "--batches", "1", "--pause", "0"), env=env,
                              capture_output=True, text=True, timeout=60)
    assert conflict.returncode == 0, "the lock was released when the worker was terminated"
    cron_holds = subprocess.run([str(CRON)], env=env, capture_output=True, text=True, timeout=60)
    assert "exporting under 'nightly-export'" in cron_holds.stdout


def test_worker_example_exits_75_while_the_cron_job_holds_the_lock(cli: Cli, tmp_path: Path) -> None:
    env = _env(cli, EXPORT_SECONDS="120")
    cron = _start([str(CRON)], env)
    _read_until(cron, "exporting under")
    result = subprocess.run(_worker(cli, tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 75 and "skipped: lock 'nightly-export' is held by" in result.stdout
    os.killpg(cron.pid, signal.SIGTERM)
    finish(cron)
