"""The store crashes (kill -9) and restarts mid-hold: the holder recovers or reports ``lost``; never two holders.

Each test runs its own throwaway server so a restart disturbs no other test:
redis-server (with and without an append-only file), SecantusDB, and a
PostgreSQL cluster made with initdb.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from singleton_integrations import Singleton, persisters

from ._servers import SERVERS, SHORT, Server


@pytest.fixture(params=[pytest.param(name, marks=[pytest.mark.slow] if name in ("postgres",) else [])
                        for name in SERVERS])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    directory = Path(tempfile.mkdtemp(prefix="singleton-restart-"))
    server = SERVERS[request.param](directory)
    server.name = request.param  # type: ignore[attr-defined]
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(180)
def test_store_crash_and_restart_mid_hold(server: Server, figures: dict[str, Any]) -> None:
    """kill -9 of the store while a renewing holder holds; restart on the same data. The holder either keeps the lock (a contender is refused) or reports ``lost``."""
    ttl = 6.0
    url = server.url() + ("&" if "?" in server.url() else "?") + SHORT[server.kind]
    holder = Singleton(f"reliability-restart-{uuid.uuid4().hex[:8]}", persisters.from_url(url),
                       lock_expire_seconds=ttl, auto_renew=True, renew_interval=1.0)
    lost, renewed, errors = threading.Event(), [], []
    holder.on("lost", lambda message: lost.set())
    holder.on("error", errors.append)
    holder.on("renewed", lambda message: renewed.append(time.monotonic()))
    assert holder.lock()
    first_token = holder.fencing_token
    server.crash()
    crashed_at = time.monotonic()
    time.sleep(1.0)
    server.start()
    restarted_at = time.monotonic()
    # Give renewal time to either succeed again or give up at the end of the lease.
    deadline = crashed_at + ttl + 10
    while time.monotonic() < deadline and not lost.is_set() and not any(t > restarted_at for t in renewed):
        time.sleep(0.1)
    kept = not lost.is_set() and holder.verify()
    contender = Singleton(holder.name, persisters.from_url(url), lock_expire_seconds=30)
    contender_got = contender.lock()
    figures.update(server=getattr(server, "name", server.kind), ttl_s=ttl, down_s=round(restarted_at - crashed_at, 2),
                   outcome="kept (renewals recovered)" if kept else "lost (reported)", renewal_errors=len(errors),
                   first_token=first_token, contender_acquired=contender_got,
                   contender_token=contender.fencing_token)
    if kept:
        assert not contender_got, "two holders after the restart"
        assert holder.release()
    else:
        assert lost.is_set() and holder.lost and not holder.held
        assert contender_got or contender.holder() is not None
        holder.release()
        if contender_got:
            assert contender.fencing_token > first_token, "the fencing counter went back after the restart"
        if contender_got:
            contender.release()
    if not server.durable:
        # Without persistence the restart forgets every lock: the holder must be told.
        assert not kept
    holder.persister.close()
    contender.persister.close()
