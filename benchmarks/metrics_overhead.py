"""What lock metrics cost: an uncontended Redis ``lock()`` + ``release()`` cycle, three ways, in one process.

- ``sdk``: OpenTelemetry's SDK configured (a ``MeterProvider`` with a reader), every instrument recording;
- ``api only``: ``opentelemetry-api`` installed and no SDK configured (its no-op proxy instruments);
- ``nothing``: no OpenTelemetry (``NoRecorder``, the recorder the core picks when it cannot import it).

The three are swapped with ``metrics.use`` and run in interleaved rounds (shuffled order each
round), so drift on a shared machine hits all alike; the figures are medians over rounds, of the
wall time and of this process's CPU time per cycle (the round trips dominate the wall time; the
recorder's cost shows in the CPU time).

    python benchmarks/metrics_overhead.py                  # 15 rounds of 400 cycles
    python benchmarks/metrics_overhead.py --rounds 5 --cycles 200
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from singleton_integrations import Singleton, metrics, persisters


def _recorders() -> dict[str, metrics.Recorder]:
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ImportError:
        sys.exit("install opentelemetry-sdk (and opentelemetry-api) to compare the three")
    reader = InMemoryMetricReader()
    return {
        "sdk": metrics.OpenTelemetryRecorder(MeterProvider(metric_readers=[reader])),
        # No provider set: the global one is OpenTelemetry's proxy, whose instruments do nothing.
        "api only": metrics.OpenTelemetryRecorder(),
        "nothing": metrics.NoRecorder(),
    }


def _round(lock: Singleton, cycles: int) -> tuple[float, float]:
    """Seconds of wall time and of CPU time per cycle."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(cycles):
        if not lock.lock():
            raise RuntimeError("the benchmark's lock was held by someone else")
        lock.release()
    return (time.perf_counter() - wall) / cycles, (time.process_time() - cpu) / cycles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("SINGLETON_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cycles", type=int, default=400)
    args = parser.parse_args()
    store = persisters.from_url(args.url)
    lock = Singleton(f"bench-metrics-{uuid.uuid4().hex}", store, lock_expire_seconds=60, release_on_sigterm=False)
    recorders = _recorders()
    walls: dict[str, list[float]] = {label: [] for label in recorders}
    cpus: dict[str, list[float]] = {label: [] for label in recorders}
    previous = metrics.use(recorders["nothing"])
    try:
        _round(lock, args.cycles)  # warm up: connections, scripts loaded, code paths
        for _ in range(args.rounds):
            order = list(recorders)
            random.shuffle(order)
            for label in order:
                metrics.use(recorders[label])
                wall, cpu = _round(lock, args.cycles)
                walls[label].append(wall)
                cpus[label].append(cpu)
    finally:
        metrics.use(previous)
        store.close()
    base_wall, base_cpu = statistics.median(walls["nothing"]), statistics.median(cpus["nothing"])
    print(f"uncontended Redis lock()+release(), {args.rounds} interleaved rounds x {args.cycles} cycles, medians")
    print(f"{'recorder':<10} {'wall µs/cycle':>14} {'vs nothing':>11} {'CPU µs/cycle':>13} {'vs nothing':>11}")
    for label in recorders:
        wall, cpu = statistics.median(walls[label]), statistics.median(cpus[label])
        print(f"{label:<10} {wall * 1e6:>14.1f} {(wall - base_wall) * 1e6:>+10.1f}µ"
              f" {cpu * 1e6:>13.1f} {(cpu - base_cpu) * 1e6:>+10.1f}µ")


if __name__ == "__main__":
    main()
