"""Issue 13: Node.js singleton-process processes and Python processes exclude each other on one MongoDB.

The seed is emulated from its protocol (tests/seed_emulator.py) and run as separate
processes, against SecantusDB or, with MONGODB_URL, a real mongod. Each test gets a
fresh database whose collection is the seed's default, ``singletons``.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pymongo
import pytest

from singleton_integrations import Singleton
from singleton_integrations._record import Owner
from singleton_integrations.persisters._mongodb_steps import SEED_HOST
from singleton_integrations.persisters.mongodb import DEFAULT_COLLECTION, MongoDb
from tests.servers import mongodb_server

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0


class Seed:
    """A seed-protocol process, driven one JSON command at a time."""

    def __init__(self, url: str, database: str, name: str, *, expire: float | None = None,
                 clock_offset: float = 0.0) -> None:  # fmt: skip
        command = [sys.executable, "-m", "tests.seed_emulator", url, database, DEFAULT_COLLECTION, name,
                   "--clock-offset", str(clock_offset)]  # fmt: skip
        if expire is not None:
            command += ["--expire", str(expire)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self._reply() == {"ready": True}

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def _reply(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self._lines.get(timeout=TIMEOUT)))
        except queue.Empty:
            raise AssertionError(f"the seed process did not answer within {TIMEOUT:.0f} s") from None

    def send(self, cmd: str, **fields: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.process.stdin.flush()

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.send(cmd, **fields)
        return self._reply()

    def close(self) -> None:
        if self.process.poll() is None:
            self.send("quit")
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT)


@pytest.fixture(scope="module")
def url() -> str:
    return mongodb_server.url()


@pytest.fixture
def database(url: str) -> Iterator[str]:
    name = f"seed_{uuid.uuid4().hex[:12]}"
    yield name
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        client.drop_database(name)
    finally:
        client.close()


@pytest.fixture
def store(url: str, database: str) -> Iterator[MongoDb]:
    persister = MongoDb(url, database=database)  # the default collection: the seed's
    yield persister
    persister.close()


@pytest.fixture
def seeds(url: str, database: str) -> Iterator[Any]:
    started: list[Seed] = []

    def start(name: str, **options: Any) -> Seed:
        seed = Seed(url, database, name, **options)
        started.append(seed)
        return seed

    yield start
    for seed in started:
        seed.close()


def raw(store: MongoDb) -> Any:
    return store._client()[store.database_name][store.collection_name]


def server_now(store: MongoDb) -> datetime:
    return store._client().admin.command("hello")["localTime"].replace(tzinfo=timezone.utc)


# -- 1. a seed's lock is a conflict for Python -----------------------------------------


def test_a_seed_lock_is_a_conflict_described_as_singleton_process(store: MongoDb, seeds: Any) -> None:
    seed = seeds("nightly")
    assert seed.call("lock")["locked"]
    created = raw(store).find_one({"name": "nightly"})["created"].replace(tzinfo=timezone.utc)

    job = Singleton("nightly", store, lock_expire_seconds=60)
    conflicts: list[str] = []
    job.on("conflict", conflicts.append)
    assert not job.lock()
    holder = job.holder()
    assert holder is not None and holder.host == SEED_HOST and holder.metadata == {"protocol": "singleton-process"}
    assert abs((holder.created_at - created).total_seconds()) < 0.002  # created as the seed wrote it
    assert holder.expires_at is None  # judged with each acquiring lock's own lock_expire_seconds
    assert conflicts and "singleton-process" in conflicts[0]
    assert store.list() == [holder] and job.exists()
    assert seed.call("exists")["exists"]  # Python's attempt left the seed's lock alone
    assert [doc["name"] for doc in raw(store).find({"name": {"$type": "string"}})] == ["nightly"]

    # 4. released by the seed: free for Python at once.
    seed.call("release")
    assert job.lock()
    reply = seed.call("lock")
    assert reply["locked"] is False  # and Python's hold is now the seed's conflict
    job.release()


def test_seed_lock_expiry_rule_for_python(store: MongoDb, url: str, database: str, seeds: Any) -> None:
    """Default: the acquiring lock's lock_expire_seconds from ``created``; or a fixed number; or never."""
    old = seeds("old", clock_offset=-3600)  # a lock created an hour ago by the seed's clock
    assert old.call("lock")["locked"]

    never = MongoDb(url, database=database, seed_lock_expire_seconds=None)
    fixed = MongoDb(f"{url.rstrip('/')}/{database}?seedLockExpireSeconds=7200")
    try:
        assert fixed.seed_lock_expire_seconds == 7200.0
        refused = never.acquire("old", Owner(), 60)
        assert not refused.acquired and refused.record is not None and refused.record.host == SEED_HOST
        refused = fixed.acquire("old", Owner(), 60)
        assert not refused.acquired and refused.retry_after is not None and 3500 < refused.retry_after <= 3600
        assert refused.record is not None and refused.record.expires_at is not None
        assert not Singleton("old", store, lock_expire_seconds=7200).lock()  # the seed's rule with 7200 s
    finally:
        never.close()
        fixed.close()

    events: list[tuple[str, str]] = []
    job = Singleton("old", store, lock_expire_seconds=60)
    job.on("expired", lambda message: events.append(("expired", message)))
    job.on("locked", lambda message: events.append(("locked", message)))
    assert job.lock()  # an hour old, beyond 60 s: taken over
    assert [kind for kind, _ in events] == ["expired", "locked"]
    assert "singleton-process" in events[0][1]
    assert raw(store).count_documents({"name": "old"}) == 1 and raw(store).find_one({"name": "old"})["_id"] == "old"
    assert old.call("exists")["exists"]  # the seed sees the name taken
    assert not old.call("lock")["locked"]
    job.release()


