"""MongoDB-specific behaviour; the shared rules are in the conformance suite.

Runs against a real ``mongod`` when MONGODB_URL is set, else a SecantusDB the
fixture starts (tests/servers/mongodb_server.py).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pymongo
import pytest

from singleton_integrations import PersisterError, Singleton, persisters
from singleton_integrations._errors import MissingDependency
from singleton_integrations._record import Owner
from singleton_integrations.persisters._base import HubWatch
from singleton_integrations.persisters._mongodb_steps import Op
from singleton_integrations.persisters.mongodb import MongoDb
from singleton_integrations.testing.conformance import FairQueue, FairQueueAcrossProcesses
from tests.servers import mongodb_server

RUN_DATABASE = f"singleton_test_{uuid.uuid4().hex[:10]}"
OPERATOR_NAMES = ["$where", "a.b", '{"$gt": ""}', "$gt", "$$NOW", "_id", "a.$b", "$", ".", "x\\y", "O'Brien"]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server_url = mongodb_server.url()
    yield server_url
    client: pymongo.MongoClient = pymongo.MongoClient(server_url, serverSelectionTimeoutMS=5000)
    try:
        client.drop_database(RUN_DATABASE)
    finally:
        client.close()


@pytest.fixture
def collection_name() -> str:
    return f"locks_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(url: str, collection_name: str) -> Iterator[MongoDb]:
    persister = MongoDb(url, database=RUN_DATABASE, collection=collection_name)
    yield persister
    persister.close()


def raw(store: MongoDb) -> Any:
    """The collection itself, to look at (or damage) what the persister wrote."""
    return store._client()[store.database_name][store.collection_name]


def place_url(url: str, database: str, collection: str) -> str:
    """``url`` naming ``database`` in its path and ``collection`` in its query, for another process."""
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    hosts = rest.partition("/")[0]
    return f"{scheme}://{hosts}/{database}?" + "&".join(filter(None, [query, f"collection={collection}"]))


def server_now(store: MongoDb) -> datetime:
    return store._client().admin.command("hello")["localTime"].replace(tzinfo=timezone.utc)


def counted_calls(store: MongoDb, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The store calls (round trips) ``store`` makes from now on, by method; a cached clock is none."""
    calls: list[str] = []
    real = store._call

    def counted(collection: Any, op: Op) -> Any:
        if op.method != "server_now" or store._server_now() is None:
            calls.append(op.method)
        return real(collection, op)

    monkeypatch.setattr(store, "_call", counted)
    return calls


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- names are data, never operators or patterns ---------------------------------------


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_operator_shaped_names_are_plain_names(store: MongoDb, name: str) -> None:
    bystander = store.acquire("bystander", Owner(), 60)
    assert bystander.acquired
    first, second = Owner(host="$host", metadata={"run": "$where"}), Owner()
    taken = store.acquire(name, first, 60)
    assert taken.acquired and taken.record is not None
    assert taken.record.name == name and taken.record.host == "$host" and taken.record.metadata == {"run": "$where"}
    assert raw(store).find_one({"_id": name})["owner"] == first.owner_token

    refused = store.acquire(name, second, 60)
    assert not refused.acquired and refused.record is not None
    assert refused.record.fencing_token == taken.record.fencing_token
    assert store.get(name) == taken.record
    assert store.get("bystander") == bystander.record  # the name matched nothing else
    assert not store.release(name, second.owner_token)
    assert store.release(name, first.owner_token)
    assert store.get(name) is None
    assert store.get("bystander") is not None
    assert store.acquire(name, second, 60).acquired


def test_list_treats_prefixes_as_text(store: MongoDb) -> None:
    names = ["a.b/1", "a.b/2", "aXb/3", "(x)*[y]", "(x)+", "^top", "top$", "$where", "a|b", "\\d9", "d9"]
    for name in names:
        assert store.acquire(name, Owner(), 60).acquired

    def listed(prefix: str) -> list[str]:
        return [record.name for record in store.list(prefix)]

    assert listed("a.b") == ["a.b/1", "a.b/2"]
    assert listed("(x)*") == ["(x)*[y]"]
    assert listed("^") == ["^top"]
    assert listed("top$") == ["top$"]
    assert listed("$") == ["$where"]
    assert listed("a|") == ["a|b"]
    assert listed("\\d") == ["\\d9"]
    assert listed(".*") == []
    assert listed("") == sorted(names)


# -- URL, options, repr ----------------------------------------------------------------


