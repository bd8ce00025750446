"""``limit=N`` against the single lock, on every store, in one run.

Two measurements, all interleaved round-robin in the same process so load drift
hits every case alike:

* **Uncontended cycles** (``lock()`` + ``release()`` on one object): the single
  lock (``limit=1``), ``limit=10`` with no other hold, ``limit=10`` with 5 other
  holds live (the step reads them), and a full set's refusal (``limit=10`` with
  10 holds live: one ``lock()`` that returns False, one round trip). The
  target: the ``limit=10`` cycle costs at most 1.3 times the ``limit=1`` cycle.
* **Hand-overs**: P processes (16 by default) compete for one name with
  ``limit=4`` for D seconds, each holding ~1 ms and competing again. Reported:
  acquisitions per second, fairness (fewest acquisitions / most), and the most
  holds seen at once, from the processes' own timestamps (must be at most 4).

    python benchmarks/limits.py                     # every store, about 2 minutes
    python benchmarks/limits.py --quick --stores redis,sqlite --output -
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import contention  # noqa: E402

from singleton_integrations import Singleton, persisters  # noqa: E402

STORES = ("redis", "postgres", "mongodb", "sqlite", "mysql", "memory")
PROCESS_STORES = ("redis", "postgres", "mongodb", "sqlite", "mysql")
LIMIT = 10
HANDOVER_LIMIT = 4
TTL_SECONDS = 60


@dataclass
class Case:
    store: str
    label: str
    cycle: Callable[[], None]
    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def _cases(store: str, persister: persisters.Persister) -> list[Case]:
    name = f"bench-{contention.RUN_ID}-limits-{store}"

    def cycling(lock: Singleton, label: str) -> Case:
        def cycle() -> None:
            if not lock.lock():
                raise RuntimeError(f"{store} {label}: an uncontended lock() returned False")
            lock.release()

        return Case(store, label, cycle)

    cases = [
        cycling(Singleton(f"{name}-one", persister, lock_expire_seconds=TTL_SECONDS), "limit=1"),
        cycling(Singleton(f"{name}-ten", persister, lock_expire_seconds=TTL_SECONDS, limit=LIMIT), "limit=10"),
    ]
    half = [Singleton(f"{name}-half", persister, lock_expire_seconds=3600, limit=LIMIT) for _ in range(5)]
    if not all(lock.lock() for lock in half):  # live holds the next case's attempts count
        raise RuntimeError(f"{store}: could not take 5 holds of a fresh name")
    cases.append(cycling(Singleton(f"{name}-half", persister, lock_expire_seconds=TTL_SECONDS, limit=LIMIT),
                         "limit=10, 5 held"))
    held = [Singleton(f"{name}-full", persister, lock_expire_seconds=3600, limit=LIMIT) for _ in range(LIMIT)]
    if not all(lock.lock() for lock in held):
        raise RuntimeError(f"{store}: could not fill a fresh name's {LIMIT} holds")
    refused = Singleton(f"{name}-full", persister, lock_expire_seconds=TTL_SECONDS, limit=LIMIT)

    def refusal() -> None:
        if refused.lock():
            raise RuntimeError(f"{store}: an attempt on a full set was granted")

    cases.append(Case(store, "full set refused", refusal))
    _kept.extend(half + held)
    return cases


#: The holds the cases count, kept referenced for the run; released before the stores close.
_kept: list[Singleton] = []


def _run_for(case: Case, seconds: float) -> None:
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        for _ in range(10):
            case.cycle()
        count += 10
        now = time.perf_counter()
        if now - start >= seconds:
            case.rates.append(count / (now - start))
            case.cpu.append((time.process_time() - cpu) / count)
            return


def throughput(cases: list[Case], rounds: int, seconds: float) -> None:
    for case in cases:
        _run_for(case, seconds / 2)  # warm-up: connections, scripts, statements
        case.rates.clear()
        case.cpu.clear()
    for index in range(rounds):
        for case in cases if index % 2 == 0 else reversed(cases):
            _run_for(case, seconds)
        print(f"  round {index + 1}/{rounds} done", file=sys.stderr)


# -- processes sharing N holds ---------------------------------------------------------------


WORKER = r'''
import json, sys, time
from singleton_integrations import Singleton
url, name, hold, limit = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
lock = Singleton(name, url, lock_expire_seconds=10, limit=limit)
spans = []
print("ready", flush=True)
start_at, end_at = map(float, sys.stdin.readline().split())
time.sleep(max(0.0, start_at - time.time()))
while (left := end_at - time.time()) > 0:
    if not lock.lock(wait=left):
        continue
    got = time.time()
    time.sleep(hold)
    let_go = time.time()
    lock.release()
    spans.append((got, let_go))
print(json.dumps(spans))
'''


@dataclass
class Handover:
    store: str
    processes: int
    seconds: float
    acquisitions: int
    fairness: float
    most_at_once: int


def handover(store: str, url: str, processes: int, seconds: float) -> Handover:
    name = f"bench-{contention.RUN_ID}-limits-handover-{store}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", WORKER, url, name, str(contention.HOLD_SECONDS),
                                  str(HANDOVER_LIMIT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{store}: a contender did not start: {child.communicate()[1][-400:]}")
    start_at = time.time() + 0.3
    for child in children:
        assert child.stdin is not None
        child.stdin.write(f"{start_at} {start_at + seconds}\n")
        child.stdin.flush()
    spans: list[list[tuple[float, float]]] = []
    for child in children:
        out, err = child.communicate(timeout=seconds + 60)
        if child.returncode != 0:
            raise RuntimeError(f"{store}: a contender failed: {err.strip()[-400:]}")
        spans.append([(got, let_go) for got, let_go in json.loads(out)])
    edges = sorted([(got, 1) for own in spans for got, _ in own] + [(let_go, -1) for own in spans for _, let_go in own],
                   key=lambda edge: (edge[0], edge[1]))  # a release at the same instant counts first
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    counts = [len(own) for own in spans]
    return Handover(store, processes, seconds, sum(counts), min(counts) / max(counts) if max(counts) else 0.0, most)


def drop_mysql_tables(url: str) -> None:
    """The run's MySQL tables (``contention.store_url`` names one per run): the lock, waiters' and holds' tables."""
    import run

    table = dict(parse_qsl(urlsplit(url).query))["table"]
    run.mysql_drop(url, table, f"{table}_waiters", f"{table}_holds")


