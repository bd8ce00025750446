"""SQLite under ``limit=N`` on real files: the store's rules for several holds of one name.

Called on the persister directly; the core-level rules for N > 1 are the conformance kit's.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from singleton_integrations import persisters
from singleton_integrations._record import Owner
from singleton_integrations.persisters import sqlite as sqlite_module


def _store(tmp_path: Path, **options: object) -> persisters.Sqlite:
    return persisters.Sqlite(tmp_path / "locks.sqlite3", **options)  # type: ignore[arg-type]


@pytest.fixture
def unheard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> persisters.Sqlite:
    """A store on a fresh file whose waiters hear only this process's own calls: no inotify
    listener, whose subscription wakes every waiter at a moment of its own choosing."""
    monkeypatch.setattr(sqlite_module, "inotify_listener", lambda _path, _free_of: None)
    store = _store(tmp_path)
    assert store._shared.hub._listen is None
    return store


def _table(path: Path, table: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY name, fencing_token").fetchall()


def _until(moment: float) -> None:
    while time.time() <= moment:
        time.sleep(max(moment - time.time(), 0.001))


def _subscribed(store: persisters.Sqlite, watch: persisters.ReleaseWatch) -> bool:
    """Wait until the file's listener watches it, and consume the wake-up it sends ``watch`` then
    (as in test_sqlite.py). False where inotify is missing."""
    if not store._shared.hub.subscribed.wait(30):
        return False
    assert watch.wait(30), "the listener woke the watch registered before it started"
    return True


def _take(store: persisters.Sqlite, name: str, count: int, limit: int = 3, ttl: float | None = 30,
          min_hold: float | None = None) -> list[Owner]:
    owners = [Owner(metadata={"n": i}) for i in range(count)]
    for owner in owners:
        assert store.acquire(name, owner, ttl, min_hold, limit=limit).acquired
    return owners


def test_n_holds_are_granted_then_refused_naming_every_holder(tmp_path: Path) -> None:
    store = _store(tmp_path)
    owners = [Owner(metadata={"n": i}) for i in range(3)]
    taken = [store.acquire("exports", owner, 30 + i, limit=3) for i, owner in enumerate(owners)]
    assert all(result.acquired and result.record is not None for result in taken)
    before = time.time()
    refused = store.acquire("exports", Owner(), 30, limit=3)
    after = time.time()
    assert not refused.acquired and not refused.queued_behind
    assert [h.owner_token for h in refused.holders] == [o.owner_token for o in owners], "every holder, by token"
    assert [h.metadata for h in refused.holders] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert refused.record == refused.holders[0]
    soonest = min(h.expires_at.timestamp() for h in refused.holders)  # type: ignore[union-attr]
    assert refused.retry_after is not None
    assert soonest - after - 0.001 <= refused.retry_after <= soonest - before + 0.001, "the soonest end of a hold"
    assert all(h.name == "exports" for h in refused.holders)


def test_holds_without_expiry_refuse_with_no_retry_after(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _take(store, "forever", 2, limit=2, ttl=None)
    refused = store.acquire("forever", Owner(), 30, limit=2)
    assert not refused.acquired and refused.retry_after is None and len(refused.holders) == 2


def test_an_owner_that_holds_one_gets_it_back(tmp_path: Path) -> None:
    store = _store(tmp_path)
    owner, = _take(store, "again", 1)
    first = store.get("again")
    for limit in (3, 1):  # also an attempt without a limit, as a Lease retaken by its token
        again = store.acquire("again", owner, 30, limit=limit)
        assert again.acquired and again.record == first, "the same hold, the same fencing token"
    assert len(store.holders("again")) == 1


def test_a_hold_without_a_limit_is_stored_as_ever_and_the_others_apart(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path)
    single = Owner()
    assert store.acquire("one", single, 30).acquired
    rows = _table(path, "singleton_locks")
    assert len(rows) == 1 and len(rows[0]) == 10 and rows[0][1] == single.owner_token
    assert _table(path, "singleton_holds") == []
    _take(store, "three", 3)
    assert [row[0] for row in _table(path, "singleton_locks")] == ["one"], "holds with a limit never touch it"
    assert [(row[0], row[-1]) for row in _table(path, "singleton_holds")] == [("three", 3)] * 3


def test_mixed_n_each_attempt_counts_every_live_hold(tmp_path: Path) -> None:
    store = _store(tmp_path)
    single = Owner()
    assert store.acquire("mixed", single, 30).acquired, "N = 1 first"
    assert store.acquire("mixed", Owner(), 30, limit=3).acquired, "N = 3: 1 live, room for 2 more"
    refused = store.acquire("mixed", Owner(), 30, limit=2)
    assert not refused.acquired and len(refused.holders) == 2, "N = 2: 2 live"
    assert store.acquire("mixed", Owner(), 30, limit=3).acquired
    assert not store.acquire("mixed", Owner(), 30, limit=3).acquired
    assert store.release("mixed", single.owner_token)
    alone = store.acquire("mixed", Owner(), 30)
    assert not alone.acquired and alone.record is not None, "N = 1 refuses while a hold taken with N = 3 is live"
    assert store.acquire("mixed", Owner(), 30, limit=3).acquired, "the freed hold goes to an N = 3 attempt"


def test_fencing_tokens_rise_across_every_hold_and_both_kinds(tmp_path: Path) -> None:
    store = _store(tmp_path)
    tokens: list[int] = []

    def took(result: object) -> None:
        assert result.acquired and result.record is not None  # type: ignore[attr-defined]
        tokens.append(result.record.fencing_token)  # type: ignore[attr-defined]

    single = Owner()
    took(store.acquire("fenced", single, 30))
    owners = [Owner() for _ in range(3)]
    for owner in owners[:2]:
        took(store.acquire("fenced", owner, 30, limit=3))
    store.release("fenced", single.owner_token)
    store.release("fenced", owners[0].owner_token)
    took(store.acquire("fenced", owners[2], 30, limit=3))  # takes a dead hold's row
    store.release("fenced", owners[1].owner_token)
    store.release("fenced", owners[2].owner_token)
    took(store.acquire("fenced", Owner(), 30))  # N = 1 again: above every hold taken with a limit
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens


def test_a_name_only_ever_held_with_a_limit_passes_its_sequence_to_an_attempt_without_one(tmp_path: Path) -> None:
    """No ``singleton_locks`` row at all: the same statement still sees the holds taken with a limit."""
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path)
    owners = _take(store, "limited", 2)
    assert not store.acquire("limited", Owner(), 30).acquired, "refused while they are live"
    last = max(record.fencing_token for record in store.holders("limited"))
    for owner in owners:
        store.release("limited", owner.owner_token)
    assert _table(path, "singleton_locks") == []
    taken = store.acquire("limited", Owner(), 30)
    assert taken.record is not None and taken.record.fencing_token > last
    assert _table(path, "singleton_holds") == [], "the dead holds go once a later token stands for them"


def test_tokens_rise_after_a_purge_of_every_row(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path, purge_after_seconds=0.05)
    owners = _take(store, "recycled", 3)
    last = max(record.fencing_token for record in store.holders("recycled"))
    for owner in owners:
        store.release("recycled", owner.owner_token)
    _until(time.time() + 0.06)
    assert store.purge() == 3 and _table(path, "singleton_holds") == [], "dead holds go with the retention sweep"
    again = store.acquire("recycled", Owner(), 30, limit=3)
    assert again.record is not None and again.record.fencing_token > last


def test_release_and_renew_act_on_their_own_hold_only(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first, second, third = _take(store, "own", 3)
    assert not store.release("own", Owner().owner_token), "a token that holds nothing releases nothing"
    renewed = store.renew("own", second.owner_token, 300)
    assert renewed is not None and renewed.owner_token == second.owner_token
    by_token = {record.owner_token: record for record in store.holders("own")}
    assert by_token[second.owner_token].expires_at == renewed.expires_at
    assert by_token[first.owner_token].expires_at < renewed.expires_at  # type: ignore[operator]
    assert store.release("own", first.owner_token)
    assert not store.release("own", first.owner_token), "released once"
    assert store.renew("own", first.owner_token, 30) is None, "a released hold is not renewed"
    assert [record.owner_token for record in store.holders("own")] == [second.owner_token, third.owner_token]


def test_each_hold_keeps_its_own_minimum_hold(tmp_path: Path) -> None:
    store = _store(tmp_path)
    held, brief = Owner(), Owner()
    taken = store.acquire("min", held, 30, 1.0, limit=2)
    assert taken.acquired and taken.record is not None and taken.record.hold_until is not None
    until = taken.record.hold_until.timestamp()
    assert store.acquire("min", brief, 30, limit=2).acquired
    assert store.release("min", held.owner_token), "a release inside the minimum hold is a clean release"
    assert store.release("min", brief.owner_token)
    live = store.holders("min")
    alone = store.acquire("min", Owner(), 30, limit=1)
    if time.time() < until:  # a very slow run could outlast the hold
        assert len(live) == 1 and live[0].released and live[0].owner_token == ""
        assert live[0].fencing_token == taken.record.fencing_token
        assert not alone.acquired, "the released hold still counts for N = 1"
        assert store.acquire("min", Owner(), 30, limit=2).acquired, "and leaves one of two free"
    _until(until)
    assert store.renew("min", held.owner_token, 30) is None
    assert all(not record.released for record in store.holders("min")), "the minimum hold ended"


def test_renew_never_shortens_a_minimum_hold(tmp_path: Path) -> None:
    store = _store(tmp_path)
    owner, = _take(store, "floor", 1, ttl=30, min_hold=600)
    renewed = store.renew("floor", owner.owner_token, 1)
    assert renewed is not None and renewed.hold_until is not None and renewed.expires_at == renewed.hold_until


def test_one_expired_hold_is_taken_over_and_the_others_are_untouched(tmp_path: Path) -> None:
    store = _store(tmp_path)
    kept = [store.acquire("lapse", Owner(), 30, limit=3).record for _ in range(2)]
    brief = Owner()
    short = store.acquire("lapse", brief, 0.3, limit=3).record
    assert short is not None and short.expires_at is not None
    _until(short.expires_at.timestamp())
    assert store.holders("lapse") == kept, "the lapsed hold is gone, by the store's clock, and only it"
    assert store.renew("lapse", brief.owner_token, 30) is None, "a lapsed hold cannot be renewed"
    taken = store.acquire("lapse", Owner(), 30, limit=3)
    assert taken.acquired and taken.expired is not None and taken.expired.owner_token == brief.owner_token
    assert taken.record is not None and taken.record.fencing_token > short.fencing_token
    assert not store.release("lapse", brief.owner_token), "nor released"
    assert store.holders("lapse") == [*kept, taken.record]


def test_list_holders_get_and_force_release(unheard: persisters.Sqlite) -> None:
    store = unheard
    _take(store, "job-b", 3)
    single = Owner()
    assert store.acquire("job-a", single, 30).acquired
    listed = store.list("job-")
    assert [(record.name, record.fencing_token) for record in listed] == sorted(
        (record.name, record.fencing_token) for record in listed)
    assert [record.name for record in listed] == ["job-a", "job-b", "job-b", "job-b"]
    holds = store.holders("job-b")
    assert store.get("job-b") == holds[0], "get prefers the lowest fencing token"
    assert store.holders("job-a") == [store.get("job-a")] and store.holders("nothing") == []
    watches = [store.watch("job-b") for _ in range(3)]
    try:
        removed = store.force_release("job-b")
        assert removed == holds[0], "the removed hold with the lowest token"
        assert all(watch.wait(0) for watch in watches), "one wake-up per freed hold"
    finally:
        for watch in watches:
            watch.close()
    assert store.holders("job-b") == [] and store.force_release("job-b") is None
    assert store.acquire("job-b", Owner(), 30).acquired, "free for N = 1 again"


def test_force_release_frees_both_kinds_of_hold(tmp_path: Path) -> None:
    store = _store(tmp_path)
    single = Owner()
    assert store.acquire("both", single, 30).acquired
    _take(store, "both", 2)
    removed = store.force_release("both")
    assert removed is not None and removed.owner_token == single.owner_token
    assert store.holders("both") == [] and not store.release("both", single.owner_token)


def test_queue_order_with_n_holds(tmp_path: Path) -> None:
    store = _store(tmp_path)
    holders = _take(store, "fair", 2, limit=2)
    first, second, third = Owner(), Owner(), Owner()
    for owner in (first, second, third):  # queued in this order while both holds are live
        refused = store.acquire("fair", owner, 30, queue_for=10, limit=2)
        assert not refused.acquired and not refused.queued_behind and len(refused.holders) == 2
    store.release("fair", holders[0].owner_token)
    behind = store.acquire("fair", second, 30, queue_for=10, limit=2)
    assert not behind.acquired and behind.queued_behind, "one free hold: only the first place may take it"
    assert store.acquire("fair", Owner(), 30, limit=2).acquired, "a caller that does not wait is not queued"
    store.force_release("fair")
    assert store.acquire("fair", second, 30, queue_for=10, limit=2).acquired, "two free: the first two places"
    assert store.acquire("fair", third, 30, queue_for=10, limit=2).queued_behind, "one free, and a place ahead"
    assert store.acquire("fair", first, 30, queue_for=10, limit=2).acquired
    full = store.acquire("fair", third, 30, queue_for=10, limit=2)
    assert not full.acquired and not full.queued_behind and len(full.holders) == 2, "full again, not behind"
    store.leave_queue("fair", third.owner_token)
    with sqlite3.connect(tmp_path / "locks.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM singleton_waiters").fetchone() == (0,), "takers dropped their places"


def test_an_attempt_without_a_limit_waits_in_the_same_queue(tmp_path: Path) -> None:
    store = _store(tmp_path)
    two, = _take(store, "shared-queue", 1, limit=2)
    single, later = Owner(), Owner()
    assert not store.acquire("shared-queue", single, 30, queue_for=10).acquired
    assert store.acquire("shared-queue", later, 30, queue_for=10, limit=2).queued_behind, "one free, a place ahead"
    store.release("shared-queue", two.owner_token)
    assert store.acquire("shared-queue", single, 30, queue_for=10).acquired, "the first place, without a limit"
    assert store.acquire("shared-queue", later, 30, queue_for=10, limit=2).acquired


def test_any_release_wakes_the_places_the_name_has_room_for(unheard: persisters.Sqlite) -> None:
    store = unheard
    owners = _take(store, "wake", 3)
    first, second = Owner(), Owner()
    for owner in (first, second):
        assert not store.acquire("wake", owner, 30, queue_for=10, limit=3).acquired
    first_watch, second_watch = store.watch("wake", first.owner_token), store.watch("wake", second.owner_token)
    try:
        assert store.release("wake", owners[0].owner_token)
        assert first_watch.wait(0) and not second_watch.wait(0), "one free hold wakes the first place"
        assert store.release("wake", owners[1].owner_token)
        assert second_watch.wait(0), "two free: the second place too"
    finally:
        first_watch.close()
        second_watch.close()


def test_leaving_the_queue_wakes_the_place_that_moves_into_reach(unheard: persisters.Sqlite) -> None:
    store = unheard
    owners = _take(store, "leave", 2, limit=2)
    places = [Owner() for _ in range(3)]
    for owner in places:
        store.acquire("leave", owner, 30, queue_for=10, limit=2)
    store.release("leave", owners[0].owner_token)  # room for one: the first place's
    watch = store.watch("leave", places[1].owner_token)
    try:
        store.leave_queue("leave", places[2].owner_token)
        assert not watch.wait(0), "a place behind the reach leaving moves nobody in"
        store.leave_queue("leave", places[0].owner_token)
        assert watch.wait(0), "the first place gave up: the second may take the free hold"
    finally:
        watch.close()
    assert store.acquire("leave", places[1], 30, queue_for=10, limit=2).acquired


def test_the_async_face(tmp_path: Path) -> None:
    store = _store(tmp_path)

    async def main() -> None:
        owners = [Owner() for _ in range(3)]
        for owner in owners:
            assert (await store.aacquire("async", owner, 30, limit=3)).acquired
        refused = await store.aacquire("async", Owner(), 30, queue_for=5, limit=3)
        assert not refused.acquired and len(refused.holders) == 3
        assert [record.owner_token for record in await store.aholders("async")] == [o.owner_token for o in owners]
        assert await store.arenew("async", owners[1].owner_token, 60) is not None
        assert await store.arelease("async", owners[0].owner_token)
        assert len(await store.alist("async")) == 2 and (await store.aget("async")) is not None
        assert (await store.aforce_release("async")) is not None and await store.aholders("async") == []

    asyncio.run(main())


_CHILD = textwrap.dedent("""
    import sys
    from singleton_integrations import persisters
    from singleton_integrations._record import Owner
    store, owner = persisters.Sqlite(sys.argv[1]), Owner()
    assert store.acquire("woken", owner, 30, limit=3).acquired
    print("held", flush=True)
    sys.stdin.readline()
    store.release("woken", owner.owner_token)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_a_release_of_one_hold_in_another_process_wakes_a_waiter_here(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdin is not None and child.stdout.readline().strip() == "held"
        mine = _take(store, "woken", 2)
        watch = store.watch("woken")
        try:
            assert _subscribed(store, watch), "the listener subscribed"
            assert store.renew("woken", mine[0].owner_token, 30) is not None  # the listener's first look: all live
            assert not store.acquire("woken", Owner(), 30, limit=3).acquired
            child.stdin.write("go\n")
            child.stdin.flush()
            assert watch.wait(30), "woken by the other process's release of one hold, not by a timeout"
            assert store.acquire("woken", Owner(), 30, limit=3).acquired
        finally:
            watch.close()
    finally:
        child.communicate(timeout=30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_a_waiter_refused_by_its_smaller_n_is_not_woken_by_writes_that_free_nothing(tmp_path: Path) -> None:
    """A queued N = 1 waiter beside one live hold of three: the name has room, but not for it, and
    each of its refusals writes its place, so only a hold that goes may wake it (no wake-up loop)."""
    path = tmp_path / "locks.sqlite3"
    store, other = persisters.Sqlite(path), persisters.Sqlite(path, timeout=5)  # other: its own connection
    holder, = _take(other, "room", 1)
    waiter = Owner()
    assert not store.acquire("room", waiter, 30, queue_for=10).acquired
    watch = store.watch("room", waiter.owner_token)
    try:
        if _subscribed(store, watch):
            other.renew("room", holder.owner_token, 30)
            assert watch.wait(30), "the listener's first look at a name with room wakes its place once"
            assert not store.acquire("room", waiter, 30, queue_for=10).acquired
            other.renew("room", holder.owner_token, 30)
            assert not watch.wait(0.3), "writes that free no hold wake nobody"
            other.release("room", holder.owner_token)
            assert watch.wait(30), "the hold that went wakes it"
            assert store.acquire("room", waiter, 30, queue_for=10).acquired
    finally:
        watch.close()


_RACER = textwrap.dedent("""
    import asyncio, fcntl, sys, time
    from singleton_integrations import persisters
    from singleton_integrations._record import Owner

    path, counter, cycles, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store, owner = persisters.Sqlite(path), Owner()
    queue_for = 5.0 if mode == "queued" else None

    def count(delta):
        # The checker, outside the lock: live holders and the most seen at once, under flock.
        with open(counter, "r+") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            now, most = map(int, file.read().split())
            now += delta
            most = max(most, now)
            file.seek(0)
            file.truncate()
            file.write(f"{now} {most}")
            return now, most

    def take():
        if mode == "async":
            return asyncio.run(store.aacquire("race", owner, 30, limit=3)).acquired
        return store.acquire("race", owner, 30, queue_for=queue_for, limit=3).acquired

    for cycle in range(cycles):
        while not take():
            time.sleep(0.001)
        now, most = count(+1)
        print(now, flush=True)
        if cycle == 0:  # the first hold waits until 3 are held at once (bounded: a broken lock fails, not hangs)
            deadline = time.monotonic() + 60
            while count(0)[1] < 3 and time.monotonic() < deadline:
                time.sleep(0.002)
        count(-1)
        assert store.release("race", owner.owner_token)
    if queue_for is not None:
        store.leave_queue("race", owner.owner_token)
""")


@pytest.mark.parametrize("mode", ["polling", "queued", "async"])
def test_processes_racing_for_three_holds_never_exceed_three(tmp_path: Path, mode: str) -> None:
    path, counter = tmp_path / "locks.sqlite3", tmp_path / "counter"
    counter.write_text("0 0")
    persisters.Sqlite(path).get("race")  # the file and its schema, before the racers open it
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(path), str(counter), "15",
                                mode if i % 2 == 0 else "polling"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err for _out, err in outputs]
    seen = [int(line) for out, _err in outputs for line in out.split()]
    assert len(seen) == 8 * 15, "every racer took its holds"
    assert max(seen) == 3, "never more than 3 holders at once, and 3 reached"
    assert counter.read_text() == "0 3"
    assert persisters.Sqlite(path).holders("race") == []


def test_a_killed_holder_s_hold_frees_at_its_lease_end_and_the_others_stay(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path)
    kept = _take(store, "killed", 2)
    code = ("import sys, time; from singleton_integrations import persisters; from singleton_integrations._record import Owner;"
            "p = persisters.Sqlite(sys.argv[1]); r = p.acquire('killed', Owner(), 1.0, limit=3);"
            "print(r.record.expires_at.timestamp(), flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ends = float(child.stdout.readline())
    finally:
        child.kill()
        child.wait(timeout=30)
    if time.time() < ends:  # a very slow run could outlast the lease
        assert len(store.holders("killed")) == 3 and not store.acquire("killed", Owner(), 30, limit=3).acquired
    _until(ends)
    taken = store.acquire("killed", Owner(), 30, limit=3)
    assert taken.acquired and taken.expired is not None
    assert {record.owner_token for record in store.holders("killed")} >= {owner.owner_token for owner in kept}