def test_url_path_query_and_keyword_overrides() -> None:
    store = MongoDb(
        "mongodb://h1:1,h2:2/jobs?replicaSet=rs&collection=locks&purgeAfterSeconds=60&serverSelectionTimeoutMS=1500"
    )
    assert (store.database_name, store.collection_name, store.purge_after_seconds) == ("jobs", "locks", 60.0)
    options = store._client().options
    assert options.server_selection_timeout == 1.5  # the URL's own value beats the default
    assert options.pool_options.connect_timeout == 5.0 and options.timeout == 8.0  # defaults fill the gaps
    assert options.replica_set_name == "rs"
    assert "collection" not in store._driver_url and "purgeAfterSeconds" not in store._driver_url

    overridden = persisters.from_url(
        "mongodb://h1/jobs?collection=locks&serverSelectionTimeoutMS=1500",
        collection="other", database="elsewhere", server_selection_timeout_ms=700, purge_after_seconds=None,
    )  # fmt: skip
    assert isinstance(overridden, MongoDb)
    assert (overridden.database_name, overridden.collection_name, overridden.purge_after_seconds) == (
        "elsewhere", "other", None,
    )  # fmt: skip
    assert overridden._client().options.server_selection_timeout == 0.7

    default = MongoDb("mongodb://h1")
    assert (default.database_name, default.collection_name) == ("singleton", "singletons")
    srv = persisters.from_url("mongodb+srv://user:pw@cluster.example.invalid/app")  # no DNS until first use
    assert isinstance(srv, MongoDb) and srv.database_name == "app"


def test_tls_and_driver_options_pass_through(tmp_path: Path) -> None:
    store = MongoDb("mongodb://h1/?tls=true&tlsAllowInvalidHostnames=true", tlsDisableOCSPEndpointCheck=True,
                    write_concern="majority")  # fmt: skip
    options = store._client().options
    assert options.pool_options._ssl_context is not None
    assert options.pool_options.tls_allow_invalid_hostnames
    assert options._options["tlsdisableocspendpointcheck"] is True
    assert options.write_concern.document == {"w": "majority"}

    not_a_certificate = tmp_path / "ca.pem"
    not_a_certificate.write_text("not a certificate")
    broken = MongoDb("mongodb://h1/?tls=true", tlsCAFile=str(not_a_certificate))  # readable, so accepted here
    with pytest.raises(PersisterError, match="cannot create a client"):
        broken.get("job")  # ... and refused clearly at first use