# -- report -------------------------------------------------------------------------------------


def render(results: dict[str, list[Case]], handovers: list[Handover], skipped: list[str], rounds: int,
           elapsed: float, load: tuple[float, float, float]) -> str:
    lines = [
        "# limit=N against the single lock",
        "",
        f"Run {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {platform.node()} "
        f"({os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}), Python {platform.python_version()}; "
        f"{rounds} interleaved rounds, {elapsed:.0f} s. Written by `benchmarks/limits.py`.",
        "",
        "Uncontended, one object, `lock()` + `release()` per cycle (a refused `lock()` for the full set). "
        "Median cycles per second, the spread of the rounds, client CPU per cycle, and the ratio to the "
        "same store's `limit=1` cycle, as the median of each round's pair (target for `limit=10`: at most 1.30x).",
        "",
        "| store | case | cycles/s (median) | spread | CPU/cycle | cost vs limit=1 |",
        "|---|---|---:|---|---:|---:|",
    ]
    for store, cases in results.items():
        single = cases[0]
        for case in cases:
            pairs = [base / mine for mine, base in zip(case.rates, single.rates, strict=True) if mine]
            cost = statistics.median(pairs)
            lines.append(f"| {store} | {case.label} | {case.rate:,.0f} | {min(case.rates):,.0f}-{max(case.rates):,.0f} "
                         f"| {statistics.median(case.cpu) * 1e6:.0f} µs | {cost:.2f}x |")
    if handovers:
        lines += ["", f"Hand-overs: processes compete for one name with `limit={HANDOVER_LIMIT}`, each holding "
                      f"{contention.HOLD_SECONDS * 1000:g} ms and competing again at once.", "",
                  "| store | processes | seconds | acquisitions/s | fairness | most holds at once |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {h.store} | {h.processes} | {h.seconds:g} | {h.acquisitions / h.seconds:,.0f} | "
                  f"{h.fairness:.2f} | {h.most_at_once} |" for h in handovers]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--output", default=str(HERE / "LIMITS.md"), help="Markdown file, or - for stdout only")
    args = parser.parse_args(argv)
    rounds, seconds, handover_seconds = (5, 0.3, 3.0) if args.quick else (7, 1.0, 8.0)
    stores = [store.strip() for store in args.stores.split(",") if store.strip()]
    started, load = time.perf_counter(), os.getloadavg()  # before the run's own processes add to it
    results: dict[str, list[Case]] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as workdir:
        made: list[persisters.Persister] = []
        cases: list[Case] = []
        urls: dict[str, str] = {}
        for store in stores:
            try:
                urls[store] = contention.store_url(store, Path(workdir))
                persister = persisters.from_url(urls[store])
                store_cases = _cases(store, persister)
            except Exception as error:  # a store this machine lacks is reported, not fatal
                skipped.append(f"{store}: {type(error).__name__}: {error}")
                continue
            made.append(persister)
            results[store] = store_cases
            cases += store_cases
        throughput(cases, rounds, seconds)
        handovers = [handover(store, urls[store], args.processes, handover_seconds)
                     for store in results if store in PROCESS_STORES]
        for lock in _kept:  # while the stores run: the MongoDB-wire server stops with this process
            lock.release()
        for persister in made:
            persister.close()
        if "mysql" in urls:
            drop_mysql_tables(urls["mysql"])
    text = render(results, handovers, skipped, rounds, time.perf_counter() - started, load)
    print(text)
    if args.output != "-":
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
