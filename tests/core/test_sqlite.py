"""SQLite specifics on real files: schema migration, retention, fencing after a purge, async on a busy file.

The minimum-hold rules shared with Memory are in test_memory.py; the lock rules
every store keeps are in the conformance suite.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from singleton_integrations import persisters
from singleton_integrations._errors import PersisterError
from singleton_integrations._record import Owner
from singleton_integrations.persisters.sqlite import SWEEP_LIMIT

OLD_SCHEMA = """CREATE TABLE singleton_locks (name TEXT PRIMARY KEY, owner_token TEXT, fencing_token INTEGER NOT NULL,
host TEXT NOT NULL, pid INTEGER NOT NULL, created_at REAL NOT NULL, expires_at REAL, metadata TEXT NOT NULL)"""


def _rows(path: Path) -> dict[str, tuple]:
    with sqlite3.connect(path) as db:
        return {row[0]: row for row in db.execute("SELECT * FROM singleton_locks")}


def _until(moment: float) -> None:
    while time.time() <= moment:
        time.sleep(max(moment - time.time(), 0.001))


def _subscribed(store: persisters.Sqlite, watch: persisters.ReleaseWatch) -> bool:
    """Wait until the file's listener watches it, and consume the wake-up it sends ``watch`` then.

    ``watch`` is the first of the file's hub, so registered before the listener started: it is
    woken once (a release may have been missed before). ``ready()`` sets ``subscribed`` before
    that wake-up, so it is the wake-up that is waited for. False where inotify is missing.
    """
    if not store._shared.hub.subscribed.wait(30):
        return False
    assert watch.wait(30), "the listener woke the watch registered before it started"
    return True


def _old_file(path: Path) -> None:
    """A file as version 0.2 wrote it: one free name (counter 7) and one held without expiry."""
    with sqlite3.connect(path) as db:
        db.execute(OLD_SCHEMA)
        db.execute("INSERT INTO singleton_locks VALUES ('was-free', NULL, 7, 'h', 1, 0, NULL, '{}')")
        db.execute("INSERT INTO singleton_locks VALUES ('still-held', 'tok', 3, 'h', 1, ?, NULL, ?)",
                   (time.time(), json.dumps({"by": "old"})))


def test_an_old_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _old_file(path)
    store = persisters.Sqlite(path)
    held = store.get("still-held")
    assert held is not None and held.metadata == {"by": "old"} and held.released_at is None
    taken = store.acquire("was-free", Owner(), 30, 5)
    assert taken.acquired and taken.record is not None and taken.record.fencing_token > 7
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(singleton_locks)")}
    assert {"released_at", "hold_until"} <= columns
    store.close()
    assert persisters.Sqlite(path).get("was-free") is not None, "a second open finds nothing to do"


def test_an_old_file_gains_the_waiter_queue_and_waiters_queue_in_it(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _old_file(path)
    store = persisters.Sqlite(path)
    first, second = Owner(), Owner()
    assert not store.acquire("still-held", first, 30, queue_for=6).acquired
    assert not store.acquire("still-held", second, 30, queue_for=6).acquired
    with sqlite3.connect(path) as db:
        places = db.execute("SELECT owner_token FROM singleton_waiters WHERE name = 'still-held' ORDER BY place")
        assert [row[0] for row in places] == [first.owner_token, second.owner_token]
    store.force_release("still-held")
    refused = store.acquire("still-held", second, 30, queue_for=6)
    assert not refused.acquired and refused.queued_behind and refused.retry_after is not None
    assert store.acquire("still-held", first, 30, queue_for=6).acquired
    store.close()


def test_the_sweep_drops_places_their_waiters_never_left(tmp_path: Path) -> None:
    store = persisters.Sqlite(tmp_path / "q.sqlite3", purge_after_seconds=3600)
    assert store.acquire("job", Owner(), 30).acquired
    killed, alive = Owner(), Owner()
    assert not store.acquire("job", killed, 30, queue_for=6).acquired
    assert not store.acquire("job", alive, 30, queue_for=6).acquired
    with sqlite3.connect(tmp_path / "q.sqlite3") as db:  # the killed waiter's place ended two minutes ago
        db.execute("UPDATE singleton_waiters SET ends = ? WHERE owner_token = ?", (time.time() - 120, killed.owner_token))
    store.purge()
    with sqlite3.connect(tmp_path / "q.sqlite3") as db:
        left = [row[0] for row in db.execute("SELECT owner_token FROM singleton_waiters")]
    assert left == [alive.owner_token]
    store.close()


def test_processes_opening_an_old_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _old_file(path)
    code = ("import sys; from singleton_integrations import persisters; from singleton_integrations._record import Owner;"
            "p = persisters.Sqlite(sys.argv[1]); r = p.acquire('n' + sys.argv[2], Owner(), 30);"
            "print(r.acquired)")
    children = [subprocess.Popen([sys.executable, "-c", code, str(path), str(i)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(6)]
    results = [child.communicate(timeout=60) for child in children]
    assert [out.strip() for out, _err in results] == ["True"] * 6, [err for _out, err in results]
    assert len(_rows(path)) == 8


def test_first_tokens_come_from_the_clock_and_rise_after_a_purge(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path, purge_after_seconds=0.05)
    before = int(time.time() * 1000)
    owner = Owner()
    first = store.acquire("recycled", owner, 30)
    assert first.record is not None and first.record.fencing_token >= before
    store.release("recycled", owner.owner_token)
    _until(time.time() + 0.06)
    assert store.purge() == 1 and "recycled" not in _rows(path), "its row is gone"
    again = store.acquire("recycled", Owner(), 30)
    assert again.record is not None and again.record.fencing_token > first.record.fencing_token


def test_sweeps_are_bounded_catch_up_and_spare_live_and_held_names(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path, purge_after_seconds=0.05)
    store.acquire("forever", Owner(), None)
    in_hold = Owner()
    store.acquire("in-hold", in_hold, 30, 60)
    store.release("in-hold", in_hold.owner_token)
    with sqlite3.connect(path) as db:  # a backlog: free for an hour
        db.executemany("INSERT INTO singleton_locks VALUES (?, NULL, 1, 'h', 1, 0, ?, '{}', ?, NULL)",
                       [(f"idle-{i}", time.time() - 3600, time.time() - 3600) for i in range(SWEEP_LIMIT * 2 + 5)])
    store._shared.next_sweep = 0.0
    store.acquire("trigger-1", Owner(), 30)
    assert len(_rows(path)) == SWEEP_LIMIT + 5 + 3, "one sweep removes at most SWEEP_LIMIT rows"
    store.acquire("trigger-2", Owner(), 30)
    store.acquire("trigger-3", Owner(), 30)
    assert set(_rows(path)) == {"forever", "in-hold", "trigger-1", "trigger-2", "trigger-3"}
    assert store.get("in-hold") is not None and store.get("forever") is not None


def test_purge_none_keeps_every_row(tmp_path: Path) -> None:
    store = persisters.Sqlite(tmp_path / "locks.sqlite3", purge_after_seconds=None)
    owner = Owner()
    store.acquire("kept", owner, 30)
    store.release("kept", owner.owner_token)
    assert store.purge() == 0 and "kept" in _rows(tmp_path / "locks.sqlite3")


def test_url_options(tmp_path: Path) -> None:
    base = f"sqlite:///{tmp_path / 'x.sqlite3'}"
    assert persisters.from_url(base).purge_after_seconds == persisters.DEFAULT_PURGE_AFTER_SECONDS
    assert persisters.from_url(f"{base}?purge_after_seconds=none").purge_after_seconds is None
    store = persisters.from_url(f"{base}?purge_after_seconds=3600&timeout=2")
    assert store.purge_after_seconds == 3600 and store.timeout == 2 and store.call_timeout == 2
    assert persisters.from_url(f"{base}?purge_after_seconds=3600", purge_after_seconds=None).purge_after_seconds is None
    for bad in (f"{base}?nope=1", f"{base}?timeout=abc", f"{base}?purge_after_seconds=-5"):
        with pytest.raises(ValueError):
            persisters.from_url(bad)


@pytest.mark.parametrize("option", ["timeout", "purge_after_seconds"])
@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), True, "5", [5]])
def test_a_bad_number_raises_one_error_type(tmp_path: Path, option: str, bad: object) -> None:
    """Whatever is wrong with a number, its type included, the error is a ValueError, as on every store."""
    with pytest.raises(ValueError, match=option):
        persisters.Sqlite(tmp_path / "x.sqlite3", **{option: bad})


def test_a_prefix_that_is_not_text_is_refused_before_any_query(tmp_path: Path) -> None:
    store = persisters.Sqlite(tmp_path / "locks.sqlite3")
    for bad in (42, None, b"job"):
        with pytest.raises(TypeError, match="prefix must be a str"):
            store.list(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="prefix must be a str"):
            asyncio.run(store.alist(bad))  # type: ignore[arg-type]


def test_a_hold_refuses_other_processes_until_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path)
    owner = Owner(metadata={"deployment": "a"})
    taken = store.acquire("slot", owner, 30, 1.0)
    assert taken.record is not None and taken.record.hold_until is not None and store.release("slot",
                                                                                                owner.owner_token)
    # A child that takes the name lets it go again: an early child slow enough to start after the
    # hold ended takes it, and would otherwise hold it for 30 s against the late one.
    code = ("import sys; from singleton_integrations import persisters; from singleton_integrations._record import Owner;"
            "p = persisters.Sqlite(sys.argv[1]); o = Owner(); r = p.acquire('slot', o, 30);"
            "print(r.acquired, r.record.released if r.record else None, r.record.fencing_token if r.record else 0);"
            "r.acquired and p.release('slot', o.owner_token)")
    early = subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True, timeout=60)
    if time.time() < taken.record.hold_until.timestamp():  # a very slow start could outlast the hold
        assert early.stdout.split()[:2] == ["False", "True"], early.stderr
    _until(taken.record.hold_until.timestamp())
    late = subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True, timeout=60)
    acquired, _released, token = late.stdout.split()
    assert acquired == "True" and int(token) > taken.record.fencing_token


def test_async_calls_retry_a_busy_file_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path)
    store.get("warm-up")  # creates the file and schema

    async def main() -> None:
        await store.aget("warm-up")  # opens the loop's connection
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process mid-write
        attempt = asyncio.ensure_future(store.aacquire("busy", Owner(), 30))
        ticks = 0
        for _ in range(20):  # the loop keeps running other work while the acquire waits
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20 and not attempt.done(), "the attempt waits for the writer, asleep on the loop"
        blocker.execute("COMMIT")
        assert (await attempt).acquired
        blocker.close()

    asyncio.run(main())


def test_a_file_busy_beyond_the_timeout_fails_the_call(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path, timeout=0.2)
    store.get("warm-up")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(PersisterError, match="locked"):
            store.acquire("busy", Owner(), 30)
        with pytest.raises(PersisterError, match="locked"):
            asyncio.run(store.aacquire("busy", Owner(), 30))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_a_call_reentered_mid_transaction_uses_its_own_connection(tmp_path: Path) -> None:
    """What a SIGTERM handler's release does when the signal lands inside another call's transaction."""
    store = persisters.Sqlite(tmp_path / "locks.sqlite3")
    owner = Owner()
    store.acquire("reentered", owner, 30)
    connection = store._connect()
    with store._shared.guard:
        connection.execute("BEGIN")
        try:
            assert store.release("reentered", owner.owner_token)
        finally:
            connection.execute("ROLLBACK")
    assert store.get("reentered") is None


def test_objects_on_one_file_share_a_connection_and_wake_each_others_waiters(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'locks.sqlite3'}"
    first, second = persisters.from_url(url), persisters.from_url(url)
    owner = Owner()
    assert first.acquire("shared", owner, 30).acquired
    assert first._connect() is second._connect(), "one connection per file and process, not per object"
    assert persisters.Sqlite(tmp_path / "locks.sqlite3", timeout=3)._shared.hub is first._shared.hub
    watch = second.watch("shared")
    try:
        assert first.release("shared", owner.owner_token)
        assert watch.wait(0), "a release through one object wakes a waiter on the other"
    finally:
        watch.close()


def test_a_cancelled_async_call_holds_nothing_and_leaves_no_transaction_open(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path)
    store.get("warm-up")

    async def main() -> None:
        await store.aget("warm-up")
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        attempt = asyncio.ensure_future(store.aacquire("cancelled", Owner(), 30))
        await asyncio.sleep(0.02)  # it is asleep between retries
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        blocker.execute("COMMIT")
        blocker.close()
        assert await store.aget("cancelled") is None, "the cancelled acquire took nothing"
        assert (await store.aacquire("cancelled", Owner(), 30)).acquired, "and left the connection usable"

    asyncio.run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_a_release_in_another_process_wakes_a_waiter_here(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store = persisters.Sqlite(path)
    code = ("import sys; from singleton_integrations import persisters; from singleton_integrations._record import Owner;"
            "p = persisters.Sqlite(sys.argv[1]); o = Owner(); assert p.acquire('woken', o, 30).acquired;"
            "print('held', flush=True); sys.stdin.readline(); p.release('woken', o.owner_token); print('released')")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None and holder.stdout.readline().strip() == "held"
        watch = store.watch("woken")
        try:
            assert _subscribed(store, watch), "the listener subscribed"
            assert not store.acquire("woken", Owner(), 30).acquired
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert watch.wait(30), "woken by the other process's release, not by a timeout"
            assert store.acquire("woken", Owner(), 30).acquired
        finally:
            watch.close()
    finally:
        holder.communicate(timeout=30)


def test_a_renewal_elsewhere_wakes_nobody(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    store, other = persisters.Sqlite(path), persisters.Sqlite(path, timeout=5)  # other: its own connection
    owner = Owner()
    assert other.acquire("renewed", owner, 30).acquired
    watch = store.watch("renewed")
    try:
        if _subscribed(store, watch):
            other.renew("renewed", owner.owner_token, 30)
            assert not watch.wait(0.3), "a write that frees nothing wakes no waiter"
    finally:
        watch.close()