def test_tls_round_trip(tmp_path: Path) -> None:
    """A lock over a real TLS connection, with the CA passed as a URL option."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with mongodb_server.extra_server("--tls-cert-file", str(cert), "--tls-key-file", str(key)) as server:
        secure = MongoDb(f"{server}?tls=true&tlsCAFile={cert}", database=RUN_DATABASE)
        plain = MongoDb(f"{server}?tls=true", database=RUN_DATABASE, server_selection_timeout_ms=1500)
        try:
            assert secure.acquire("tls", Owner(), 60).acquired
            with pytest.raises(PersisterError):  # an unknown CA is refused, not silently accepted
                plain.get("tls")
        finally:
            secure.close()
            plain.close()


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("http://h/db", {}),
        ("mongodb://", {}),
        ("mongodb:///db", {}),
        ("mongodb://h/db", {"collection": "$bad"}),
        ("mongodb://h/db", {"collection": ""}),
        ("mongodb://h/db", {"database": "a.b"}),
        ("mongodb://h/db", {"server_selection_timeout_ms": -1}),
        ("mongodb://h/db", {"purge_after_seconds": 0}),
        ("mongodb://h/db?connectTimeoutMS=soon", {}),
        ("mongodb://h/db?purgeAfterSeconds=soon", {}),
        ("mongodb://h/db?purgeAfterSeconds=-5", {}),
        ("mongodb://h/db", {"tls": "maybe"}),
        ("mongodb://h/db", {"bogusOption": 1}),
        ("mongodb://h/db", {"tlsCAFile": "/nonexistent/ca.pem"}),
    ],
)
def test_bad_urls_and_options_fail_before_any_io(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        MongoDb(url, **options)


def test_wrong_types_raise_type_error() -> None:
    with pytest.raises(TypeError):
        MongoDb(b"mongodb://h/db")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        MongoDb("mongodb://h/db", write_concern=True)
    with pytest.raises(TypeError):
        MongoDb("mongodb://h/db", timeout_ms="10")  # type: ignore[arg-type]


def test_repr_and_errors_hide_the_password() -> None:
    secret = "hunter2-s3cret"
    store = MongoDb(f"mongodb://admin:{secret}@127.0.0.1:{closed_port()}/db?authSource=admin")
    assert secret not in repr(store) and "admin:***@" in repr(store)
    assert secret not in repr(pickle.loads(pickle.dumps(store)))


def test_unreachable_server_raises_persister_error_in_bounded_time() -> None:
    secret = "hunter2-s3cret"
    store = MongoDb(f"mongodb://admin:{secret}@127.0.0.1:{closed_port()}/db")
    started = time.monotonic()
    with pytest.raises(PersisterError) as caught:
        store.acquire("job", Owner(), 60)
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"took {elapsed:.1f} s; the default bound is a 5 s server selection"
    assert caught.value.backend == "mongodb"
    assert isinstance(caught.value.__cause__, pymongo.errors.PyMongoError)
    assert secret not in str(caught.value) and secret not in str(caught.value.__cause__)
    assert pickle.loads(pickle.dumps(caught.value)).backend == "mongodb"
    # Waiting on it: the change-stream probe gives up quickly and stays unknown, so the
    # core polls; the watch still answers at once (in-process releases only).
    assert store.notifies is False and store._change_streams is None
    watch = store.watch("job")
    assert isinstance(watch, HubWatch) and watch.wait(0.01) is False
    watch.close()


def test_construction_never_connects() -> None:
    store = MongoDb(f"mongodb://127.0.0.1:{closed_port()}/db")
    assert store._client_ is None
    assert "db" in repr(store)


def test_missing_pymongo_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in [m for m in sys.modules if m == "pymongo" or m.startswith("pymongo.")]:
        monkeypatch.setitem(sys.modules, module, None)
    import singleton_integrations.persisters as package  # importing the package needs no driver

    with pytest.raises(MissingDependency) as caught:
        package.MongoDb("mongodb://h/db")
    assert caught.value.extra == "mongodb" and "singleton-integrations[mongodb]" in str(caught.value)
    with pytest.raises(MissingDependency):
        persisters.from_url("mongodb://h/db")


# -- connections -----------------------------------------------------------------------


def test_one_client_per_persister_reused(store: MongoDb) -> None:
    store.acquire("reuse", Owner(), 60)
    client = store._client_
    assert client is not None
    store.get("reuse")
    store.list()
    assert store._client_ is client
    store.close()
    assert store._client_ is None
    assert store.get("reuse") is not None  # reconnects after close
    assert store._client_ is not None and store._client_ is not client


def _use_after_fork(store: MongoDb, queue: Any) -> None:
    record = store.get("forked")
    queue.put((record.fencing_token if record else None, store._pid == os.getpid()))


def test_forked_child_gets_its_own_client(store: MongoDb) -> None:
    held = store.acquire("forked", Owner(), 60)
    assert held.acquired and held.record is not None
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_use_after_fork, args=(store, queue))
    child.start()
    fence, own_client = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert (fence, own_client) == (held.record.fencing_token, True)
    assert store.get("forked") == held.record  # the parent's client still works


# -- clean-up and fencing --------------------------------------------------------------


def test_ttl_index_on_purge_at(store: MongoDb) -> None:
    owner = Owner()
    assert store.acquire("ttl", owner, 60).acquired
    indexes = raw(store).index_information()
    ttl = [index for index in indexes.values() if index["key"] == [("purgeAt", 1)]]
    assert len(ttl) == 1 and ttl[0]["expireAfterSeconds"] == 0
    retention = store.purge_after_seconds
    assert retention is not None
    held = raw(store).find_one({"_id": "ttl"})
    assert (held["purgeAt"] - held["expiresAt"]).total_seconds() >= retention  # abandoned: kept a retention
    assert store.release("ttl", owner.owner_token)
    released = raw(store).find_one({"_id": "ttl"})
    assert released["owner"] is None and released["fence"] == held["fence"]  # the counter stays
    assert released["purgeAt"] == held["purgeAt"]  # far enough already: the index is not rewritten
    server_now = store._client().admin.command("hello")["localTime"].replace(tzinfo=timezone.utc)
    assert (released["purgeAt"] - server_now).total_seconds() >= retention

    forever = Owner()
    assert store.acquire("forever", forever, None).acquired
    assert "purgeAt" not in raw(store).find_one({"_id": "forever"})  # a lock that never expires stays
    assert store.release("forever", forever.owner_token)
    purge_at = raw(store).find_one({"_id": "forever"})["purgeAt"]
    assert retention <= (purge_at - server_now).total_seconds() <= 2 * retention + 60


def test_purge_disabled_creates_no_index(url: str, collection_name: str) -> None:
    store = MongoDb(url, database=RUN_DATABASE, collection=collection_name, purge_after_seconds=None)
    owner = Owner()
    assert store.acquire("keep", owner, 60).acquired
    assert store.release("keep", owner.owner_token)
    assert "purgeAt" not in raw(store).find_one({"_id": "keep"})
    assert all(index["key"] != [("purgeAt", 1)] for index in raw(store).index_information().values())
    store.close()


def test_fencing_tokens_rise_after_a_purge(store: MongoDb) -> None:
    tokens = []
    for _ in range(3):
        owner = Owner()
        result = store.acquire("fenced", owner, 60)
        assert result.acquired and result.record is not None
        tokens.append(result.record.fencing_token)
        assert store.release("fenced", owner.owner_token)
    raw(store).delete_one({"_id": "fenced"})  # what the TTL monitor does after the retention
    again = store.acquire("fenced", Owner(), 60)
    assert again.acquired and again.record is not None
    tokens.append(again.record.fencing_token)
    assert tokens == sorted(set(tokens)), tokens


def test_expiry_is_judged_by_the_server_clock(store: MongoDb) -> None:
    """A holder whose expiresAt is in the past by the server's clock is taken over at once."""
    owner = Owner()
    assert store.acquire("skewed", owner, 3600).acquired
    server_now = store._client().admin.command("hello")["localTime"]
    raw(store).update_one({"_id": "skewed"}, {"$set": {"expiresAt": server_now.replace(year=server_now.year - 1)}})
    taken = store.acquire("skewed", Owner(), 60)
    assert taken.acquired and taken.expired is not None and taken.expired.owner_token == owner.owner_token
    conflict = store.acquire("skewed", Owner(), 60)
    assert not conflict.acquired and conflict.retry_after is not None and 0 < conflict.retry_after <= 60


