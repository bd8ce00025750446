"""A store that hangs (SIGSTOP) or goes away (SIGKILL) under held locks.

Loss is learned in time: ``lost`` fires and ``held`` turns False before the
lease can have ended on the store, by the holder's own monotonic estimate less
a margin for one call's timeout (issue 14 item 2). Exit and SIGTERM get one
deadline for all held locks together, not one call timeout per lock (item 3).
Each server is a throwaway one of this module's, so freezing it disturbs no
other test.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from singleton_integrations import Singleton, persisters

from ._servers import MongoServer, PostgresServer, RedisServer, Server
from .conftest import read_fact, spawn, stop

KINDS = {"redis": lambda d: RedisServer(d, durable=False), "postgres": PostgresServer, "mongodb": MongoServer}
#: Exit and SIGTERM release every held lock within about 10 s together; 3 s of slack for a busy machine.
EXIT_DEADLINE = 13.0


@pytest.fixture(scope="module", params=list(KINDS))
def hung_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    directory = Path(tempfile.mkdtemp(prefix="singleton-hung-"))
    server = KINDS[request.param](directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def running(hung_server: Server) -> Iterator[Server]:
    """The module's server, answering again after each test whatever the test did to it."""
    yield hung_server
    if hung_server.process is None or hung_server.process.poll() is not None:
        hung_server.start()
    else:
        hung_server.thaw()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_lost_before_the_lease_ends(running: Server, fault: str, figures: dict[str, Any]) -> None:
    """Renewals cannot reach the store: ``lost`` fires and ``held`` turns False before the lease can have ended."""
    ttl = 6.0
    store = persisters.from_url(running.url())
    holder = Singleton(f"reliability-hung-{uuid.uuid4().hex[:8]}", store, lock_expire_seconds=ttl, auto_renew=True)
    lost = threading.Event()
    held_at_loss: list[bool] = []

    def on_lost(message: object) -> None:
        held_at_loss.append(holder.held)
        lost.set()

    holder.on("lost", on_lost)
    sent = time.monotonic()  # the acquire is sent after this: the lease ends no earlier than sent + ttl
    assert holder.lock()
    if fault == "frozen":
        running.freeze()
    else:
        running.kill_tree()
    fault_at = time.monotonic()
    fired = lost.wait(ttl + 2 * store.call_timeout + 5)
    lost_at = time.monotonic()
    held_after = holder.held
    if fault == "frozen":
        running.thaw()
    margin = min(store.call_timeout, ttl / 4)
    figures.update(persister=running.kind, fault=fault, ttl_s=ttl, call_timeout_s=store.call_timeout,
                   expected_margin_s=round(margin, 3), fault_after_acquire_s=round(fault_at - sent, 3),
                   lost_after_acquire_s=round(lost_at - sent, 3) if fired else None,
                   lost_before_lease_end_s=round(sent + ttl - lost_at, 3) if fired else None)
    try:
        assert fired, "lost never fired"
        assert lost_at < sent + ttl, f"lost fired {lost_at - sent - ttl:.2f} s after the lease had ended"
        assert held_at_loss == [False] and held_after is False and holder.lost
    finally:
        with contextlib.suppress(Exception):  # the killed server is not back yet: the lease ends by itself
            holder.release()
        store.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ending", ["exit", "sigterm"])
def test_exit_on_a_hung_store_is_bounded(running: Server, ending: str, figures: dict[str, Any]) -> None:
    """Several locks held when the store freezes: exit or SIGTERM ends the process within one deadline for all."""
    count = 4
    child = spawn("hold_many", {"url": running.url(), "name": f"reliability-exit-{uuid.uuid4().hex[:8]}",
                                "count": count}, stdin=True)
    try:
        assert read_fact(child, timeout=60)["event"] == "locked"
        running.freeze()
        started = time.monotonic()
        if ending == "exit":
            assert child.stdin is not None
            child.stdin.write("exit\n")
            child.stdin.flush()
        else:
            child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(60)
        finally:
            took = time.monotonic() - started
            running.thaw()
    finally:
        stop(child)
    figures.update(persister=running.kind, ending=ending, locks=count, exit_took_s=round(took, 3), exit_code=code)
    assert took < EXIT_DEADLINE, f"{ending} with {count} locks on a hung store took {took:.1f} s"
    assert code == (0 if ending == "exit" else -signal.SIGTERM)
