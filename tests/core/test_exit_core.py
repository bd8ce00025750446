"""Issue 14 items 2 and 3 against stores that stop answering.

Exit and SIGTERM release every held lock in parallel within one deadline,
however many locks and however hung the store. On a throwaway redis-server that
the test freezes with SIGSTOP, ``lost`` fires before the lease can have ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from singleton_integrations import Singleton, persisters
from tests.conftest import store_url_for

# A child that takes N locks, then makes every release hang (a store that stopped
# answering), then ends by exit or by SIGTERM, with the exit deadline set low.
_HOLDER = textwrap.dedent("""
    import sys, threading, time
    from singleton_integrations import Singleton, _process, persisters
    url, prefix, count, how, deadline = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
    _process.EXIT_RELEASE_SECONDS = deadline
    store = persisters.from_url(url)
    locks = [Singleton(f"{prefix}-{i}", store, lock_expire_seconds=60) for i in range(count)]
    assert all(lock.lock() for lock in locks)
    if how != "frozen":  # frozen: the test freezes the real server instead
        never = threading.Event()
        release = store.release
        store.release = lambda *args: (never.wait(), release(*args))[1]
    print("held", flush=True)
    if how == "sigterm":
        while True:
            time.sleep(1)
    sys.stdin.readline()
""")


def start_holder(url: str, prefix: str, count: int, how: str, deadline: float) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, url, prefix, str(count), how, str(deadline)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "held":
        process.kill()
        raise AssertionError(f"the holder did not start: {line!r} {process.communicate()[1]}")
    return process


def end_holder(process: subprocess.Popen[str], how: str) -> tuple[float, str]:
    started = time.monotonic()
    if how == "sigterm":
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    else:
        _, stderr = process.communicate("exit\n", timeout=60)
    return time.monotonic() - started, stderr


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_exit_with_hung_releases_is_bounded_by_one_deadline(store_url: str, how: str) -> None:
    prefix = f"core-exit-{uuid.uuid4().hex}"
    process = start_holder(store_url, prefix, 5, how, 1.0)
    elapsed, stderr = end_holder(process, how)
    # Sequential releases that each hang would never end (the old code waited for each in turn).
    assert elapsed < 30, f"exit took {elapsed:.1f} s"
    assert "gave up releasing 5 lock(s)" in stderr, stderr
    assert process.returncode == (-signal.SIGTERM if how == "sigterm" else 0)


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres", "mongodb"])  # memory dies with its process
def test_exit_releases_every_lock_when_the_store_answers(kind: str, tmp_path: Path) -> None:
    store_url = store_url_for(kind, tmp_path)
    prefix = f"core-exit-{uuid.uuid4().hex}"
    script = _HOLDER.replace('if how != "frozen":', "if False:")
    process = subprocess.Popen(
        [sys.executable, "-c", script, store_url, prefix, "5", "exit", "10"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    process.communicate("exit\n", timeout=60)
    store = persisters.from_url(store_url)
    try:
        assert store.list(prefix) == []
    finally:
        store.close()


# -- a real store frozen with SIGSTOP ------------------------------------------------------


@pytest.fixture
def frozen_redis() -> Iterator[object]:
    from tests.servers import redis_server

    try:
        server = redis_server.start_throwaway()
    except (FileNotFoundError, RuntimeError) as error:
        from tests.servers import unavailable

        unavailable("redis-server", str(error))
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def test_exit_with_five_locks_on_a_frozen_redis_is_bounded(frozen_redis: object) -> None:
    url = f"{frozen_redis.url}?socket_timeout=2"  # type: ignore[attr-defined]
    process = start_holder(url, f"core-frozen-{uuid.uuid4().hex}", 5, "frozen", 10.0)
    os.kill(frozen_redis.process.pid, signal.SIGSTOP)  # type: ignore[attr-defined]
    elapsed, stderr = end_holder(process, "exit")
    # Five sequential 2 s timeouts would take 10 s; in parallel they take one.
    assert elapsed < 8, f"exit took {elapsed:.1f} s: {stderr}"


def test_lost_fires_before_the_lease_ends_on_a_frozen_redis(frozen_redis: object) -> None:
    store = persisters.from_url(f"{frozen_redis.url}?socket_timeout=1")  # type: ignore[attr-defined]
    ttl = 4.0
    singleton = Singleton(
        f"core-frozen-{uuid.uuid4().hex}",
        store,
        lock_expire_seconds=ttl,
        auto_renew=True,
        renew_interval=0.5,
        release_on_sigterm=False,
    )
    confirmed: list[datetime] = []
    lost_at: list[datetime] = []
    fired = threading.Event()
    singleton.on("renewed", lambda message: confirmed.append(singleton._state.hold.expires_at))
    singleton.on("lost", lambda message: (lost_at.append(datetime.now(timezone.utc)), fired.set()))
    assert singleton.lock()
    time.sleep(1.2)  # a couple of renewals get through
    assert confirmed, "no renewal got through before the freeze"
    os.kill(frozen_redis.process.pid, signal.SIGSTOP)  # type: ignore[attr-defined]
    try:
        assert fired.wait(ttl + 5), "lost never fired while the store was frozen"
        assert not singleton.held
        lease_end = confirmed[-1]  # by the store's clock, from the last renewal it confirmed
        assert lost_at[0] < lease_end, json.dumps({"lost": lost_at[0].isoformat(), "lease_end": lease_end.isoformat()})
    finally:
        os.kill(frozen_redis.process.pid, signal.SIGCONT)  # type: ignore[attr-defined]
    assert singleton.release() is True  # thawed: the kept token still cleans up
    store.close()


# A child holding two locks on a SQLite file, one of them left to its owner on SIGTERM
# (release_on_sigterm=False), with a SIGTERM handler of its own that keeps it running.
_TWO_HOLDS = textwrap.dedent("""
    import signal, sys, time
    from singleton_integrations import Singleton, persisters
    store = persisters.from_url(sys.argv[1])
    signal.signal(signal.SIGTERM, lambda signum, frame: print("handled", flush=True))
    released_on_sigterm = Singleton("on-sigterm", store, lock_expire_seconds=60)
    left_to_owner = Singleton("left-to-owner", store, lock_expire_seconds=60, release_on_sigterm=False)
    assert released_on_sigterm.lock() and left_to_owner.lock()
    print("held", flush=True)
    sys.stdin.readline()
    print("still held" if left_to_owner.verify() else "gone", flush=True)
""")


def test_sigterm_leaves_a_lock_made_with_release_on_sigterm_false_to_its_owner(tmp_path: Path) -> None:
    """A holder that stops its work on SIGTERM itself (Airflow's guarded tasks) releases only after it stopped."""
    url = f"sqlite:///{tmp_path / 'locks.sqlite3'}"
    process = subprocess.Popen([sys.executable, "-c", _TWO_HOLDS, url], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdin is not None
    try:
        assert process.stdout.readline().strip() == "held", process.stderr.read() if process.stderr else ""
        process.send_signal(signal.SIGTERM)
        assert process.stdout.readline().strip() == "handled"  # the program's own handler ran after ours
        store = persisters.from_url(url)
        assert store.get("on-sigterm") is None
        assert store.get("left-to-owner") is not None
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "still held"
        assert process.wait(30) == 0
        assert store.get("left-to-owner") is None  # released at exit, once the work had ended
        store.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