# -- races -----------------------------------------------------------------------------


def _race(url: str, database: str, collection: str, names: list[str], barrier: Any, queue: Any) -> None:
    store = MongoDb(url, database=database, collection=collection)
    store.get(names[0])  # connect before the barrier, so the race is on the write
    for name in names:
        barrier.wait(60)
        try:
            result = store.acquire(name, Owner(), 60)
        except PersisterError as error:  # reported, and fails the test in the parent
            queue.put((name, "error", repr(error)))
            continue
        expired = result.expired.owner_token if result.expired else None
        fence = result.record.fencing_token if result.record else None
        queue.put((name, result.acquired, (fence, expired)))
    store.close()


def test_eight_processes_race_for_expired_and_new_names(store: MongoDb, url: str) -> None:
    expired_holders = {}
    for index in range(3):
        owner = Owner()
        assert store.acquire(f"expired-{index}", owner, 0.05).acquired
        expired_holders[f"expired-{index}"] = owner.owner_token
    time.sleep(0.2)
    names = [*expired_holders, "new-0", "new-1"]  # new names: concurrent upserts meet the unique _id
    contenders = 8
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(contenders), context.Queue()
    workers = [
        context.Process(target=_race, args=(url, store.database_name, store.collection_name, names, barrier, queue))
        for _ in range(contenders)
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in range(contenders * len(names))]
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    for name in names:
        outcomes = [outcome for got, *outcome in results if got == name]
        assert not [o for o in outcomes if o[0] == "error"], outcomes
        winners = [details for won, details in outcomes if won is True]
        assert len(winners) == 1, f"{name}: {len(winners)} winners"
        fence, expired = winners[0]
        assert expired == expired_holders.get(name)  # the winner reports whose lock it replaced
        assert all(details[0] == fence for won, details in outcomes if not won)  # losers saw the winner
        current = store.get(name)
        assert current is not None and current.fencing_token == fence


# -- waiting ---------------------------------------------------------------------------


def test_change_stream_wakes_a_waiter_on_release(store: MongoDb, url: str) -> None:
    owner = Owner()
    assert store.acquire("woken", owner, 600).acquired
    other = MongoDb(url, database=RUN_DATABASE, collection=store.collection_name)
    hello = other._client().admin.command("hello")
    replica_set = bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"
    assert MongoDb.notifies is False  # on the class: the conservative answer
    assert other.notifies is replica_set  # found out on first read, before any watch
    watch = other.watch("woken")
    try:
        assert isinstance(watch, HubWatch)
        if replica_set:
            store.renew("woken", owner.owner_token, 600)  # a renewal is not a release: no wake-up
            timer = threading.Timer(0.3, store.release, ("woken", owner.owner_token))
            timer.start()
            assert watch.wait(60) is True  # woken by the release, not the timeout
            timer.join()
            assert store.get("woken") is None
    finally:
        watch.close()
        other.close()


def test_standalone_server_falls_back_to_polling() -> None:
    with mongodb_server.extra_server("--standalone") as server:
        store = MongoDb(server, database=RUN_DATABASE)
        try:
            assert store.notifies is False and store._change_streams is False  # detected once, cached
            assert store.notifies is False
            job = Singleton("job", store, lock_expire_seconds=0.5)
            assert job.lock()
            rival = Singleton("job", store, lock_expire_seconds=30)
            assert rival.lock(wait=30)  # polling sees the expiry
        finally:
            store.close()


def test_singleton_over_mongodb(store: MongoDb) -> None:
    events: list[str] = []
    first = Singleton("smoke", store, lock_expire_seconds=0.5)
    second = Singleton("smoke", store, lock_expire_seconds=30)

    def recorder(event: str) -> Callable[[object], None]:
        return lambda message: events.append(event)

    for event in ("locked", "conflict", "expired", "released"):
        second.on(event, recorder(event))
    assert first.lock()
    assert not second.lock()
    assert second.lock(wait=30)  # the first holder's lease runs out
    assert events[:3] == ["conflict", "expired", "locked"]
    assert second.fencing_token is not None and first.fencing_token is not None
    assert second.fencing_token > first.fencing_token
    third = Singleton("smoke", store, lock_expire_seconds=30)
    threading.Timer(0.3, second.release).start()
    assert third.lock(wait=30)  # woken by the release
    assert "released" in events
    third.release()
    assert not store.list("smoke")