# -- 2. a Python lock is a conflict for the seed ----------------------------------------


def test_a_python_lock_is_a_conflict_for_the_seed_until_its_lease_ends(store: MongoDb, seeds: Any) -> None:
    owner = Owner()
    taken = store.acquire("nightly", owner, 30)
    assert taken.acquired and taken.record is not None and taken.record.expires_at is not None
    seed = seeds("nightly", expire=0.5)  # a much shorter lockExpireSeconds than the Python lease
    assert seed.call("exists")["exists"]
    reply = seed.call("lock")
    assert reply["locked"] is False and reply["expired"] is False
    assert datetime.fromisoformat(reply["conflict_created"]) == taken.record.expires_at  # created = the lease end

    time.sleep(0.8)  # beyond the seed's 0.5 s since the acquire: its rule still counts from the lease end
    assert seed.call("lock")["locked"] is False
    renewed = store.renew("nightly", owner.owner_token, 60)
    assert renewed is not None and renewed.expires_at is not None and renewed.expires_at > taken.record.expires_at
    created = raw(store).find_one({"_id": "nightly"})["created"].replace(tzinfo=timezone.utc)
    assert created == renewed.expires_at  # moved by the renewal
    assert seed.call("lock")["locked"] is False

    forever = Owner()
    assert store.acquire("forever", forever, None).acquired  # no expiry: the seed's rule never reaches it
    assert raw(store).find_one({"_id": "forever"})["created"].year == 9999
    assert seed.call("lock", name="forever")["locked"] is False

    # 4. released by Python: free for the seed at once, though Python keeps the document.
    assert store.release("nightly", owner.owner_token)
    reply = seed.call("lock", name="nightly")
    assert reply["locked"] is True and reply["expired"] is False
    assert raw(store).find_one({"_id": "nightly"})["name"] == {"free": "nightly"}  # the counter stays
    refused = store.acquire("nightly", Owner(), 30)
    assert not refused.acquired and refused.record is not None and refused.record.host == SEED_HOST
    seed.call("release")
    assert store.acquire("nightly", Owner(), 30).acquired


def test_a_python_lock_in_its_minimum_hold_is_a_conflict_for_the_seed(store: MongoDb, seeds: Any) -> None:
    owner = Owner()
    taken = store.acquire("slot", owner, 5, min_hold=3600)
    assert taken.acquired and store.release("slot", owner.owner_token)
    seed = seeds("slot", expire=1)
    reply = seed.call("lock")
    assert reply["locked"] is False
    assert datetime.fromisoformat(reply["conflict_created"]).timestamp() > time.time() + 3000  # created = hold end


# -- 3. the seed's unique index never breaks Python acquires ------------------------------


def test_the_seed_index_first_then_python(store: MongoDb, seeds: Any) -> None:
    seed = seeds("other")
    assert seed.call("exists") == {"exists": False, "events": []}  # the seed's ensureIndex ran
    owners = {f"job-{index}": Owner() for index in range(12)}
    for name, owner in owners.items():
        assert store.acquire(name, owner, 60).acquired, name
    for name in list(owners)[::2]:
        assert store.release(name, owners[name].owner_token)
    for name in list(owners)[::2]:
        assert store.acquire(name, Owner(), 60).acquired, name  # released names, taken again
    assert seed.call("lock")["locked"]  # and the seed still locks its own names
    assert store.acquire("job-new", Owner(), 60).acquired


