"""What only the Redis persister does: key layout, URLs, pooling, pub/sub, TLS and Unix sockets.

The lock rules themselves are in the conformance suite. Every test here uses
uuid names or prefixes, so it can share the server with other runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from singleton_integrations import PersisterError, Singleton, persisters
from singleton_integrations._record import Owner
from singleton_integrations.persisters import DEFAULT_PURGE_AFTER_SECONDS, Persister
from singleton_integrations.persisters._redis_scripts import RELEASED_MARKER, script_keys
from singleton_integrations.persisters.redis import Redis
from singleton_integrations.testing.conformance import PersisterConformance
from tests.core.test_redis_limits import limit_scenario
from tests.servers import redis_cluster, redis_sentinel, redis_server, unavailable

if os.environ.get("CI") == "true":  # the driver is part of the test environment there
    import redis
else:
    redis = pytest.importorskip("redis")


@pytest.fixture(scope="module")
def url() -> str:
    return redis_server.url()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def store(url: str, prefix: str) -> Iterator[Redis]:
    persister = Redis(url, key_prefix=prefix)
    yield persister
    persister.close()


@pytest.fixture
def raw(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url, decode_responses=True)
    yield client
    client.close()


def closed_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def throwaway(*args: str, port: int | None = None) -> redis_server.Throwaway:
    """A private redis-server (the Unix-socket, TLS and script-flush tests must not disturb the shared one)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required under CI=true")
        pytest.skip("redis-server is not installed")
    return redis_server.start_throwaway(*args, port=port)