# -- minimum hold (contract 1) ----------------------------------------------------------


def test_release_inside_the_minimum_hold_keeps_the_name_held(store: MongoDb) -> None:
    owner = Owner()
    taken = store.acquire("slot", owner, 0.2, min_hold=3.0)  # a lease shorter than the hold
    assert taken.acquired and taken.record is not None and taken.record.hold_until is not None
    assert taken.record.expires_at == taken.record.hold_until  # folded into the lease
    assert store.release("slot", owner.owner_token)  # a clean release, into the hold
    held = store.get("slot")
    assert held is not None and held.released_at is not None and held.hold_until == taken.record.hold_until
    assert held.expires_at == held.hold_until and held.fencing_token == taken.record.fencing_token
    assert not store.release("slot", owner.owner_token)  # the token no longer releases ...
    assert store.renew("slot", owner.owner_token, 60) is None  # ... or renews it
    refused = store.acquire("slot", Owner(), 60)
    assert not refused.acquired and refused.record is not None and refused.record.released
    assert refused.retry_after is not None and 0 < refused.retry_after <= 3.0
    assert [record.name for record in store.list()] == ["slot"]
    time.sleep(refused.retry_after + 0.05)
    after = store.acquire("slot", Owner(), 60)
    assert after.acquired and after.expired is None  # the slot ran and ended: not an expiry
    assert after.record is not None and after.record.fencing_token > taken.record.fencing_token
    assert after.record.released_at is None and after.record.hold_until is None


def test_a_crashed_holder_frees_at_the_later_of_lease_and_hold(store: MongoDb) -> None:
    crashed = Owner()
    taken = store.acquire("crash", crashed, 0.1, min_hold=2.5)
    assert taken.acquired and taken.record is not None
    time.sleep(0.3)  # the lease alone would be over
    refused = store.acquire("crash", Owner(), 60)
    assert not refused.acquired and refused.retry_after is not None
    time.sleep(refused.retry_after + 0.05)
    after = store.acquire("crash", Owner(), 60)
    assert after.acquired and after.expired is not None and after.expired.owner_token == crashed.owner_token


def test_renew_never_shortens_the_hold_and_release_after_it_frees(store: MongoDb) -> None:
    owner = Owner()
    taken = store.acquire("renewed", owner, 0.5, min_hold=30)
    assert taken.acquired and taken.record is not None
    renewed = store.renew("renewed", owner.owner_token, 0.5)
    assert renewed is not None and renewed.expires_at == taken.record.hold_until
    longer = store.renew("renewed", owner.owner_token, 120)
    assert longer is not None and longer.expires_at is not None and taken.record.hold_until is not None
    assert longer.expires_at > taken.record.hold_until
    short = Owner()
    assert store.acquire("short", short, 60, min_hold=0.05).acquired
    time.sleep(0.1)
    assert store.release("short", short.owner_token)
    assert store.get("short") is None  # after the hold: free at once
    assert raw(store).find_one({"_id": "short"})["name"] == {"free": "short"}


# -- purge (contract 2) -------------------------------------------------------------------


def test_purge_after_seconds_from_the_url(url: str) -> None:
    assert MongoDb(f"{url}?purge_after_seconds=120").purge_after_seconds == 120.0
    assert MongoDb(f"{url}?purgeAfterSeconds=none").purge_after_seconds is None
    assert MongoDb(url).purge_after_seconds == persisters.DEFAULT_PURGE_AFTER_SECONDS
    assert MongoDb(f"{url}?purgeAfterSeconds=120", purge_after_seconds=None).purge_after_seconds is None


# -- native async (contract 3) ------------------------------------------------------------


async def test_async_primitives_round_trip(store: MongoDb) -> None:
    assert MongoDb.native_async and MongoDb.supports_min_hold
    owner = Owner(metadata={"run": "async"})
    taken = await store.aacquire("async", owner, 60)
    assert taken.acquired and taken.record is not None
    assert store.get("async") == taken.record  # the sync and async drivers see one store
    assert await store.aget("async") == taken.record
    assert [record.name for record in await store.alist("asy")] == ["async"]
    refused = await store.aacquire("async", Owner(), 60)
    assert not refused.acquired and refused.record == taken.record and refused.retry_after is not None
    renewed = await store.arenew("async", owner.owner_token, 120)
    assert renewed is not None and renewed.expires_at is not None and taken.record.expires_at is not None
    assert renewed.expires_at > taken.record.expires_at
    assert await store.arelease("async", owner.owner_token)
    assert not await store.arelease("async", owner.owner_token)
    assert await store.aget("async") is None
    held = await store.aacquire("async", Owner(), 60, min_hold=60)
    assert held.acquired and held.record is not None and held.record.hold_until is not None
    removed = await store.aforce_release("async")
    assert removed is not None and removed.fencing_token == held.record.fencing_token
    assert await store.aget("async") is None
    await store.aclose()


