"""Faults on real stores: a holder killed or terminated, and a store cut off by a proxy."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from singleton_integrations import PersisterError, Singleton, persisters

from ._proxy import TcpProxy, through
from .conftest import read_fact, spawn, stop

DEFAULT_PORTS = {"redis": 6379, "postgres": 5432, "mongodb": 27017}
#: Short client timeouts for the outage tests, set through each store's URL options.
SHORT_TIMEOUTS = {
    "redis": {"socket_timeout": "2", "socket_connect_timeout": "2"},
    "postgres": {"connect_timeout": "2", "pool_timeout": "2", "statement_timeout_ms": "2000"},
    "mongodb": {"timeoutMS": "2000", "serverSelectionTimeoutMS": "2000", "socketTimeoutMS": "2000",
                "connectTimeoutMS": "2000"},
}
CONFIGURED_TIMEOUT = 2.0


def unique(prefix: str) -> str:
    return f"reliability-{prefix}-{uuid.uuid4().hex[:12]}"


def test_kill9_holder_frees_within_ttl(kind: str, url: str, figures: dict[str, Any]) -> None:
    """kill -9 of the holder: the lock is free again within its TTL + 1 s, and the next token is higher."""
    name, ttl = unique("kill9"), 2.0
    holder = spawn("hold", {"url": url, "name": name, "ttl": ttl})
    try:
        fact = read_fact(holder)
        assert fact["event"] == "locked"
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        holder.wait(10)
    finally:
        stop(holder)
    successor = Singleton(name, persisters.from_url(url), lock_expire_seconds=30)
    acquired = successor.lock(wait=max(ttl + 1.0 - (time.monotonic() - killed_at), 0.0))
    free_after = time.monotonic() - killed_at
    figures.update(persister=kind, ttl_s=ttl, free_after_kill_s=round(free_after, 3), acquired=acquired)
    assert acquired, f"the lock of a killed holder was not free within TTL + 1 s ({free_after:.2f} s)"
    assert successor.fencing_token is not None and successor.fencing_token > fact["token"]
    successor.release()


@pytest.mark.parametrize("previous_handler", [False, True], ids=["default-action", "chained-handler"])
def test_sigterm_releases_within_one_second(kind: str, url: str, previous_handler: bool, figures: dict[str, Any]) -> None:
    """SIGTERM to a holder with a long lease: the lock is free within 1 s, then the process ends as it would have."""
    name = unique("sigterm")
    holder = spawn("hold", {"url": url, "name": name, "ttl": 300, "previous_handler": previous_handler})
    try:
        assert read_fact(holder)["event"] == "locked"
        successor = Singleton(name, persisters.from_url(url), lock_expire_seconds=30)
        os.kill(holder.pid, signal.SIGTERM)
        sent_at = time.monotonic()
        acquired = successor.lock(wait=1.0)
        free_after = time.monotonic() - sent_at
        code = holder.wait(10)
        chained = read_fact(holder)["event"] if previous_handler else None
    finally:
        stop(holder)
    figures.update(persister=kind, previous_handler=previous_handler, free_after_sigterm_s=round(free_after, 3),
                   exit_code=code)
    assert acquired, f"the lock was not released within 1 s of SIGTERM ({free_after:.2f} s)"
    successor.release()
    if previous_handler:
        assert chained == "previous handler ran" and code == 3
    else:
        assert code == -signal.SIGTERM


def short_timeout_url(kind: str, url: str, port: int) -> str:
    proxied = urlsplit(through(url, port))
    query = {**dict(parse_qsl(proxied.query)), **SHORT_TIMEOUTS[kind]}
    return urlunsplit(proxied._replace(query=urlencode(query)))


@pytest.fixture
def proxy(networked_kind: str, tmp_path: Any) -> Any:
    from tests.conftest import store_url_for

    url = store_url_for(networked_kind, tmp_path)
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORTS[networked_kind]).start()
    yield proxy, short_timeout_url(networked_kind, url, proxy.port), url
    proxy.stop()


def retry_until(deadline_s: float, attempt: Any) -> tuple[Any, int]:
    """Call ``attempt`` until it returns without PersisterError, up to ``deadline_s``; (result, tries)."""
    tries, deadline = 0, time.monotonic() + deadline_s
    while True:
        tries += 1
        try:
            return attempt(), tries
        except PersisterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_store_refused_then_back(networked_kind: str, proxy: Any, figures: dict[str, Any]) -> None:
    """The store's port closes (connections refused and reset): a clear PersisterError, then recovery once it is back."""
    tcp, proxied_url, _direct_url = proxy
    store = persisters.from_url(proxied_url)
    job = Singleton(unique("refused"), store, lock_expire_seconds=30)
    assert job.lock()
    tcp.stop()
    other = Singleton(unique("refused-other"), store, lock_expire_seconds=30)
    started = time.monotonic()
    with pytest.raises(PersisterError) as caught:
        other.lock()
    failed_after = time.monotonic() - started
    assert caught.value.backend == store.backend
    tcp.start()
    recovered, tries = retry_until(15, other.lock)
    assert recovered is True
    assert other.release() is True
    assert job.release() is True
    figures.update(persister=networked_kind, error=str(caught.value)[:200], error_after_s=round(failed_after, 3),
                   recovered_after_tries=tries)
    assert failed_after < 10