def wait_for(check: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- storage layout -------------------------------------------------------------------


def test_keys_follow_the_documented_layout(store: Redis, prefix: str, raw: redis.Redis) -> None:
    name = "layout-job"
    owner = Owner(metadata={"run": "42"})
    result = store.acquire(name, owner, 30)
    assert result.record is not None
    lock, state = f"{prefix}{{{name}}}", f"{prefix}{{{name}}}:state"
    assert raw.get(lock) == owner.owner_token
    assert 0 < raw.pttl(lock) <= 30_000
    # The state outlives the lease by the retention period (30 days by default).
    assert DEFAULT_PURGE_AFTER_SECONDS * 1000 < raw.pttl(state) <= DEFAULT_PURGE_AFTER_SECONDS * 1000 + 30_000
    assert raw.hget(state, "fence") == str(result.record.fencing_token)
    holder = json.loads(str(raw.hget(state, "holder")))
    assert holder["owner_token"] == owner.owner_token
    assert holder["metadata"] == {"run": "42"}
    assert holder["expires_at"] - holder["created_at"] == 30_000

    assert store.release(name, owner.owner_token)
    assert raw.exists(lock) == 0
    released = hashlib.sha1(owner.owner_token.encode()).hexdigest()  # recognises a retried release
    assert raw.hgetall(state) == {"fence": str(result.record.fencing_token), "released": released}
    assert DEFAULT_PURGE_AFTER_SECONDS * 1000 - 60_000 < raw.pttl(state) <= DEFAULT_PURGE_AFTER_SECONDS * 1000


def test_times_come_from_the_server_clock(store: Redis, raw: redis.Redis) -> None:
    seconds, microseconds = raw.time()
    server_now = seconds + microseconds / 1e6
    record = store.acquire("clock", Owner(), 60).record
    assert record is not None and record.expires_at is not None
    assert abs(record.created_at.timestamp() - server_now) < 5
    assert (record.expires_at - record.created_at).total_seconds() == pytest.approx(60, abs=0.002)


def test_hash_tag_puts_every_key_of_a_name_in_one_slot(store: Redis, prefix: str) -> None:
    from redis.crc import key_slot

    for name in ("plain", "{braces}", "a}b{c", "ünï"):
        keys = script_keys(f"{prefix}{{{name}}}")
        assert len(keys) == 6 and keys[4].endswith(":holds")  # the holds of limit=N too
        assert {key_slot(key.encode()) for key in keys} == {key_slot(keys[0].encode())}, name


def test_lock_without_expiry_has_no_ttl_until_renewed(store: Redis, prefix: str, raw: redis.Redis) -> None:
    owner = Owner()
    assert store.acquire("forever", owner, None).record.expires_at is None  # type: ignore[union-attr]
    assert raw.pttl(f"{prefix}{{forever}}") == -1
    renewed = store.renew("forever", owner.owner_token, 10)
    assert renewed is not None and renewed.expires_at is not None
    assert 0 < raw.pttl(f"{prefix}{{forever}}") <= 10_000
    back = store.renew("forever", owner.owner_token, None)
    assert back is not None and back.expires_at is None
    assert raw.pttl(f"{prefix}{{forever}}") == -1
    conflict = store.acquire("forever", Owner(), 5)
    assert not conflict.acquired and conflict.retry_after is None


def test_conflict_reports_remaining_lease_from_pttl(store: Redis) -> None:
    store.acquire("lease", Owner(), 30)
    conflict = store.acquire("lease", Owner(), 30)
    assert not conflict.acquired
    assert conflict.retry_after is not None and 0 < conflict.retry_after <= 30


def test_retried_acquire_with_the_same_token_is_not_a_conflict(store: Redis) -> None:
    owner = Owner()
    first = store.acquire("retry", owner, 30)
    again = store.acquire("retry", owner, 30)
    assert first.acquired and again.acquired
    assert again.record is not None and first.record is not None
    assert again.record.fencing_token == first.record.fencing_token


def test_key_prefixes_isolate_stores(url: str, prefix: str) -> None:
    outer, nested = Redis(url, key_prefix=prefix), Redis(url, key_prefix=prefix + "inner:")
    try:
        assert outer.acquire("shared", Owner(), 30).acquired
        assert nested.acquire("shared", Owner(), 30).acquired  # a different store: no conflict
        assert [r.name for r in outer.list()] == ["shared"]
        assert [r.name for r in nested.list()] == ["shared"]
        assert outer.force_release("shared") is not None
        assert nested.get("shared") is not None
    finally:
        outer.close()
        nested.close()


def test_list_treats_glob_characters_in_prefix_and_names_literally(url: str) -> None:
    store = Redis(url, key_prefix=f"glob*[{uuid.uuid4().hex[:8]}]?\\:")
    names = ["job*", "job*x", "job?", "job[1]", "job[1]x", "job\\", "job-a", "jobz", "j{o}b", "job^"]
    try:
        for name in names:
            assert store.acquire(name, Owner(), 30).acquired
        assert [r.name for r in store.list()] == sorted(names)
        assert [r.name for r in store.list("job*")] == ["job*", "job*x"]
        assert [r.name for r in store.list("job?")] == ["job?"]
        assert [r.name for r in store.list("job[1]")] == ["job[1]", "job[1]x"]
        assert [r.name for r in store.list("job\\")] == ["job\\"]
        assert [r.name for r in store.list("j{o}")] == ["j{o}b"]
        assert [r.name for r in store.list("job[")] == ["job[1]", "job[1]x"]
        assert store.list("job[2") == [] and store.list("job[1-9]") == []
    finally:
        for name in names:
            store.force_release(name)
        store.close()


# -- URLs and options -----------------------------------------------------------------


def test_url_query_options_and_keyword_overrides() -> None:
    url = "redis://127.0.0.1:6390/3?key_prefix=from-url:&socket_timeout=3&wait_replicas=1&wait_timeout_ms=50"
    from_query = Redis(url)
    assert from_query.key_prefix == "from-url:"
    assert (from_query.wait_replicas, from_query.wait_timeout_ms) == (1, 50)
    assert from_query._store.options["db"] == 3 and from_query._store.options["socket_timeout"] == 3.0
    assert from_query._store.options["socket_connect_timeout"] == 5.0

    overridden = Redis.from_url(url, key_prefix="kw:", socket_timeout=2.0, wait_replicas=0)
    assert overridden.key_prefix == "kw:" and overridden.wait_replicas == 0
    assert overridden._store.options["socket_timeout"] == 2.0
    via_registry = persisters.from_url(url, key_prefix="kw:")
    assert isinstance(via_registry, Redis) and via_registry.key_prefix == "kw:"
    assert Redis("redis://127.0.0.1").key_prefix == "singleton:"


def test_tls_and_unix_urls_configure_redis_py() -> None:
    tls = Redis("rediss://user:pw@cache.example:6380/0?ssl_cert_reqs=none", ssl_ca_certs="/etc/ca.pem")
    assert tls._store.options["connection_class"] is redis.SSLConnection
    assert tls._store.options["ssl_cert_reqs"] == "none" and tls._store.options["ssl_ca_certs"] == "/etc/ca.pem"
    assert (tls._store.options["host"], tls._store.options["port"], tls._store.options["username"]) == ("cache.example", 6380, "user")
    unix = Redis("unix:///run/redis/redis.sock?db=2&key_prefix=u:")
    assert unix._store.options["connection_class"] is redis.UnixDomainSocketConnection
    assert (unix._store.options["path"], unix._store.options["db"], unix.key_prefix) == ("/run/redis/redis.sock", 2, "u:")


@pytest.mark.parametrize(
    ("url", "options", "error"),
    [
        ("http://127.0.0.1", {}, ValueError),
        ("redis://127.0.0.1", {"no_such_option": 1}, TypeError),
        ("redis://127.0.0.1", {"socket_timeout": 0}, ValueError),
        ("redis://127.0.0.1", {"key_prefix": b"bytes:"}, TypeError),
        ("redis://127.0.0.1?wait_replicas=-1", {}, ValueError),
        ("redis://127.0.0.1?wait_timeout_ms=abc", {}, ValueError),
        ("redis://127.0.0.1", {"wait_replicas": 1, "wait_timeout_ms": 10_000}, ValueError),
    ],
)
def test_bad_options_fail_at_construction(url: str, options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Redis(url, **options)


def test_repr_and_errors_never_show_the_password(url: str) -> None:
    port = closed_port()
    store = Redis(f"redis://admin:s3cr3t-pw@127.0.0.1:{port}/0?key_prefix=x:")
    assert "s3cr3t-pw" not in repr(store) and "***" in repr(store)
    with pytest.raises(PersisterError) as caught:
        store.get("anything")
    text = "".join(traceback.format_exception(caught.value))
    assert caught.value.backend == "redis" and "s3cr3t-pw" not in text
    assert isinstance(caught.value.__cause__, redis.RedisError)

    # A real server refusing the credentials.
    host_part = url.split("://", 1)[1]
    refused = Redis(f"redis://nobody:s3cr3t-pw@{host_part}")
    with pytest.raises(PersisterError) as caught:
        refused.get("anything")
    assert "s3cr3t-pw" not in "".join(traceback.format_exception(caught.value))


def test_unreachable_server_fails_within_the_bound() -> None:
    store = Redis(f"redis://127.0.0.1:{closed_port()}/0")
    started = time.monotonic()
    with pytest.raises(PersisterError, match="redis"):
        store.acquire("unreachable", Owner(), 10)
    assert time.monotonic() - started < 10


def test_connect_timeouts_are_not_multiplied_by_retries() -> None:
    # A non-routable address: each attempt waits out the connect timeout (or fails at once).
    store = Redis("redis://10.255.255.1:6379/0", socket_connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(PersisterError):
        store.get("blackhole")
    assert time.monotonic() - started < 5  # redis-py's default (10 retries) would take over 5 s


# -- connections ----------------------------------------------------------------------


def test_construction_touches_no_network_and_the_import_no_driver() -> None:
    store = Redis(f"redis://127.0.0.1:{closed_port()}/0")
    assert store._shared_entry is None
    code = "import sys, singleton_integrations.persisters; assert 'redis' not in sys.modules, 'driver imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_missing_driver_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from singleton_integrations.persisters import Redis\n"  # the module itself imports fine
        "from singleton_integrations import PersisterError\n"
        "try:\n    Redis()\nexcept ImportError as error:\n"
        "    assert isinstance(error, PersisterError) and error.extra == 'redis', error\n"
        "    assert \"singleton-integrations[redis]\" in str(error), error\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_one_pooled_connection_serves_many_calls(url: str, prefix: str, raw: redis.Redis) -> None:
    client_name = f"pool-{uuid.uuid4().hex[:12]}"
    store = Redis(url, key_prefix=prefix, client_name=client_name)
    try:
        for i in range(25):
            owner = Owner()
            assert store.acquire(f"pool-{i}", owner, 30).acquired
            assert store.get(f"pool-{i}") is not None
            assert store.renew(f"pool-{i}", owner.owner_token, 30) is not None
            assert store.release(f"pool-{i}", owner.owner_token)
        store.list()
        mine = [c for c in raw.client_list() if c.get("name") == client_name]
        assert len(mine) == 1, mine
    finally:
        store.close()
    wait_for(lambda: not [c for c in raw.client_list() if c.get("name") == client_name])


def test_a_connection_the_server_closed_is_replaced(url: str, prefix: str, raw: redis.Redis) -> None:
    client_name = f"killed-{uuid.uuid4().hex[:12]}"
    store = Redis(url, key_prefix=prefix, client_name=client_name)
    try:
        assert store.get("stale") is None
        (mine,) = [c for c in raw.client_list() if c.get("name") == client_name]
        assert raw.client_kill_filter(_id=mine["id"]) == 1  # only our own connection
        wait_for(lambda: not [c for c in raw.client_list() if c.get("name") == client_name])
        owner = Owner()
        assert store.acquire("stale", owner, 30).acquired  # on a fresh connection, no error
        assert store.release("stale", owner.owner_token)
    finally:
        store.close()


def test_an_error_reply_is_translated_and_keeps_the_connection(url: str, prefix: str, raw: redis.Redis) -> None:
    client_name = f"wrongtype-{uuid.uuid4().hex[:12]}"
    store = Redis(url, key_prefix=prefix, client_name=client_name)
    try:
        raw.hset(f"{prefix}{{foreign}}", "not", "a lock")  # someone else's key where a lock would be
        assert store.get("warm-up") is None
        (before,) = [c["id"] for c in raw.client_list() if c.get("name") == client_name]
        with pytest.raises(PersisterError, match="WRONGTYPE") as caught:
            store.acquire("foreign", Owner(), 30)
        assert isinstance(caught.value.__cause__, redis.ResponseError)
        assert store.acquire("next", Owner(), 30).acquired
        assert [c["id"] for c in raw.client_list() if c.get("name") == client_name] == [before]
    finally:
        store.close()


def test_a_forked_child_gets_its_own_connection(store: Redis) -> None:
    parent_id = store._client().client_id()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: use the inherited persister, report, and leave without cleanup
        code = 1
        try:
            owner = Owner()
            ok = store.acquire("forked", owner, 30).acquired and store.release("forked", owner.owner_token)
            os.write(writer, json.dumps({"ok": ok, "id": store._client().client_id()}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as stream:
        child = json.loads(stream.read())
    assert os.waitpid(pid, 0)[1] == 0
    assert child["ok"] and child["id"] != parent_id
    assert store._client().client_id() == parent_id  # the parent's connection is untouched
    assert store.acquire("after-fork", Owner(), 30).acquired


def test_pickled_store_rebuilds_its_own_pool(store: Redis) -> None:
    store.get("warm-up")
    copy = pickle.loads(pickle.dumps(store))
    assert copy._shared_entry is None and copy.key_prefix == store.key_prefix
    owner = Owner()
    assert copy.acquire("pickled", owner, 30).acquired
    assert store.get("pickled") is not None
    copy.close()


def test_scripts_are_reloaded_after_a_script_flush() -> None:
    server = throwaway()
    store = Redis(server.url)
    try:
        owner = Owner()
        assert store.acquire("flushed", owner, 30).acquired
        redis.Redis(port=server.port).script_flush()
        assert store.release("flushed", owner.owner_token)
    finally:
        store.close()
        server.stop()


def test_wait_replicas_gives_the_lock_back_when_too_few_confirm(store: Redis, url: str, prefix: str) -> None:
    strict = Redis(url, key_prefix=prefix, wait_replicas=1, wait_timeout_ms=50)  # this server has no replicas
    try:
        with pytest.raises(PersisterError, match="replicas confirmed"):
            strict.acquire("replicated", Owner(), 30)
        assert store.get("replicated") is None
        assert store.acquire("replicated", Owner(), 30).acquired
    finally:
        strict.close()


# -- pub/sub wake-ups -----------------------------------------------------------------


def test_watch_is_woken_by_a_release(store: Redis) -> None:
    owner = Owner()
    store.acquire("wake", owner, 60)
    with store.watching("wake") as watch:
        timer = threading.Timer(0.2, store.release, ("wake", owner.owner_token))
        timer.start()
        started = time.monotonic()
        watch.wait(30)
        assert time.monotonic() - started < 15  # woken, not timed out
        timer.join()
    assert store.acquire("wake", Owner(), 60).acquired


def test_a_release_before_wait_is_not_lost(store: Redis) -> None:
    owner = Owner()
    store.acquire("early", owner, 60)
    with store.watching("early") as watch:
        store.force_release("early")  # between a failed attempt and wait(): already queued
        started = time.monotonic()
        watch.wait(30)
        assert time.monotonic() - started < 15


def subscribed(store: Redis, name: str, owner_token: str | None = None) -> Any:
    """A watch whose shared listener is subscribed, with the wake-up its subscription brought consumed.

    The first watch of a key prefix starts the listener, which wakes it once subscribed (a
    release may have fallen in the gap). ``ready()`` sets ``hub.subscribed`` before that
    wake-up, so the first watch waits for the wake-up itself; a later one, registered after
    it, gets none.
    """
    first = store._hub() is None
    watch = store.watch(name, owner_token)
    hub = store._hub()
    assert hub is not None
    if first:
        assert watch.wait(15), "the listener subscribed and woke the watch registered before it"
    assert hub.subscribed.is_set() and not watch.pending
    return watch


def test_other_names_do_not_wake_a_watch(store: Redis) -> None:
    owner = Owner()
    store.acquire("other", owner, 60)
    watch = subscribed(store, "mine")
    try:
        store.release("other", owner.owner_token)
        assert watch.wait(0.5) is False
    finally:
        watch.close()


def test_hearing_every_release_again_wakes_only_unqueued_watches(store: Redis) -> None:
    """Adding the release pattern may miss a release for an unqueued waiter only: queued ones keep their wake channel."""
    queued = subscribed(store, "name", Owner().owner_token)  # the listener hears its wake channel only
    try:
        unqueued = store.watch("other")
        try:
            assert unqueued.wait(15)  # the pattern is subscribed: a release in the gap may have been missed
            assert queued.wait(0) is False  # (a wake-up of every watch would have reached it first)
        finally:
            unqueued.close()
    finally:
        queued.close()


def test_one_listener_connection_serves_every_watch(url: str, prefix: str, raw: redis.Redis) -> None:
    client_name = f"watch-{uuid.uuid4().hex[:12]}"
    store = Redis(url, key_prefix=prefix, client_name=client_name)
    try:
        owners = [Owner() for _ in range(20)]
        for i, owner in enumerate(owners):
            assert store.acquire(f"name-{i}", owner, 60).acquired
        watches = [subscribed(store, f"name-{i}") for i in range(20)]
        other = Redis(url, key_prefix=prefix)  # another client's releases: heard through PUBLISH
        for i, owner in enumerate(owners[:10]):
            assert other.release(f"name-{i}", owner.owner_token)
        other.close()
        for i, watch in enumerate(watches):
            assert watch.wait(30 if i < 10 else 0.2) is (i < 10), i
        mine = [c for c in raw.client_list() if c.get("name") == client_name]
        assert len(mine) == 2, mine  # commands and one subscription, whatever the number of waiters
        for watch in watches:
            watch.close()
    finally:
        store.close()
    wait_for(lambda: not [c for c in raw.client_list() if c.get("name") == client_name])


def test_singleton_wait_is_handed_over_by_pubsub(store: Redis) -> None:
    holder = Singleton(f"handover-{uuid.uuid4().hex}", store, lock_expire_seconds=60, release_on_sigterm=False)
    waiter = Singleton(holder.name, store, lock_expire_seconds=60, release_on_sigterm=False)
    assert holder.lock()
    first_token = holder.fencing_token
    threading.Timer(0.2, holder.release).start()
    started = time.monotonic()
    assert waiter.lock(wait=30)
    assert time.monotonic() - started < 15  # handed over by the release, long before the wait ends
    assert waiter.fencing_token is not None and first_token is not None and waiter.fencing_token > first_token
    waiter.release()


# -- other transports, on private servers ---------------------------------------------


def test_unix_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = throwaway("--unixsocket", str(socket_path), "--unixsocketperm", "700", port=0)
    try:
        wait_for(socket_path.exists)
        store = Redis(f"unix://{socket_path}?db=0")
        owner = Owner()
        wait_for(lambda: _answers(store))
        assert store.acquire("over-unix", owner, 30).acquired
        assert store.release("over-unix", owner.owner_token)
        store.close()
    finally:
        server.stop()


def test_tls_server(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is required under CI=true")
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    port = closed_port()
    server = throwaway("--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", port=0)
    try:
        store = Redis(f"rediss://127.0.0.1:{port}/0", ssl_ca_certs=str(cert))
        wait_for(lambda: _answers(store))
        owner = Owner()
        assert store.acquire("over-tls", owner, 30).acquired
        assert store.release("over-tls", owner.owner_token)
        store.close()
        untrusted = Redis(f"rediss://127.0.0.1:{port}/0")  # the system CAs do not know our certificate
        with pytest.raises(PersisterError):
            untrusted.get("over-tls")
    finally:
        server.stop()


def _answers(store: Redis) -> bool:
    try:
        store.get("ping")
    except PersisterError:
        return False
    return True


# -- minimum hold ----------------------------------------------------------------------


def test_release_into_the_minimum_hold_keeps_the_name_and_publishes_nothing(store: Redis, prefix: str, raw: redis.Redis) -> None:
    owner = Owner()
    taken = store.acquire("slot", owner, 30, min_hold=5)
    assert taken.acquired and taken.record is not None and taken.record.hold_until is not None
    lock = f"{prefix}{{slot}}"
    pubsub = raw.pubsub()
    pubsub.subscribe(lock + ":released")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    try:
        assert store.release("slot", owner.owner_token) is True
        assert raw.get(lock) == RELEASED_MARKER and 0 < raw.pttl(lock) <= 5000
        record = store.get("slot")
        assert record is not None and record.released_at is not None
        assert record.hold_until == taken.record.hold_until == record.expires_at
        assert record.fencing_token == taken.record.fencing_token
        assert store.renew("slot", owner.owner_token, 30) is None  # the old token renews nothing
        conflict = store.acquire("slot", Owner(), 30)
        assert not conflict.acquired and conflict.record is not None and conflict.record.released
        assert conflict.retry_after is not None and 0 < conflict.retry_after <= 5
        assert [r.name for r in store.list()] == ["slot"]
        assert pubsub.get_message(timeout=0.3) is None  # the name is not free: nobody is woken
    finally:
        pubsub.close()


def test_after_the_hold_the_next_acquire_is_normal_and_its_token_higher(store: Redis) -> None:
    owner = Owner()
    first = store.acquire("short-slot", owner, 30, min_hold=0.3).record
    assert first is not None and store.release("short-slot", owner.owner_token)
    wait_for(lambda: store.get("short-slot") is None)
    again = store.acquire("short-slot", Owner(), 30)
    assert again.acquired and again.expired is None  # a release, not a crash
    assert again.record is not None and again.record.fencing_token > first.fencing_token


def test_a_crashed_holder_keeps_the_name_until_the_hold_ends(store: Redis, prefix: str, raw: redis.Redis) -> None:
    taken = store.acquire("crash", Owner(metadata={"who": "crashed"}), 0.2, min_hold=1.5).record
    assert taken is not None and taken.expires_at == taken.hold_until  # the lease is stretched to the hold
    assert raw.pttl(f"{prefix}{{crash}}") > 1000
    assert not store.acquire("crash", Owner(), 30).acquired
    wait_for(lambda: store.get("crash") is None)
    after = store.acquire("crash", Owner(), 30)
    assert after.acquired and after.expired is not None and after.expired.metadata == {"who": "crashed"}


def test_renewal_never_ends_the_lease_before_the_hold(store: Redis, prefix: str, raw: redis.Redis) -> None:
    owner = Owner()
    taken = store.acquire("renewed", owner, 1, min_hold=8).record
    assert taken is not None
    renewed = store.renew("renewed", owner.owner_token, 1)
    assert renewed is not None and renewed.expires_at == taken.hold_until
    assert raw.pttl(f"{prefix}{{renewed}}") > 5000
    longer = store.renew("renewed", owner.owner_token, 60)
    assert longer is not None and longer.expires_at is not None and taken.hold_until is not None
    assert longer.expires_at > taken.hold_until


def test_a_lock_without_expiry_still_serves_its_hold_after_release(store: Redis, prefix: str, raw: redis.Redis) -> None:
    owner = Owner()
    assert store.acquire("forever-slot", owner, None, min_hold=5).acquired
    assert raw.pttl(f"{prefix}{{forever-slot}}") == -1
    assert store.release("forever-slot", owner.owner_token)
    assert 0 < raw.pttl(f"{prefix}{{forever-slot}}") <= 5000


def test_a_retried_release_is_still_a_clean_release(store: Redis) -> None:
    owner = Owner()
    assert store.acquire("twice", owner, 30).acquired
    assert store.release("twice", owner.owner_token) is True
    assert store.release("twice", owner.owner_token) is True  # the reply of the first was lost
    assert store.release("twice", Owner().owner_token) is False


# -- fencing after lost state and retention -------------------------------------------


def test_tokens_rise_after_the_state_is_lost(store: Redis, prefix: str, raw: redis.Redis) -> None:
    """With the counter gone, the next token is the server's clock in ms: above every token issued before that ms.

    The rule is ``max(previous + 1, server ms)``, so a state lost within the same millisecond
    as the last token (only a test deletes it that fast) would give that token again: the
    test lets the server's clock pass the first token first, as any real purge, eviction or
    failover does.
    """
    owner = Owner()
    first = store.acquire("lost-state", owner, 30).record
    assert first is not None and store.release("lost-state", owner.owner_token)
    while (lambda t: t[0] * 1000 + t[1] // 1000)(raw.time()) <= first.fencing_token:
        time.sleep(0.001)
    raw.delete(f"{prefix}{{lost-state}}:state")  # a purge, an eviction, a failover that lost the write
    second = store.acquire("lost-state", Owner(), 30).record
    assert second is not None and second.fencing_token > first.fencing_token
    store.force_release("lost-state")
    raw.hset(f"{prefix}{{lost-state}}:state", "fence", second.fencing_token + 10**9)  # a counter ahead of the clock
    third = store.acquire("lost-state", Owner(), 30).record
    assert third is not None and third.fencing_token == second.fencing_token + 10**9 + 1


def test_purge_after_seconds_expires_a_free_names_state(url: str, prefix: str, raw: redis.Redis) -> None:
    store = Redis(f"{url}?purge_after_seconds=0.5", key_prefix=prefix)
    assert store.purge_after_seconds == 0.5
    state = f"{prefix}{{purged}}:state"
    try:
        owner = Owner()
        first = store.acquire("purged", owner, 2).record
        assert first is not None and 2000 < raw.pttl(state) <= 2500  # lease + retention while held
        assert store.release("purged", owner.owner_token)
        assert 0 < raw.pttl(state) <= 500
        wait_for(lambda: raw.exists(state) == 0)
        second = store.acquire("purged", Owner(), 2).record
        assert second is not None and second.fencing_token > first.fencing_token
    finally:
        store.close()


@pytest.mark.parametrize("option", ["?purge_after_seconds=none", "?purge_after_seconds=0.5"])
def test_purge_after_seconds_none_keeps_state(url: str, prefix: str, raw: redis.Redis, option: str) -> None:
    keyword = {"purge_after_seconds": None} if option.endswith("0.5") else {}  # the keyword beats the URL
    store = Redis(url + option, key_prefix=prefix, **keyword)
    assert store.purge_after_seconds is None
    try:
        owner = Owner()
        assert store.acquire("kept", owner, 2).acquired
        assert raw.pttl(f"{prefix}{{kept}}:state") == -1
        assert store.release("kept", owner.owner_token)
        assert raw.pttl(f"{prefix}{{kept}}:state") == -1
    finally:
        store.close()


@pytest.mark.parametrize("bad", ["?purge_after_seconds=soon", "?purge_after_seconds=-1", "?purge_after_seconds=0"])
def test_bad_purge_after_seconds_fails_at_construction(bad: str) -> None:
    with pytest.raises(ValueError, match="purge_after_seconds"):
        Redis("redis://127.0.0.1/0" + bad)


# -- native async ---------------------------------------------------------------------


def test_async_primitives_use_redis_asyncio(store: Redis) -> None:
    import redis.asyncio as aioredis

    assert Redis.native_async and Redis.supports_min_hold

    async def scenario() -> None:
        owner = Owner()
        taken = await store.aacquire("async", owner, 30)
        assert taken.acquired and taken.record is not None
        assert isinstance((await store._shared().async_entry()).client, aioredis.Redis)
        assert not (await store.aacquire("async", Owner(), 30)).acquired
        assert (await store.aget("async")).owner_token == owner.owner_token  # type: ignore[union-attr]
        assert await store.arenew("async", owner.owner_token, 60) is not None
        assert [r.name for r in await store.alist()] == ["async"]
        assert await store.arelease("async", owner.owner_token) is True
        held = await store.aacquire("async", owner, 30, min_hold=5)
        assert held.record is not None and held.record.hold_until is not None
        assert await store.arelease("async", owner.owner_token) is True
        assert (await store.aget("async")).released  # type: ignore[union-attr]
        removed = await store.aforce_release("async")
        assert removed is not None and removed.released
        await store.aclose()

    asyncio.run(scenario())
    assert store.get("async") is None  # the sync side sees the same store


def test_async_clients_follow_their_event_loops(store: Redis) -> None:
    async def cycle(name: str) -> int:
        owner = Owner()
        taken = await store.aacquire(name, owner, 30)
        assert taken.acquired and taken.record is not None
        assert await store.arelease(name, owner.owner_token)
        return taken.record.fencing_token

    tokens = [asyncio.run(cycle("loops")) for _ in range(3)]  # each loop closes behind it, unclosed
    assert tokens == sorted(set(tokens))
    results: list[int] = []
    threads = [threading.Thread(target=lambda i=i: results.append(asyncio.run(cycle(f"thread-{i}")))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4
    assert store._shared()._async == {}  # each loop's client was closed as its loop shut down

    loop = asyncio.new_event_loop()  # a loop closed without shutdown_asyncgens
    loop.run_until_complete(cycle("unshut"))
    loop.close()
    asyncio.run(cycle("loops"))
    assert store._shared()._async == {}  # the next loop let go of the closed one's client


def test_a_hundred_async_waiters_share_one_subscription(url: str, prefix: str, raw: redis.Redis) -> None:
    client_name = f"crowd-{uuid.uuid4().hex[:12]}"
    store = Redis(url, key_prefix=prefix, client_name=client_name)
    releaser = Redis(url, key_prefix=prefix)  # another client: heard through PUBLISH
    owner = Owner()
    assert store.acquire("crowd", owner, 60).acquired

    async def scenario() -> None:
        watches = [subscribed(store, "crowd") for _ in range(100)]
        try:
            waits = [asyncio.ensure_future(watch.wait_async(30)) for watch in watches]
            await asyncio.sleep(0.05)
            assert _connections(raw, client_name) == 2  # commands and one subscription for all 100
            await releaser.arelease("crowd", owner.owner_token)
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            # One release frees the name for one: the hub wakes the longest-waiting waiter only.
            assert done == {waits[0]} and waits[0].result() is True
            await asyncio.sleep(0.2)
            assert not any(wait.done() for wait in waits[1:])
            for wait in waits[1:]:
                wait.cancel()
            await asyncio.gather(*waits[1:], return_exceptions=True)
        finally:
            for watch in watches:
                watch.close()

    try:
        asyncio.run(scenario())
    finally:
        store.close()
        releaser.close()


def test_the_listener_resubscribes_after_its_connection_dies(url: str, prefix: str, raw: redis.Redis) -> None:
    client_name = f"resub-{uuid.uuid4().hex[:12]}"
    store = Redis(url, key_prefix=prefix, client_name=client_name)
    releaser = Redis(url, key_prefix=prefix)
    try:
        owner = Owner()
        assert store.acquire("resub", owner, 60).acquired
        watch = subscribed(store, "resub")
        (listener,) = [c for c in raw.client_list() if c.get("name") == client_name and c.get("psub") == "1"]
        assert raw.client_kill_filter(_id=listener["id"]) == 1
        assert watch.wait(30)  # resubscribed: every waiter is woken once, a release may have slipped by
        hub = store._hub()
        assert hub is not None and hub.subscribed.wait(15)
        watch.wait(0)
        assert releaser.release("resub", owner.owner_token)
        assert watch.wait(30)  # and releases are heard again
        watch.close()
    finally:
        store.close()
        releaser.close()


def test_async_callers_wait_for_a_free_connection(url: str, raw: redis.Redis) -> None:
    client_name = f"async-pool-{uuid.uuid4().hex[:12]}"
    store = Redis(url, client_name=client_name, max_connections=2)
    peak = 0

    async def scenario() -> list[Any]:
        nonlocal peak

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _connections(raw, client_name))
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        try:
            results = list(await asyncio.gather(*(store.aget(f"free-{i}") for i in range(100))))
            # The sampler may not have run while they did; the pool keeps what it opened until aclose.
            peak = max(peak, _connections(raw, client_name))
            return results
        finally:
            sampler.cancel()
            await store.aclose()

    try:
        assert asyncio.run(scenario()) == [None] * 100  # none failed at the cap
        assert 1 <= peak <= 2
    finally:
        store.close()


# -- one shared, bounded pool per store -----------------------------------------------


def _connections(raw: redis.Redis, client_name: str) -> int:
    return len([c for c in raw.client_list() if c.get("name") == client_name])


def test_150_objects_from_one_url_keep_the_connection_count_bounded(url: str, raw: redis.Redis) -> None:
    client_name = f"many-{uuid.uuid4().hex[:12]}"
    shared_url = f"{url}?client_name={client_name}&max_connections=8"
    singletons = [Singleton(f"many-{uuid.uuid4().hex}", shared_url, lock_expire_seconds=30, release_on_sigterm=False)
                  for _ in range(150)]
    start = threading.Barrier(150)
    failures: list[BaseException] = []

    def work(singleton: Singleton) -> None:
        try:
            start.wait(60)
            assert singleton.lock()
            assert singleton.release()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=work, args=(s,)) for s in singletons]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:3]  # callers waited for a connection instead of failing at the cap
    assert 1 <= _connections(raw, client_name) <= 8
    assert len({id(s.persister._shared()) for s in singletons}) == 1  # type: ignore[attr-defined]


def test_a_busy_pool_makes_callers_wait_then_fails_within_the_deadline(url: str, prefix: str) -> None:
    store = Redis(url, key_prefix=prefix, max_connections=1, socket_timeout=0.5)
    try:
        slots = store._shared().slots
        with slots.take(1):  # every connection busy
            with pytest.raises(PersisterError, match="no free connection") as caught:
                store.get("busy")
            assert "max_connections=1" in str(caught.value)
        waiter = threading.Thread(target=store.get, args=("busy",))
        with slots.take(1):
            waiter.start()
            time.sleep(0.1)
        waiter.join(10)  # it got the connection once it came free
        assert not waiter.is_alive()
    finally:
        store.close()


def test_same_url_and_options_share_a_client_and_others_do_not(url: str) -> None:
    first, second = Redis(url, key_prefix="a:"), Redis(url, key_prefix="b:")
    other_db = Redis(url.rsplit("/", 1)[0] + "/1")
    other_password = Redis(url.replace("://", "://:not-the-same@"))
    assert first._shared() is second._shared()  # the key prefix is ours, not the pool's
    assert first._shared() is not other_db._shared()
    assert first._shared() is not other_password._shared()
    assert persisters.from_url(url)._shared() is first._shared()  # type: ignore[attr-defined]
    sentinels = [Redis("redis+sentinel://127.0.0.1:26390/svc", sentinel_kwargs={"password": "pw"}) for _ in range(2)]
    assert sentinels[0]._shared() is sentinels[1]._shared()  # equal option dicts, built twice: one client
    for store in (first, second, other_db, other_password, *sentinels):
        store.close()
    with pytest.raises(TypeError, match="redis\\+sentinel://"):
        Redis(url, connection_class=redis.sentinel.SentinelManagedConnection)


def test_closing_one_persister_leaves_the_others_connected(url: str, raw: redis.Redis) -> None:
    client_name = f"close-{uuid.uuid4().hex[:12]}"
    first, second = Redis(url, client_name=client_name), Redis(url, client_name=client_name)
    first.get("x")
    second.get("x")
    first.close()
    assert _connections(raw, client_name) == 1
    assert second.get("x") is None
    second.close()
    wait_for(lambda: _connections(raw, client_name) == 0)


# -- secrets --------------------------------------------------------------------------


def test_public_attributes_hold_no_password() -> None:
    store = Redis("redis://admin:s3cr3t-pw@127.0.0.1:6390/0?key_prefix=x:")
    public = {key: value for key, value in vars(store).items() if not key.startswith("_")}
    assert "s3cr3t-pw" not in repr(public) and "***" in store.url
    sentinel_store = Redis("redis+sentinel://:s3cr3t-pw@127.0.0.1:26390,127.0.0.1:26391/svc")
    assert "s3cr3t-pw" not in repr({k: v for k, v in vars(sentinel_store).items() if not k.startswith("_")})


def test_a_sentinel_port_error_shows_neither_token_nor_password(sentinel: redis_sentinel.Topology) -> None:
    owner = Owner()
    wrong = Redis(f"redis://127.0.0.1:{sentinel.sentinel_port}/0")  # the Sentinel, not the master
    with pytest.raises(PersisterError) as caught:
        wrong.acquire("wrong-port", owner, 30)
    text = "".join(traceback.format_exception(caught.value))
    assert "EVALSHA" in str(caught.value) and owner.owner_token not in text  # the driver's error (the cause) too
    assert isinstance(caught.value.__cause__, redis.ResponseError)
    wrong.close()


def test_a_cluster_node_behind_a_plain_url_says_to_use_the_cluster_url(cluster: redis_cluster.Cluster) -> None:
    plain = Redis(f"redis://127.0.0.1:{cluster.ports[0]}/0", key_prefix=f"plain-{uuid.uuid4().hex[:8]}:")
    try:
        messages = []
        for index in range(12):
            try:
                plain.get(f"name-{index}")
            except PersisterError as error:
                messages.append(str(error))
        assert messages and all("redis+cluster://" in message for message in messages)
    finally:
        plain.close()


# -- Sentinel and Cluster topologies, on throwaway servers ------------------------------


def _start_topology(what: str, start: Any) -> Any:
    if shutil.which("redis-server") is None:
        unavailable(what, "redis-server is not installed (apt-get install redis-server)")
    try:
        return start()
    except (FileNotFoundError, RuntimeError) as error:
        unavailable(what, str(error))


@pytest.fixture(scope="module")
def cluster() -> Iterator[redis_cluster.Cluster]:
    topology = _start_topology("Redis Cluster", redis_cluster.start)
    yield topology
    topology.stop()


@pytest.fixture(scope="module")
def sentinel() -> Iterator[redis_sentinel.Topology]:
    topology = _start_topology("Redis Sentinel", redis_sentinel.start)
    yield topology
    topology.stop()


class _TopologyConformance(PersisterConformance):
    """The lock rules on another topology, less those that only exercise the client side.

    The scripts and the core are the same as on a single server; what differs is
    routing, discovery and pub/sub. Left out here (they run on the single server):
    rules about forks, signals and exit, the client clock, and a second
    multi-process token check (the no-overlap rule checks tokens across processes).
    """

    __test__ = False
    test_fencing_tokens_rise_across_processes = None  # type: ignore[assignment]
    test_client_clock_skew_neither_steals_nor_shortens = None  # type: ignore[assignment]
    test_forked_child_does_not_own_the_lock = None  # type: ignore[assignment]
    test_exit_releases_and_stops_renewal = None  # type: ignore[assignment]
    test_sigterm_releases_then_ends_the_process = None  # type: ignore[assignment]
    test_sigterm_chains_the_previous_handler = None  # type: ignore[assignment]
    test_killed_holder_lock_expires = None  # type: ignore[assignment]

    @pytest.fixture
    def stored_state(self) -> Callable[[Persister, str], bool]:
        """Whether any key of a name is left, by SCAN through the persister's own client (every master of a cluster)."""

        def found(persister: Persister, name: str) -> bool:
            client = persister._client()  # type: ignore[attr-defined]
            return any(True for _ in client.scan_iter(match=f"*{name}*", count=1000))

        return found


class TestClusterConformance(_TopologyConformance):
    """The lock rules on a 3-master cluster through ``redis+cluster://``."""

    __test__ = True

    @pytest.fixture
    def store_url(self, cluster: redis_cluster.Cluster) -> str:
        return cluster.url


class TestSentinelConformance(_TopologyConformance):
    """The lock rules on a Sentinel-managed master through ``redis+sentinel://``."""

    __test__ = True

    @pytest.fixture
    def store_url(self, sentinel: redis_sentinel.Topology) -> str:
        return sentinel.url


def test_cluster_wake_ups_cross_nodes_and_list_spans_them(cluster: redis_cluster.Cluster) -> None:
    prefix = f"spread-{uuid.uuid4().hex[:8]}:"
    store = Redis(cluster.url, key_prefix=prefix)
    releaser = Redis(cluster.url, key_prefix=prefix, client_name="releaser")  # heard through PUBLISH only
    try:
        client = store._client()
        names = [f"name-{index}" for index in range(12)]
        nodes = {client.get_node_from_key(f"{prefix}{{{name}}}").name for name in names}
        assert len(nodes) == 3  # the names live on every master
        owners = {name: Owner() for name in names}
        for name in names:
            assert store.acquire(name, owners[name], 60).acquired
        assert [record.name for record in store.list()] == sorted(names)
        watches = {name: subscribed(store, name) for name in names}
        for name in names:  # the listener talks to one node; releases on the other two reach it too
            assert releaser.release(name, owners[name].owner_token)
            assert watches[name].wait(30), name
        for watch in watches.values():
            watch.close()

        async def scenario() -> None:
            owner = Owner()
            assert (await store.aacquire("async-on-cluster", owner, 30)).acquired
            assert [r.name for r in await store.alist("async")] == ["async-on-cluster"]
            assert await store.arelease("async-on-cluster", owner.owner_token)
            await store.aclose()

        asyncio.run(scenario())
    finally:
        store.close()
        releaser.close()


def test_limit_holds_on_a_cluster(cluster: redis_cluster.Cluster) -> None:
    """Every key of a name on one slot, so each step stays one script; a hold's release wakes a watch across nodes."""
    prefix = f"limit-{uuid.uuid4().hex[:8]}:"
    store = Redis(cluster.url, key_prefix=prefix)
    releaser = Redis(cluster.url, key_prefix=prefix, client_name="releaser")  # heard through PUBLISH only
    try:
        names = [f"limited-{index}" for index in range(6)]
        client = store._client()
        assert len({client.get_node_from_key(f"{prefix}{{{name}}}").name for name in names}) > 1
        for name in names:
            limit_scenario(store, name)
        owners = [Owner(), Owner()]
        for owner in owners:
            assert store.acquire(names[0], owner, 60, limit=2).acquired
        assert [record.name for record in releaser.list()] == [names[0]] * 2
        watch = subscribed(store, names[0])
        try:
            assert releaser.release(names[0], owners[0].owner_token)
            assert watch.wait(30)
        finally:
            watch.close()
    finally:
        store.close()
        releaser.close()


def test_limit_holds_on_a_sentinel_master(sentinel: redis_sentinel.Topology) -> None:
    store = Redis(sentinel.url, key_prefix=f"limit-{uuid.uuid4().hex[:8]}:")
    try:
        limit_scenario(store, "limited")
    finally:
        store.close()


def test_wait_replicas_is_refused_on_a_cluster() -> None:
    with pytest.raises(ValueError, match="wait_replicas"):
        Redis("redis+cluster://127.0.0.1:7000?wait_replicas=1")


@pytest.mark.parametrize(
    ("url", "nodes", "service", "db"),
    [
        ("redis+sentinel://s1:26379,s2:26380,[::1]/mymaster/2", (("s1", 26379), ("s2", 26380), ("::1", 26379)), "mymaster", 2),
        ("rediss+sentinel://user:pw@s1/mymaster?socket_timeout=2", (("s1", 26379),), "mymaster", 0),
        ("redis+cluster://n1:7000,n2", (("n1", 7000), ("n2", 6379)), None, None),
        ("rediss+cluster://:pw@n1:7000/0?key_prefix=k:", (("n1", 7000),), None, None),
    ],
)
def test_sentinel_and_cluster_urls_parse(url: str, nodes: tuple[tuple[str, int], ...], service: str | None, db: int | None) -> None:
    store = Redis(url)
    assert store._store.nodes == nodes and store._store.service == service
    assert store._store.tls == url.startswith("rediss")
    if db is not None:
        assert store._store.options["db"] == db
    assert "pw" not in store.url.replace("***", "")


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://s1:26379", "redis+sentinel://s1/a/b/c", "redis+sentinel://s1/svc/x", "redis+cluster:///",
     "redis+cluster://n1/3", "redis+cluster://n1:notaport"],
)
def test_bad_sentinel_and_cluster_urls_fail_at_construction(url: str) -> None:
    with pytest.raises(ValueError):
        Redis(url)


def test_tokens_rise_on_a_promoted_replica_that_missed_the_last_writes() -> None:
    master = throwaway()
    replica = throwaway("--replicaof", "127.0.0.1", str(master.port))
    try:
        with redis.Redis(port=replica.port, decode_responses=True) as client:
            wait_for(lambda: client.info("replication").get("master_link_status") == "up")
        old, promoted = Redis(master.url), Redis(replica.url)
        owner = Owner()
        replicated = old.acquire("promoted", owner, 30).record
        assert replicated is not None and old.release("promoted", owner.owner_token)
        wait_for(lambda: promoted.get("promoted") is None and redis.Redis(port=replica.port).hget(
            "singleton:{promoted}:state", "fence") is not None)
        redis.Redis(port=replica.port).execute_command("REPLICAOF", "NO", "ONE")  # cut off: it misses what follows
        last = replicated
        for _ in range(5):  # the last writes, which the replica never receives
            owner = Owner()
            last = old.acquire("promoted", owner, 30).record  # type: ignore[assignment]
            assert last is not None and old.release("promoted", owner.owner_token)
        # Five acquires in a millisecond or two ran the counter a few ms ahead of the clock;
        # any real failover takes longer than that lead (see docs/persisters.md).
        time.sleep(0.05)
        after = promoted.acquire("promoted", Owner(), 30).record  # the replica, now a master
        assert after is not None and after.fencing_token > last.fencing_token > replicated.fencing_token
        old.close()
        promoted.close()
    finally:
        replica.stop()
        master.stop()


def test_sentinel_failover_keeps_locks_working_and_tokens_rising() -> None:
    topology = _start_topology("Redis Sentinel", redis_sentinel.start)
    prefix = f"failover-{uuid.uuid4().hex[:8]}:"
    store = Redis(topology.url, key_prefix=prefix, wait_replicas=1, wait_timeout_ms=500)
    try:
        held = Owner()
        assert store.acquire("held", held, 120).acquired  # confirmed by the replica before we return
        mover = Owner()
        before = store.acquire("moving", mover, 120).record
        assert before is not None and store.release("moving", mover.owner_token)
        watch = subscribed(store, "held")
        old_master = topology.master_port()

        new_master = topology.failover()
        assert new_master != old_master

        def acquire_after_failover() -> Any:
            # Until the old master has resynced as a replica, WAIT sees no replica and the
            # acquire is given back: wait_replicas=1 refuses rather than risk an unreplicated lock.
            deadline = time.monotonic() + 60
            while True:
                try:
                    return store.acquire("moving", Owner(), 120)
                except PersisterError:
                    assert time.monotonic() < deadline, "no acquire succeeded after the failover"
                    time.sleep(0.2)

        after = acquire_after_failover()
        assert after.acquired and after.record is not None
        assert after.record.fencing_token > before.fencing_token
        conflict = store.acquire("held", Owner(), 120)  # the replicated lock survived the failover
        assert not conflict.acquired and conflict.record is not None and conflict.record.owner_token == held.owner_token
        watch.wait(0)  # the listener's reconnection may have woken it once; that is allowed
        releaser = Redis(topology.url, key_prefix=prefix, client_name="releaser")
        assert releaser.release("held", held.owner_token)  # through the new master, heard by PUBLISH
        assert watch.wait(30), "the release listener did not follow the new master"
        watch.close()
        releaser.close()

        async def scenario() -> None:
            owner = Owner()
            deadline = time.monotonic() + 60
            while True:  # the same refusal as above while the demoted master resyncs
                try:
                    assert (await store.aacquire("async-after-failover", owner, 30)).acquired
                    break
                except PersisterError:
                    assert time.monotonic() < deadline, "no async acquire succeeded after the failover"
                    await asyncio.sleep(0.2)
            assert await store.arelease("async-after-failover", owner.owner_token)
            await store.aclose()

        asyncio.run(scenario())
    finally:
        store.close()
        topology.stop()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/zero", "redis://:secret@127.0.0.1:6379/1x"])
def test_a_database_that_is_not_a_number_is_refused(url: str) -> None:
    """redis-py reads such a path as database 0: the lock would live where nobody looks for it."""
    with pytest.raises(ValueError, match="the database after the host must be a number") as refused:
        Redis(url)
    assert "secret" not in str(refused.value)