def _use_in_a_new_loop(store: MongoDb, name: str) -> bool:
    async def attempt() -> bool:
        owner = Owner()
        result = await store.aacquire(name, owner, 60)
        released = await store.arelease(name, owner.owner_token)
        await store.aclose()
        return result.acquired and released

    return asyncio.run(attempt())


def test_one_persister_serves_several_event_loops(store: MongoDb) -> None:
    """pymongo binds an async client to its first loop: each loop gets its own."""
    assert _use_in_a_new_loop(store, "loop-1")
    assert _use_in_a_new_loop(store, "loop-2")
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(_use_in_a_new_loop(store, "loop-3")))
    thread.start()
    thread.join(60)
    assert results == [True]


# -- waiting (contract 4) ----------------------------------------------------------------


def _is_replica_set(store: MongoDb) -> bool:
    hello = store._client().admin.command("hello")
    return bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"


async def test_many_async_waiters_share_one_change_stream(store: MongoDb, url: str) -> None:
    holder, waiters = Owner(), 32
    assert (await store.aacquire("crowd", holder, 600)).acquired
    other = MongoDb(url, database=RUN_DATABASE, collection=store.collection_name)  # same config: same hub
    order: list[int] = []

    async def waiter(index: int) -> None:
        owner = Owner()
        async with other.awatching("crowd") as watch:
            while not (await other.aacquire("crowd", owner, 60)).acquired:
                await watch.wait_async(10)
        order.append(index)
        assert await other.arelease("crowd", owner.owner_token)

    tasks = [asyncio.create_task(waiter(index)) for index in range(waiters)]
    await asyncio.sleep(0.5)
    listeners = [t for t in threading.enumerate() if t.name == f"singleton-mongodb-{store.collection_name}"]
    assert len(listeners) == 1  # one listener thread (one change stream) for every waiter
    assert other._hub() is store._hub()
    release = asyncio.get_running_loop().run_in_executor(None, store.release, "crowd", holder.owner_token)
    assert await release
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert sorted(order) == list(range(waiters))
    await other.aclose()
    other.close()


def test_in_process_release_wakes_a_waiter_without_change_streams() -> None:
    with mongodb_server.extra_server("--standalone") as server:
        store = MongoDb(server, database=RUN_DATABASE)
        try:
            owner = Owner()
            assert store.acquire("local", owner, 600).acquired
            with store.watching("local") as watch:
                threading.Timer(0.2, store.release, ("local", owner.owner_token)).start()
                assert watch.wait(60) is True  # woken by the release in this process, not the timeout
        finally:
            store.close()


# -- the fair queue (issue 22) -----------------------------------------------------------


class TestFairQueue(FairQueue, FairQueueAcrossProcesses):
    """The conformance kit's fair-queue rules, on a collection of this test's own."""

    @pytest.fixture
    def store_url(self, url: str, collection_name: str) -> str:
        return place_url(url, RUN_DATABASE, collection_name)


def test_waiters_queue_in_the_names_document(store: MongoDb) -> None:
    holder, first, second = Owner(), Owner(), Owner()
    assert store.acquire("q", holder, 60).acquired
    for waiter in (first, second):
        refused = store.acquire("q", waiter, 60, queue_for=30)
        assert not refused.acquired and not refused.queued_behind  # held: a conflict, queued all the same
        assert refused.record is not None and refused.record.owner_token == holder.owner_token
    doc = raw(store).find_one({"_id": "q"})
    assert [place["token"] for place in doc["queue"]] == [first.owner_token, second.owner_token]
    ends = [place["ends"] for place in doc["queue"]]
    assert all(0 < (end - doc["createdAt"]).total_seconds() <= 31 for end in ends)
    again = store.acquire("q", first, 60, queue_for=30)  # a later attempt keeps its place, refreshed
    assert not again.acquired
    doc = raw(store).find_one({"_id": "q"})
    assert [place["token"] for place in doc["queue"]] == [first.owner_token, second.owner_token]
    assert doc["queue"][0]["ends"] >= ends[0]

    assert store.release("q", holder.owner_token)
    behind = store.acquire("q", second, 60, queue_for=30)
    assert not behind.acquired and behind.queued_behind and behind.record is None
    assert behind.retry_after is not None and 0 < behind.retry_after <= 30
    assert raw(store).find_one({"_id": "q"})["owner"] is None  # refused: the name stays free for the head
    assert store.acquire("q", first, 60, queue_for=30).acquired
    doc = raw(store).find_one({"_id": "q"})
    assert [place["token"] for place in doc["queue"]] == [second.owner_token]  # taking it dropped the place
    assert store.release("q", first.owner_token)
    assert store.acquire("q", second, 60, queue_for=30).acquired
    assert "queue" not in raw(store).find_one({"_id": "q"})  # no place left: no field