def test_store_partitioned_then_healed(networked_kind: str, proxy: Any, figures: dict[str, Any]) -> None:
    """Traffic swallowed (a partition): calls fail within the configured timeouts, a renewing holder reports ``lost``, and all recovers after healing."""
    tcp, proxied_url, direct_url = proxy
    ttl = 3.0
    store = persisters.from_url(proxied_url)
    holder = Singleton(unique("partition"), store, lock_expire_seconds=ttl, auto_renew=True, renew_interval=0.5)
    lost, errors = threading.Event(), []
    holder.on("lost", lambda message: lost.set())
    holder.on("error", errors.append)
    assert holder.lock()
    first_token = holder.fencing_token
    tcp.partition()
    partitioned_at = time.monotonic()
    other = Singleton(unique("partition-other"), store, lock_expire_seconds=30)
    with pytest.raises(PersisterError):
        other.lock()
    failed_after = time.monotonic() - partitioned_at
    lost_in_time = lost.wait(ttl + 4 * CONFIGURED_TIMEOUT + 5)
    lost_after = time.monotonic() - partitioned_at
    tcp.heal()
    recovered, tries = retry_until(20, other.lock)
    healed_at = time.monotonic()
    # The lost lease is free for others on the store itself, with a higher fencing token.
    successor = Singleton(holder.name, persisters.from_url(direct_url), lock_expire_seconds=30)
    successor_acquired = successor.lock(wait=ttl + 2)
    figures.update(persister=networked_kind, configured_timeout_s=CONFIGURED_TIMEOUT,
                   call_failed_after_s=round(failed_after, 3), lost_after_s=round(lost_after, 3),
                   renewal_errors=len(errors), recovered_after_tries=tries,
                   recovery_s=round(time.monotonic() - healed_at, 3))
    assert failed_after < 10, "a call hung past its timeout during the partition"
    assert lost_in_time and holder.lost and not holder.held
    # The core declares the loss from its own lease estimate, often while the first renewal is still
    # waiting on the partition: a renewal error may come after ``lost`` or not at all.
    assert all(isinstance(e, PersisterError) for e in errors)
    assert recovered is True and other.release() is True
    assert successor_acquired and successor.fencing_token is not None and successor.fencing_token > first_token
    assert successor.release() is True
    store.close()


@pytest.mark.slow
def test_partition_with_default_timeouts(networked_kind: str, proxy: Any, figures: dict[str, Any]) -> None:
    """With the persister's own default timeouts, a partitioned store fails a call within about 10 s (rule 9)."""
    tcp, _, direct_url = proxy
    store = persisters.from_url(through(direct_url, tcp.port))
    job = Singleton(unique("partition-default"), store, lock_expire_seconds=30)
    assert job.lock() and job.release()
    tcp.partition()
    started = time.monotonic()
    with pytest.raises(PersisterError):
        job.lock()
    failed_after = time.monotonic() - started
    tcp.heal()
    recovered, tries = retry_until(30, job.lock)
    figures.update(persister=networked_kind, call_failed_after_s=round(failed_after, 3), recovered_after_tries=tries)
    assert failed_after < 12, f"an unreachable store took {failed_after:.1f} s to fail"
    assert recovered is True and job.release() is True
    store.close()
