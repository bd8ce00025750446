"""``singleton --prefect-block NAME``: the real console script loads a saved block from the Prefect API.

The block's store is real and needs the password the block keeps as a secret,
which no output may show; lock names get the block's ``name_prefix``, so the
command and the block's flows name the same lock the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_blocks import LockConflict, SingletonBlock
from singleton_integrations.cli import EXIT_FREE, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.cli._secret_store import SINGLETON, assert_hidden, redis_requiring_password, singleton
from tests.servers import free_port

from .conftest import held_elsewhere

CHILD = Path(__file__).parents[1] / "cli" / "_child.py"  # reports ready, then waits for a "go" file
PREFIX = "etl/"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_requiring_password() as url:
        yield url


@pytest.fixture
def block_name(redis_url: str) -> str:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    SingletonBlock(url=redis_url, name_prefix=PREFIX).save(name)
    return name


def test_status_list_release_through_a_saved_block(block_name: str, redis_url: str, lock_name: str,
                                                   child_env: dict[str, str]) -> None:
    with held_elsewhere(redis_url, PREFIX + lock_name, env=child_env) as held:
        status = singleton("status", lock_name, "--prefect-block", block_name, env=child_env)
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith(f"lock '{lock_name}' is held by ") and f"pid {held.pid}" in status.stdout

        listed = singleton("list", "--prefix", lock_name, "--json", "--prefect-block", block_name, env=child_env)
        assert listed.returncode == 0, listed.stderr
        assert [(e["name"], e["holder"]["pid"]) for e in json.loads(listed.stdout)] == [(lock_name, held.pid)], \
            "names as the block's users name them, without its prefix"
        stored = singleton("list", "--prefix", PREFIX + lock_name, "--json", "--url", redis_url, env=child_env)
        assert [e["name"] for e in json.loads(stored.stdout)] == [PREFIX + lock_name]

        released = singleton("release", lock_name, "--force", "--prefect-block", block_name, env=child_env)
        assert released.returncode == 0 and "force-released" in released.stderr, released.stderr
        assert SingletonBlock.load(block_name).holder(lock_name) is None
        assert singleton("status", lock_name, "--prefect-block", block_name, env=child_env).returncode == EXIT_FREE


def test_run_holds_the_lock_the_block_guards(block_name: str, lock_name: str, child_env: dict[str, str],
                                             tmp_path: Path) -> None:
    block = SingletonBlock.load(block_name)
    run = subprocess.Popen([str(SINGLETON), "run", lock_name, "--prefect-block", block_name, "-v", "--",
                            sys.executable, str(CHILD), str(tmp_path), "job"],
                           env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = tmp_path / "job.ready"
        for _ in range(600):
            if ready.exists() or run.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), run.communicate(timeout=30)
        with pytest.raises(LockConflict), block.lock(lock_name):
            pass  # a flow guarded by the block finds the command's lock
        assert block.holder(lock_name).pid == run.pid
    finally:
        (tmp_path / "go").touch()
        out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert_hidden(out, err)
    assert f"the store of Prefect block '{block_name}': redis://:***@127.0.0.1:" in err
    assert block.holder(lock_name) is None


def test_a_missing_block_or_api_is_one_clear_line(child_env: dict[str, str]) -> None:
    name = f"no-such-{uuid.uuid4().hex[:8]}"
    missing = singleton("list", "--prefect-block", name, env=child_env)
    assert missing.returncode == EXIT_USAGE
    assert missing.stderr.startswith(f"singleton: --prefect-block '{name}': the Prefect API at "), missing.stderr
    assert "has no Singleton block by that name" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    down = {**child_env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api", "PREFECT_CLIENT_MAX_RETRIES": "0"}
    unreachable = singleton("list", "--prefect-block", name, env=down)
    assert unreachable.returncode == EXIT_UNAVAILABLE, unreachable.stderr
    assert unreachable.stderr.startswith(f"singleton: --prefect-block '{name}': the Prefect API at "
                                         f"{down['PREFECT_API_URL']} did not answer: "), unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1
