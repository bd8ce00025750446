"""Uncontended acquire+release cycles per second against the floor, and hand-over latency.

The floor is the fewest round trips that do the job on the same server (Redis:
SET NX PX + a compare-and-delete script; MongoDB: insert_one + an owner-checked
delete_one; PostgreSQL: INSERT ... ON CONFLICT DO NOTHING + an owner-checked
DELETE). Every implementation runs in the same process against the same
servers, interleaved round-robin so drift hits all alike; the figure is the
median of the repetitions. Writes ``benchmarks/RESULTS.md`` and prints it.

    python benchmarks/run.py                 # every backend, about three minutes
    python benchmarks/run.py --quick         # a rough pass in well under a minute
    python benchmarks/run.py --backends redis,postgres
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from singleton_integrations import Singleton, persisters  # noqa: E402

BACKENDS = ("redis", "postgres", "mongodb", "sqlite", "mysql")
TTL_SECONDS = 60
RUN_ID = secrets.token_hex(4)

# Deletes the key only if it still holds our token: the one-round-trip owner-checked release.
COMPARE_AND_DELETE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


@dataclass
class Case:
    backend: str
    label: str
    cycle: Callable[[], None]
    floor: bool = False
    note: str = ""
    close: Callable[[], None] = lambda: None
    rates: list[float] = field(default_factory=list)
    cpu_per_cycle: list[float] = field(default_factory=list)  # this process's CPU seconds per cycle

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


class Unavailable(Exception):
    """A backend or library this run cannot use; the table says why."""


# -- store URLs -------------------------------------------------------------------


def _server_url(kind: str, env: str, default: str | None) -> str:
    """The URL the test fixtures use, so the benchmark hits the same servers."""
    if os.environ.get(env):
        return os.environ[env]
    try:
        import importlib

        return importlib.import_module(f"tests.servers.{kind}_server").url()
    except BaseException as error:  # pytest.skip raises a BaseException outside pytest
        if default is not None:
            return default
        raise Unavailable(f"no {kind} server: {type(error).__name__}: {error}") from None


def redis_url() -> str:
    return _server_url("redis", "SINGLETON_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def postgres_url() -> str:
    return _server_url("postgres", "SINGLETON_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def mongodb_url() -> str:
    if os.environ.get("MONGODB_URL"):
        return os.environ["MONGODB_URL"]
    return _server_url("mongodb", "SINGLETON_TEST_MONGODB_URL", None)


def mysql_url() -> str:
    return _server_url("mysql", "SINGLETON_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")


def _name(kind: str) -> str:
    return f"bench-{RUN_ID}-{kind}"


# -- cases ----------------------------------------------------------------------------


def _ours(backend: str, make: Callable[[], persisters.Persister], label: str, note: str) -> Case:
    try:
        store = make()
    except (ImportError, AttributeError) as error:
        raise Unavailable(f"persister not available: {error}") from None
    lock = Singleton(_name(f"ours-{backend}"), store, lock_expire_seconds=TTL_SECONDS)

    def cycle() -> None:
        if not lock.lock():
            raise RuntimeError(f"{label}: uncontended lock() returned False")
        lock.release()

    return Case(backend, label, cycle, note=note, close=store.close)


def redis_cases() -> list[Callable[[], Case]]:
    def floor() -> Case:
        import redis

        client = redis.Redis.from_url(redis_url(), socket_timeout=5)
        release = client.register_script(COMPARE_AND_DELETE)
        key, token = _name("floor"), secrets.token_hex(16)

        def cycle() -> None:
            if not client.set(key, token, nx=True, px=TTL_SECONDS * 1000):
                raise RuntimeError("floor: SET NX failed")
            release(keys=[key], args=[token])

        return Case("redis", "floor: SET NX PX + compare-and-delete", cycle, floor=True, close=client.close)

    def ours() -> Case:
        url = redis_url()
        return _ours("redis", lambda: persisters.Redis(url), "singleton-integrations Singleton",
                     "also mints a fencing token and stores holder metadata")

    def redis_py() -> Case:
        import redis

        client = redis.Redis.from_url(redis_url(), socket_timeout=5)
        lock = client.lock(_name("redis-py"), timeout=TTL_SECONDS)

        def cycle() -> None:
            if not lock.acquire(blocking=False):
                raise RuntimeError("redis-py Lock: acquire failed")
            lock.release()

        return Case("redis", "redis-py Lock", cycle, close=client.close)

    def python_redis_lock() -> Case:
        try:
            import redis_lock
        except ImportError as error:
            raise Unavailable(f"pip install python-redis-lock ({error})") from None
        import redis

        client = redis.Redis.from_url(redis_url(), socket_timeout=5)
        name = _name("python-redis-lock")

        def cycle() -> None:
            lock = redis_lock.Lock(client, name, expire=TTL_SECONDS)
            if not lock.acquire(blocking=False):
                raise RuntimeError("python-redis-lock: acquire failed")
            lock.release()

        return Case("redis", "python-redis-lock", cycle, close=client.close,
                    note="a new Lock per cycle (its id is per instance)")

    def pottery_redlock() -> Case:
        try:
            from pottery import Redlock
        except ImportError as error:
            raise Unavailable(f"pip install pottery ({error})") from None
        import redis

        client = redis.Redis.from_url(redis_url(), socket_timeout=5)
        lock = Redlock(key=_name("pottery"), masters={client}, auto_release_time=TTL_SECONDS)

        def cycle() -> None:
            if not lock.acquire(blocking=False):
                raise RuntimeError("pottery Redlock: acquire failed")
            lock.release()

        return Case("redis", "pottery Redlock (one master)", cycle, close=client.close)

    return [floor, ours, redis_py, python_redis_lock, pottery_redlock]


def _postgres_floor(label: str, table_kind: str, delete_suffix: str = "", *, floor: bool = False,
                    note: str = "") -> Case:
    """INSERT ... ON CONFLICT DO NOTHING + an owner-checked DELETE on one reused connection:
    the fewest round trips that take and give back a name on PostgreSQL."""
    import psycopg

    connection = psycopg.connect(postgres_url(), autocommit=True, connect_timeout=5)
    table = f"bench_floor_{table_kind.lower() or 'logged'}_{secrets.token_hex(3)}_{RUN_ID}"
    connection.execute(
        f"CREATE {table_kind} TABLE IF NOT EXISTS {table} (name TEXT PRIMARY KEY, owner_token TEXT NOT NULL, "
        "expires_at TIMESTAMPTZ NOT NULL)"
    )
    name, token = _name(table), secrets.token_hex(16)
    insert = (f"INSERT INTO {table} (name, owner_token, expires_at) "
              f"VALUES (%s, %s, now() + interval '{TTL_SECONDS} seconds') ON CONFLICT DO NOTHING")
    delete = f"DELETE FROM {table} WHERE name = %s AND owner_token = %s{delete_suffix}"

    def cycle() -> None:
        if connection.execute(insert, (name, token)).rowcount != 1:
            raise RuntimeError("floor: INSERT ... ON CONFLICT inserted nothing")
        connection.execute(delete, (name, token))

    def close() -> None:
        connection.execute(f"DROP TABLE IF EXISTS {table}")
        connection.close()

    return Case("postgres", label, cycle, floor=floor, close=close, note=note)


def postgres_cases() -> list[Callable[[], Case]]:
    def floor() -> Case:
        return _postgres_floor("INSERT ON CONFLICT + owner-checked DELETE, UNLOGGED table", "UNLOGGED",
                               note="not crash-safe, so not a fair floor for a lock store; for scale only")

    def floor_logged() -> Case:
        # The floor: a normal (WAL-logged, crash-safe) table, as a lock store must use.
        return _postgres_floor("floor: INSERT ON CONFLICT + owner-checked DELETE", "", floor=True,
                               note="crash-safe (WAL-logged) table, reused connection")

    def floor_unflushed_delete() -> Case:
        # As ours commits a release by default: without waiting for the WAL flush (set_config inside
        # the statement, so still one round trip).
        return _postgres_floor("the floor, its DELETE committed without waiting for the WAL flush", "",
                               " AND set_config('synchronous_commit', 'off', true) IS NOT NULL",
                               note="what ours does by default on release: the like-for-like comparison")

    def ours() -> Case:
        url = postgres_url()
        return _ours("postgres", lambda: persisters.Postgres(url), "singleton-integrations Singleton",
                     "fencing token + holder metadata; a release of a lease does not wait for the WAL flush")

    def ours_durable() -> Case:
        url = postgres_url()
        return _ours("postgres", lambda: persisters.Postgres(url, durable_release=True),
                     "singleton-integrations Singleton, durable_release=True",
                     "every release waits for the WAL flush, as the floor's DELETE does")

    return [floor_logged, ours, ours_durable, floor_unflushed_delete, floor]


def mongodb_cases() -> list[Callable[[], Case]]:
    def _collection(name: str):  # type: ignore[no-untyped-def]
        import pymongo

        client = pymongo.MongoClient(mongodb_url(), serverSelectionTimeoutMS=5000, socketTimeoutMS=5000)
        database = client.get_default_database("singleton_bench")
        return client, database[f"{name}_{RUN_ID}"]

    def floor() -> Case:
        client, collection = _collection("bench_floor")
        name, token = _name("floor"), secrets.token_hex(16)

        def cycle() -> None:
            collection.insert_one({"_id": name, "owner_token": token,
                                   "expires_at": datetime.now(timezone.utc) + timedelta(seconds=TTL_SECONDS)})
            if collection.delete_one({"_id": name, "owner_token": token}).deleted_count != 1:
                raise RuntimeError("floor: owner-checked delete removed nothing")

        def close() -> None:
            collection.drop()
            client.close()

        return Case("mongodb", "floor: insert_one + owner-checked delete_one", cycle, floor=True, close=close)

    def ours() -> Case:
        url = mongodb_url()
        return _ours("mongodb", lambda: persisters.MongoDb(url), "singleton-integrations Singleton",
                     "fencing token + holder metadata")

    def seed(reconnect: bool) -> Callable[[], Case]:
        def make() -> Case:
            import pymongo

            url = mongodb_url()
            client, collection = _collection("bench_seed")
            name = _name("seed")

            def cycle() -> None:
                # The seed: delete expired locks by the client's clock, insert, release by name.
                target = collection
                local = None
                if reconnect:
                    local = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, socketTimeoutMS=5000)
                    target = local.get_default_database("singleton_bench")[collection.name]
                now = datetime.now(timezone.utc)
                target.delete_many({"_id": name, "expires_at": {"$lt": now}})
                target.insert_one({"_id": name, "created_at": now, "expires_at": now + timedelta(seconds=TTL_SECONDS)})
                if reconnect:
                    local.close()
                    local = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, socketTimeoutMS=5000)
                    target = local.get_default_database("singleton_bench")[collection.name]
                target.delete_one({"_id": name})
                if local is not None:
                    local.close()

            def close() -> None:
                collection.drop()
                client.close()

            label = "seed protocol, new connection per call" if reconnect else "seed protocol, pooled"
            note = "as singleton-process 0.5.1 does" if reconnect else "the seed's queries on a reused client"
            return Case("mongodb", label, cycle, close=close, note=note)

        return make

    return [floor, ours, seed(False), seed(True)]


def sqlite_cases() -> list[Callable[[], Case]]:
    def ours() -> Case:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"singleton-bench-{RUN_ID}.sqlite3"

        def make() -> persisters.Persister:
            return persisters.Sqlite(path)

        case = _ours("sqlite", make, "singleton-integrations Singleton", "WAL, one file per host; no floor")
        inner = case.close

        def close() -> None:
            inner()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

        case.close = close
        return case

    return [ours]


MYSQL_TABLE = f"bench_{RUN_ID}"


def mysql_connect(url: str) -> Any:
    import pymysql

    parts = urlsplit(url)
    connection = pymysql.connect(
        host=parts.hostname or "127.0.0.1", port=parts.port or 3306, user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""), database=unquote(parts.path.lstrip("/")), autocommit=True,
        connect_timeout=5, read_timeout=10, write_timeout=10, charset="utf8mb4",
    )
    with connection.cursor() as cursor:  # as the persister's sessions run
        cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    return connection


def mysql_server_version() -> str:
    with contextlib.closing(mysql_connect(mysql_url())) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT VERSION()")
        version = str(cursor.fetchone()[0])
    flavour = "MariaDB" if "mariadb" in version.lower() else "MySQL"
    return f"{flavour} {version.split('-')[0]}"


def mysql_drop(url: str, *tables: str) -> None:
    with contextlib.closing(mysql_connect(url)) as connection, connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"DROP TABLE IF EXISTS `{table}`")


def mysql_cases() -> list[Callable[[], Case]]:
    """The floor, ours and GET_LOCK (also ``benchmarks/mysql_bench.py``'s cases)."""

    def floor() -> Case:
        url = mysql_url()
        connection = mysql_connect(url)
        table = f"bench_floor_{RUN_ID}"
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE IF NOT EXISTS `{table}` (name VARBINARY(1020) NOT NULL PRIMARY KEY, "
                           "owner_token VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, "
                           "expires_at DATETIME(6) NOT NULL) ENGINE=InnoDB")
        name, token = _name("floor").encode(), secrets.token_hex(16)
        # Takes the row if it is missing or expired: owner_token first (judged on the old
        # expires_at), then expires_at only if the row is now ours.
        insert = (f"INSERT INTO `{table}` (name, owner_token, expires_at) "
                  f"VALUES (%(name)s, %(token)s, UTC_TIMESTAMP(6) + INTERVAL {TTL_SECONDS} SECOND) "
                  "ON DUPLICATE KEY UPDATE owner_token = IF(expires_at <= UTC_TIMESTAMP(6), %(token)s, owner_token), "
                  f"expires_at = IF(owner_token = %(token)s, UTC_TIMESTAMP(6) + INTERVAL {TTL_SECONDS} SECOND, "
                  "expires_at)")
        delete = f"DELETE FROM `{table}` WHERE name = %(name)s AND owner_token = %(token)s"
        cursor = connection.cursor()

        def cycle() -> None:
            if cursor.execute(insert, {"name": name, "token": token}) == 0:
                raise RuntimeError("floor: INSERT ... ON DUPLICATE KEY UPDATE took nothing")
            if cursor.execute(delete, {"name": name, "token": token}) != 1:
                raise RuntimeError("floor: the owner-checked DELETE removed nothing")

        def close() -> None:
            cursor.close()
            connection.close()
            mysql_drop(url, table)

        return Case("mysql", "floor: INSERT ON DUPLICATE KEY UPDATE + owner-checked DELETE", cycle, floor=True,
                    close=close, note="autocommit, one reused PyMySQL connection, InnoDB")

    def ours() -> Case:
        url = mysql_url()
        case = _ours("mysql", lambda: persisters.MySql(url, table=MYSQL_TABLE), "singleton-integrations Singleton",
                         "fencing token, holder metadata, server-clock lease")
        inner = case.close

        def close() -> None:
            inner()
            mysql_drop(url, MYSQL_TABLE, f"{MYSQL_TABLE}_waiters", f"{MYSQL_TABLE}_holds")

        case.close = close
        return case

    def get_lock() -> Case:
        connection = mysql_connect(mysql_url())
        name = _name("get-lock")
        cursor = connection.cursor()

        def cycle() -> None:
            cursor.execute("SELECT GET_LOCK(%s, 0)", (name,))
            if cursor.fetchone()[0] != 1:
                raise RuntimeError("GET_LOCK: not granted")
            cursor.execute("SELECT RELEASE_LOCK(%s)", (name,))
            cursor.fetchone()

        def close() -> None:
            cursor.close()
            connection.close()

        return Case("mysql", "GET_LOCK + RELEASE_LOCK", cycle, close=close,
                    note="session lock: no lease, no holder record, nothing written")

    return [floor, ours, get_lock]


CASES = {"redis": redis_cases, "postgres": postgres_cases, "mongodb": mongodb_cases, "sqlite": sqlite_cases,
         "mysql": mysql_cases}


# -- throughput -------------------------------------------------------------------------


def run_for(case: Case, seconds: float) -> float:
    """Cycles per second over about ``seconds``; also records the client's CPU time per cycle."""
    count = 0
    start, cpu = time.perf_counter(), time.process_time()
    deadline = start + seconds
    while True:
        for _ in range(10):
            case.cycle()
        count += 10
        now = time.perf_counter()
        if now >= deadline:
            case.cpu_per_cycle.append((time.process_time() - cpu) / count)
            return count / (now - start)


def throughput(cases: list[Case], repetitions: int, seconds: float, warmup: float) -> None:
    for case in cases:
        run_for(case, warmup)
    for repetition in range(repetitions):
        order = cases if repetition % 2 == 0 else list(reversed(cases))
        for case in order:
            case.rates.append(run_for(case, seconds))
        print(f"  repetition {repetition + 1}/{repetitions} done", file=sys.stderr)


# -- hand-over latency ----------------------------------------------------------------------


def handover(make: Callable[[], persisters.Persister], count: int, backend: str) -> list[float]:
    """Seconds from the holder's release() call to the waiter's lock(wait=...) returning."""
    name = _name(f"handover-{backend}")
    holder_store, waiter_store = make(), make()
    holder = Singleton(name, holder_store, lock_expire_seconds=TTL_SECONDS)
    waiter = Singleton(name, waiter_store, lock_expire_seconds=TTL_SECONDS)
    latencies: list[float] = []
    start_waiting, waiter_done = threading.Event(), threading.Event()
    released_at = [0.0]
    failure: list[BaseException] = []

    def wait_loop() -> None:
        try:
            for _ in range(count):
                start_waiting.wait()
                start_waiting.clear()
                if not waiter.lock(wait=30):
                    raise RuntimeError("the waiter timed out")
                latencies.append(time.perf_counter() - released_at[0])
                waiter.release()
                waiter_done.set()
        except BaseException as error:  # reported by the main thread
            failure.append(error)
            waiter_done.set()

    thread = threading.Thread(target=wait_loop, daemon=True)
    thread.start()
    try:
        for _ in range(count):
            if not holder.lock(wait=30):
                raise RuntimeError("the holder could not take the lock")
            start_waiting.set()
            # Let the waiter fail its first attempt and block; a random pause so a polling
            # store's poll phase is not locked to the release.
            time.sleep(random.uniform(0.02, 0.08))
            released_at[0] = time.perf_counter()
            holder.release()
            if not waiter_done.wait(60) or failure:
                raise RuntimeError(f"hand-over failed: {failure[0] if failure else 'timeout'}")
            waiter_done.clear()
    finally:
        thread.join(5)
        holder_store.close()
        waiter_store.close()
    return latencies


def paired_ratio(case: Case, floor: Case) -> float:
    """Median of the per-repetition ratios: each pair ran back to back, so load drift cancels."""
    pairs = [mine / base for mine, base in zip(case.rates, floor.rates, strict=False) if base > 0]
    return statistics.median(pairs) if pairs else 0.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def store_factories() -> dict[str, Callable[[], Callable[[], persisters.Persister]]]:
    def sqlite() -> Callable[[], persisters.Persister]:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"singleton-bench-handover-{RUN_ID}.sqlite3"
        return lambda: persisters.Sqlite(path)

    return {
        "redis": lambda: (lambda url: lambda: persisters.Redis(url))(redis_url()),
        "postgres": lambda: (lambda url: lambda: persisters.Postgres(url))(postgres_url()),
        "mongodb": lambda: (lambda url: lambda: persisters.MongoDb(url))(mongodb_url()),
        "sqlite": sqlite,
        "mysql": lambda: (lambda url: lambda: persisters.MySql(url, table="singleton_bench_handover"))(mysql_url()),
    }


# -- report ------------------------------------------------------------------------------------


def server_versions(backends: list[str]) -> list[str]:
    found = []
    for backend in backends:
        try:
            if backend == "redis":
                import redis

                found.append(f"Redis {redis.Redis.from_url(redis_url()).info('server')['redis_version']}")
            elif backend == "postgres":
                import psycopg

                with psycopg.connect(postgres_url(), connect_timeout=5) as connection:
                    found.append(f"PostgreSQL {connection.execute('SHOW server_version').fetchone()[0]}")
            elif backend == "mongodb":
                import pymongo

                with pymongo.MongoClient(mongodb_url(), serverSelectionTimeoutMS=5000) as client:
                    info = client.server_info()
                    flavour = "SecantusDB" if "secantus" in str(info).lower() else "mongod"
                    found.append(f"MongoDB wire ({flavour}) {info.get('version', '?')}")
            elif backend == "mysql":
                found.append(mysql_server_version())
            elif backend == "sqlite":
                import sqlite3

                found.append(f"SQLite {sqlite3.sqlite_version}")
        except Exception as error:
            found.append(f"{backend}: version unknown ({type(error).__name__})")
    return found


def render(cases: list[Case], skipped: list[tuple[str, str, str]], latencies: dict[str, list[float] | str],
           args: argparse.Namespace, backends: list[str], elapsed: float) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {platform.node()} "
        f"({os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.machine()}); "
        f"servers on loopback: {', '.join(server_versions(backends))}.",
        f"Uncontended acquire+release cycles per second, median of {args.repetitions} runs of {args.seconds:g} s "
        f"after a {args.warmup:g} s warm-up, cases interleaved (order reversed every other round); the ratio to the "
        f"floor on the same server is the median of the per-round ratios, so load drift on a shared machine cancels. "
        f"Client CPU is this benchmark process's CPU time per cycle (library and driver overhead; the rest is "
        f"round trips and the server). The machine is shared, so absolute rates vary between runs; the ratios "
        f"and CPU figures are the stable part. Total run time {elapsed:.0f} s.",
        "",
        "| Backend | Implementation | cycles/s | ratio to floor | runs (min-max) | client CPU µs/cycle | notes |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for backend in backends:
        group = [c for c in cases if c.backend == backend]
        floor = next((c for c in group if c.floor), None)
        for case in group:
            ratio = f"{paired_ratio(case, floor):.2f}" if floor and floor.rate else "n/a"
            spread = f"{min(case.rates):.0f}-{max(case.rates):.0f}" if case.rates else ""
            label = f"**{case.label}**" if case.label.startswith("singleton-integrations") else case.label
            cpu = f"{statistics.median(case.cpu_per_cycle) * 1e6:.0f}" if case.cpu_per_cycle else ""
            lines.append(f"| {backend} | {label} | {case.rate:.0f} | {ratio} | {spread} | {cpu} | {case.note} |")
        for skipped_backend, label, why in skipped:
            if skipped_backend == backend:
                lines.append(f"| {backend} | {label} | not measured | | | | {why} |")
    lines += [
        "",
        "Hand-over latency: the holder calls `release()`; a waiter blocked in `lock(wait=30)` (another thread, its own",
        "persister and connections) returns. Measured from just before `release()` to the waiter's return.",
        "",
        "| Backend | hand-overs | median ms | p99 ms | max ms | wake-up |",
        "|---|---:|---:|---:|---:|---|",
    ]
    wakeups = {"redis": "pub/sub notification", "postgres": "LISTEN/NOTIFY", "mongodb": "change stream or poll",
               "sqlite": "poll (50 ms)",
               "mysql": "in-process release hub, else poll (250 ms)"}
    for backend, values in latencies.items():
        if isinstance(values, str):
            lines.append(f"| {backend} | not measured | | | | {values} |")
            continue
        lines.append(
            f"| {backend} | {len(values)} | {statistics.median(values) * 1e3:.2f} | {percentile(values, 0.99) * 1e3:.2f} "
            f"| {max(values) * 1e3:.2f} | {wakeups.get(backend, '')} |"
        )
    quick = " --quick" if args.quick else ""
    lines += [
        "",
        "Targets (issue 2): Redis >= 0.95 of the floor, MongoDB and PostgreSQL >= 0.9; hand-over median <= 5 ms on Redis.",
        "",
        f"Rerun: `nox -s benchmarks` or `python benchmarks/run.py{quick} --backends {','.join(backends)}` "
        "(needs the `redis`, `mongodb`, `postgres` extras plus `python-redis-lock` and `pottery`).",
        "",
    ]
    return "\n".join(lines)


def _label(factory: Callable[[], Case]) -> str:
    name = factory.__name__
    return "**singleton-integrations Singleton**" if name == "ours" else name.replace("_", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="Markdown file to write")
    parser.add_argument("--handovers", type=int, default=None, help="hand-overs per backend (default 200, quick 50)")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    args.repetitions, args.seconds, args.warmup = (3, 0.3, 0.2) if args.quick else (15, 0.4, 0.5)
    count = args.handovers or (50 if args.quick else 200)

    started = time.monotonic()
    cases: list[Case] = []
    skipped: list[tuple[str, str, str]] = []
    for backend in backends:
        for factory in CASES[backend]():
            try:
                case = factory()
                case.cycle()  # fail early and visibly, not in the middle of the timing
                cases.append(case)
            except Unavailable as error:
                skipped.append((backend, _label(factory), str(error)))
            except Exception as error:
                skipped.append((backend, _label(factory), f"{type(error).__name__}: {error}"))
    print(f"throughput: {len(cases)} cases, {args.repetitions} x {args.seconds:g} s", file=sys.stderr)
    try:
        throughput(cases, args.repetitions, args.seconds, args.warmup)
    finally:
        for case in cases:
            with contextlib.suppress(Exception):
                case.close()

    latencies: dict[str, list[float] | str] = {}
    factories = store_factories()
    for backend in backends:
        print(f"hand-over latency: {backend}, {count} hand-overs", file=sys.stderr)
        try:
            latencies[backend] = handover(factories[backend](), count, backend)
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt):
                raise
            latencies[backend] = f"{type(error).__name__}: {error}"
    text = render(cases, skipped, latencies, args, backends, time.monotonic() - started)
    Path(args.output).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