def test_a_dead_waiters_place_ends(store: MongoDb) -> None:
    """A waiter that stops asking holds nobody up once its place has ended (by the server's clock)."""
    holder, dead, alive = Owner(), Owner(), Owner()
    assert store.acquire("dead", holder, 60).acquired
    assert not store.acquire("dead", dead, 60, queue_for=0.5).acquired
    assert not store.acquire("dead", alive, 60, queue_for=30).acquired
    assert store.release("dead", holder.owner_token)
    place_ends = raw(store).find_one({"_id": "dead"})["queue"][0]["ends"]
    for _ in range(1200):
        result = store.acquire("dead", alive, 60, queue_for=30)
        if result.acquired:
            break
        assert result.queued_behind  # behind the dead one's place, until it ends
        time.sleep(0.05)
    assert result.acquired and result.record is not None
    assert result.record.created_at >= place_ends, "taken before the earlier place had ended"
    assert "queue" not in raw(store).find_one({"_id": "dead"})  # the ended place went with that write


def test_leave_queue_drops_the_place_and_wakes_the_next(store: MongoDb, url: str) -> None:
    holder, first, second = Owner(), Owner(), Owner()
    assert store.acquire("leave", holder, 60).acquired
    for waiter in (first, second):
        assert not store.acquire("leave", waiter, 60, queue_for=30).acquired
    assert store.release("leave", holder.owner_token)
    assert store.acquire("leave", second, 60, queue_for=30).queued_behind
    store.leave_queue("leave", Owner().owner_token)  # no place: changes nothing
    assert [place["token"] for place in raw(store).find_one({"_id": "leave"})["queue"]] == [
        first.owner_token, second.owner_token]  # fmt: skip
    if _is_replica_set(store):  # the head leaving a free name sets the wake-up the change stream hears
        other = MongoDb(url, database=RUN_DATABASE, collection=store.collection_name, appname="next")
        watch = other.watch("leave", second.owner_token)
        try:
            assert watch.wait(60)  # the wake-up every (re)subscription gives
            store.leave_queue("leave", first.owner_token)
            assert watch.wait(60) is True
        finally:
            watch.close()
            other.close()
    else:
        store.leave_queue("leave", first.owner_token)
    assert [place["token"] for place in raw(store).find_one({"_id": "leave"})["queue"]] == [second.owner_token]
    assert store.acquire("leave", second, 60, queue_for=30).acquired


def test_a_release_wakes_the_head_of_the_queue_not_the_others(store: MongoDb, url: str) -> None:
    if not _is_replica_set(store):
        pytest.skip("change streams need a replica set")
    holder, first, second = Owner(), Owner(), Owner()
    assert store.acquire("head", holder, 600).acquired
    # Another client (other options): its hub hears only the change stream, not this process's releases.
    waiter = MongoDb(url, database=RUN_DATABASE, collection=store.collection_name, appname="waiters")
    watches = [waiter.watch("head", first.owner_token), waiter.watch("head", second.owner_token)]
    try:
        assert all(watch.wait(60) for watch in watches)  # the wake-up every (re)subscription gives
        for owner in (second, first):  # the later watch queued first: the store's order decides
            assert not waiter.acquire("head", owner, 60, queue_for=30).acquired
        assert store.release("head", holder.owner_token)
        assert watches[1].wait(60) is True  # the head: ``second``
        assert watches[0].wait(0) is False  # the release was dispatched whole: it named the head only
        assert not waiter.acquire("head", first, 60, queue_for=30).acquired
        assert waiter.acquire("head", second, 60, queue_for=30).acquired
    finally:
        for watch in watches:
            watch.close()
        waiter.close()