def test_the_seed_index_created_after_python_documents(store: MongoDb, seeds: Any) -> None:
    """Held, free, expired and never-expiring Python documents: the seed's ensureIndex still succeeds."""
    held, free, expiring = Owner(), Owner(), Owner()
    assert store.acquire("held", held, 60).acquired
    for index in range(5):
        owner = Owner()
        assert store.acquire(f"free-{index}", owner, 60).acquired
        assert store.release(f"free-{index}", owner.owner_token)
    assert store.acquire("expiring", expiring, 0.01).acquired
    assert store.acquire("forever", free, None).acquired
    raw(store).drop_index("name_1")  # as if the documents predated the index (e.g. no createIndex right)

    seed = seeds("free-0")
    assert seed.call("lock")["locked"]  # ensureIndex succeeded, then the insert of a Python-free name
    info = raw(store).index_information()["name_1"]
    assert info["unique"] and info["key"] == [("name", 1)]
    assert seed.call("lock", name="held")["locked"] is False  # the index now guards Python's holds
    for index in range(1, 5):
        assert store.acquire(f"free-{index}", Owner(), 60).acquired
    assert store.acquire("brand-new", Owner(), 60).acquired
    assert not store.acquire("free-0", Owner(), 60).acquired  # the seed holds it


# -- 5. fencing tokens keep rising across seed use ------------------------------------------


def test_fencing_tokens_rise_across_names_the_seed_also_takes(store: MongoDb, seeds: Any) -> None:
    seed = seeds("shared", expire=0.05)
    tokens: list[int] = []
    for _ in range(3):
        owner = Owner()
        result = store.acquire("shared", owner, 60)
        assert result.acquired and result.record is not None
        tokens.append(result.record.fencing_token)
        assert store.release("shared", owner.owner_token)
        assert seed.call("lock")["locked"]
        assert seed.call("release")["released"]
    # The seed's expiry deletes a crashed Python holder's document, counter and all.
    crashed = store.acquire("shared", Owner(), 0.05)
    assert crashed.acquired and crashed.record is not None
    tokens.append(crashed.record.fencing_token)
    time.sleep(0.3)  # past the lease end plus the seed's 0.05 s
    reply = seed.call("lock")
    assert reply["locked"] and reply["expired"]
    assert raw(store).find_one({"_id": "shared"}) is None
    seed.call("release")
    again = store.acquire("shared", Owner(), 60)
    assert again.acquired and again.record is not None
    tokens.append(again.record.fencing_token)
    assert tokens == sorted(set(tokens)), tokens


# -- 6. the seed's index but no seed documents: the starting point -------------------------


def test_a_database_with_the_seed_index_and_no_seed_documents_just_works(store: MongoDb) -> None:
    raw(store).create_index([("name", 1)], unique=True)  # what the seed left behind
    jobs = [Singleton(f"report-{index}", store, lock_expire_seconds=30) for index in range(6)]
    for job in jobs:
        assert job.lock()
    assert [record.name for record in store.list("report-")] == [f"report-{index}" for index in range(6)]
    rival = Singleton("report-0", store, lock_expire_seconds=30)
    assert not rival.lock()
    first_token = jobs[0].fencing_token
    for job in jobs:
        assert job.release()
    assert rival.lock() and rival.fencing_token is not None and first_token is not None
    assert rival.fencing_token > first_token
    assert rival.release()
    assert store.list() == []


# -- the race: one seed process and one Python process, one expired lock -------------------


def _python_contender(url: str, database: str, commands: Any, replies: Any) -> None:
    store = MongoDb(url, database=database)
    store.get("warm-up")  # connect before the race, so the race is on the writes
    replies.put("ready")
    owners: dict[str, Owner] = {}
    while True:
        command = commands.get(timeout=TIMEOUT)
        if command is None:
            break
        kind, name, at = command
        if kind == "acquire":
            time.sleep(max(0.0, at - time.time()))
            owner = owners[name] = Owner()
            result = store.acquire(name, owner, 60)
            replies.put((result.acquired, owner.owner_token, result.expired.host if result.expired else None))
        else:  # "verify": does our lock still stand? (a renewal: what Singleton's renewal would learn)
            replies.put(store.renew(name, owners[name].owner_token, 60) is not None)
    store.close()


@pytest.mark.parametrize("expired_side", ["seed", "python"])
def test_a_seed_process_and_a_python_process_race_for_one_expired_lock(
    store: MongoDb, url: str, database: str, seeds: Any, expired_side: str
) -> None:
    trials = 10
    seed = seeds("warm-up", expire=0.05)
    context = multiprocessing.get_context("spawn")
    commands, replies = context.Queue(), context.Queue()
    python = context.Process(target=_python_contender, args=(url, database, commands, replies))
    python.start()
    try:
        assert replies.get(timeout=TIMEOUT) == "ready"
        outcomes = []
        for trial in range(trials):
            name = f"race-{trial}"
            if expired_side == "seed":  # a seed lock created an hour ago
                raw(store).insert_one({"name": name, "created": datetime.now(timezone.utc) - timedelta(hours=1)})
            else:  # a crashed Python holder, expired by both sides' rules
                assert store.acquire(name, Owner(), 0.05).acquired
        time.sleep(0.3)
        for trial in range(trials):
            name = f"race-{trial}"
            at = time.time() + 0.3
            seed.send("lock", name=name, at=at)
            commands.put(("acquire", name, at))
            seed_reply = seed._reply()
            python_acquired, python_token, python_expired = replies.get(timeout=TIMEOUT)
            commands.put(("verify", name, 0))
            python_holds = replies.get(timeout=TIMEOUT)
            docs = list(raw(store).find({"name": name}))
            assert len(docs) == 1, docs  # the unique index: one lock document, whoever won
            seed_holds = seed_reply["locked"] and str(docs[0]["_id"]) == seed_reply["id"]
            assert python_holds == (docs[0].get("owner") == python_token)
            assert seed_holds + python_holds == 1, (seed_reply, python_acquired)  # exactly one holds
            if seed_reply["locked"]:
                assert seed_holds  # Python never deletes a seed's fresh lock
            if python_acquired and not python_holds:
                # Only the seed's unconditional delete (stale expiry read) can do this, and
                # Python learns it on its next renewal: ``lost``, not a silent double hold.
                assert seed_holds and seed_reply["expired"]
            if python_acquired and python_holds and expired_side == "seed" and not seed_reply["expired"]:
                assert python_expired == SEED_HOST  # the expired seed lock was Python's to take over
            outcomes.append(("seed" if seed_holds else "python", python_acquired and not python_holds))
        winners = {side for side, _ in outcomes}
        print(f"race over an expired {expired_side} lock: winners {outcomes}")
        assert winners <= {"seed", "python"}
    finally:
        commands.put(None)
        python.join(TIMEOUT)
        if python.is_alive():
            python.kill()
    assert python.exitcode == 0


# -- waiting: a seed's release wakes Python waiters (the change stream, across processes) --


def test_a_seed_release_wakes_a_python_waiter(store: MongoDb, seeds: Any) -> None:
    seed = seeds("woken")
    assert seed.call("lock")["locked"]
    with store.watching("woken") as watch:
        hub = store._hub()
        assert hub is not None
        if store.notifies:
            assert hub.subscribed.wait(TIMEOUT)
            watch.wait(0)  # the wake-up every (re)subscription sends
            assert not store.acquire("woken", Owner(), 60).acquired
            seed.send("release", at=time.time() + 0.3)
            assert watch.wait(TIMEOUT) is True  # the seed's delete, seen by the one change stream
            seed._reply()
        else:  # a standalone mongod (MONGODB_URL): waiters poll
            seed.call("release")
        assert store.acquire("woken", Owner(), 60).acquired


def _release_in_another_process(url: str, database: str, name: str, token: str) -> None:
    store = MongoDb(url, database=database)
    time.sleep(0.3)
    assert store.release(name, token)
    store.close()


def test_a_release_in_another_python_process_wakes_a_waiter(store: MongoDb, url: str, database: str) -> None:
    owner = Owner()
    assert store.acquire("elsewhere", owner, 600).acquired
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_release_in_another_process, args=(url, database, "elsewhere", owner.owner_token))
    if not store.notifies:  # a standalone mongod (MONGODB_URL): the waiter polls instead
        child.start()
        assert Singleton("elsewhere", store, lock_expire_seconds=60).lock(wait=TIMEOUT)
        child.join(TIMEOUT)
        assert child.exitcode == 0
        return
    with store.watching("elsewhere") as watch:
        hub = store._hub()
        assert hub is not None and hub.subscribed.wait(TIMEOUT)
        watch.wait(0)
        child.start()
        assert watch.wait(TIMEOUT) is True
        child.join(TIMEOUT)
        assert child.exitcode == 0
    assert store.acquire("elsewhere", Owner(), 60).acquired