def test_round_trips_with_the_queue(store: MongoDb, monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter's uncontended cycle costs what a plain one does; a refusal and a leave are one write each."""
    store.acquire("warm", Owner(), 60)  # the indexes, once per collection
    calls = counted_calls(store, monkeypatch)
    for queue_for in (None, 30.0):
        calls.clear()
        owner = Owner()
        extra = {} if queue_for is None else {"queue_for": queue_for}
        assert store.acquire("cycle", owner, 60, **extra).acquired
        assert store.release("cycle", owner.owner_token)
        assert calls == ["find_one_and_update", "update_one"]
    holder, waiter = Owner(), Owner()
    assert store.acquire("cycle", holder, 60).acquired
    store.acquire("cycle", waiter, 60, queue_for=30)  # the clock estimate, fetched once
    calls.clear()
    assert not store.acquire("cycle", waiter, 60, queue_for=30).acquired
    assert store.release("cycle", holder.owner_token)
    assert store.acquire("cycle", Owner(), 60, queue_for=30).queued_behind
    store.leave_queue("cycle", waiter.owner_token)
    assert calls == ["find_one_and_update", "update_one", "find_one_and_update", "update_one"]


def test_a_seed_process_meets_the_queue(url: str) -> None:
    """The queue's fields break neither side: a seed process takes a free name whatever is queued, and a
    waiter refused by a seed lock keeps its place."""
    from tests.core.test_seed_migration import Seed

    database = f"seed_queue_{uuid.uuid4().hex[:10]}"
    store = MongoDb(url, database=database)  # the seed's collection
    seed = Seed(url, database, "shared")
    try:
        holder, first, second = Owner(), Owner(), Owner()
        assert store.acquire("shared", holder, 60).acquired
        assert not store.acquire("shared", first, 60, queue_for=30).acquired
        assert seed.call("lock")["locked"] is False  # a Python holder with a queue: still excluded
        assert store.release("shared", holder.owner_token)
        assert seed.call("lock")["locked"] is True  # the seed does not queue: it takes a free name
        refused = store.acquire("shared", first, 60, queue_for=30)  # the head, refused by the seed's unique index
        assert not refused.acquired and refused.record is not None and refused.record.owner_token == ""
        assert store.acquire("shared", second, 60, queue_for=30).queued_behind  # behind the head, seed or not
        doc = store._client()[database]["singletons"].find_one({"_id": "shared"})
        assert [place["token"] for place in doc["queue"]] == [first.owner_token, second.owner_token]
        assert doc["name"] == {"free": "shared"}  # the places were kept without claiming the name
        assert seed.call("release")["released"] is True
        assert store.acquire("shared", second, 60, queue_for=30).queued_behind
        assert store.acquire("shared", first, 60, queue_for=30).acquired
        assert seed.call("lock")["locked"] is False
        assert store.release("shared", first.owner_token)
        assert store.acquire("shared", second, 60, queue_for=30).acquired
    finally:
        seed.close()
        store.close()
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
        client.drop_database(database)
        client.close()


# -- pools and secrets (contract 6, issue 14 item 6) -------------------------------------


def test_persisters_with_one_config_share_one_client(url: str, collection_name: str) -> None:
    first = MongoDb(url, database=RUN_DATABASE, collection=collection_name)
    second = persisters.from_url(url, database=RUN_DATABASE, collection=f"{collection_name}_b")
    different = MongoDb(url, database=RUN_DATABASE, timeout_ms=7000)
    try:
        assert isinstance(second, MongoDb)
        assert first._client() is second._client()  # the collection is not part of the connection
        assert different._client() is not first._client()
        assert first.acquire("pooled", Owner(), 60).acquired
        first.close()  # the other user keeps the client open
        assert second.acquire("pooled", Owner(), 60).acquired
        assert first.get("pooled") is not None  # and the closed one reconnects on use
    finally:
        first.close()
        second.close()
        different.close()


def test_the_public_url_holds_no_password() -> None:
    secret = "hunter2-s3cret"
    store = MongoDb(f"mongodb://admin:{secret}@h1,h2/db?replicaSet=rs&authSource=admin")
    assert secret not in store.url and "admin:***@" in store.url
    assert all(secret not in str(value) for key, value in vars(store).items() if not key.startswith("_"))
    assert store._client().options.replica_set_name == "rs"  # the client still has the real credentials
    store.close()


async def test_async_unreachable_server_raises_persister_error(url: str) -> None:
    secret = "hunter2-s3cret"
    store = MongoDb(f"mongodb://admin:{secret}@127.0.0.1:{closed_port()}/db", timeout_ms=1500)
    with pytest.raises(PersisterError) as caught:
        await store.aacquire("job", Owner(), 60)
    assert isinstance(caught.value.__cause__, pymongo.errors.PyMongoError)
    assert secret not in str(caught.value)
    assert store.notifies is False  # inside a loop the probe never blocks: unknown means poll
    await store.aclose()


async def test_a_cancelled_async_waiter_holds_nothing(store: MongoDb) -> None:
    holder = Owner()
    assert (await store.aacquire("cancel", holder, 600)).acquired

    async def wait_for_it() -> None:
        async with store.awatching("cancel") as watch:
            while not (await store.aacquire("cancel", Owner(), 60)).acquired:
                await watch.wait_async(60)

    task = asyncio.create_task(wait_for_it())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    current = await store.aget("cancel")
    assert current is not None and current.owner_token == holder.owner_token
    assert store._hub() is not None and store._hub().names() == frozenset()  # its watch was closed
    await store.aclose()


def test_callers_wait_for_a_pooled_connection_instead_of_failing(url: str, collection_name: str) -> None:
    """maxPoolSize=1, eight threads at once: each waits its turn within its deadline."""
    store = MongoDb(f"{url}?maxPoolSize=1", database=RUN_DATABASE, collection=collection_name)
    results: list[bool] = []
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            owner = Owner()
            results.append(store.acquire(f"pool-{index}", owner, 60).acquired and store.release(f"pool-{index}", owner.owner_token))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    store.close()
    assert not errors and results == [True] * 8


def test_the_docstring_examples_run() -> None:
    import doctest

    from singleton_integrations.persisters import mongodb

    assert doctest.testmod(mongodb).failed == 0
