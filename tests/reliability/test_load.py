"""Load on the networked stores: 64 contenders on one name, and 10,000 distinct names held at once."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from typing import Any

import pytest

from singleton_integrations import Singleton, persisters
from tests.conftest import store_url_for


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_64_contenders_one_name(networked_kind: str, tmp_path: Any, figures: dict[str, Any]) -> None:
    """64 threads (8 persisters, as 8 clients would) race for one name for 15 s: no errors, no double hold."""
    url = store_url_for(networked_kind, tmp_path)
    name = f"reliability-load-{uuid.uuid4().hex[:10]}"
    stores = [persisters.from_url(url) for _ in range(8)]
    latencies: list[float] = []
    errors: list[BaseException] = []
    holding, overlaps, holds = [0], [0], [0]
    guard = threading.Lock()
    stop_at = time.monotonic() + 15

    def contend(index: int) -> None:
        job = Singleton(name, stores[index % len(stores)], lock_expire_seconds=30)
        local: list[float] = []
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                acquired = job.lock()
                local.append(time.perf_counter() - started)
                if acquired:
                    with guard:
                        holding[0] += 1
                        overlaps[0] += holding[0] > 1
                    time.sleep(0.001)
                    with guard:
                        holding[0] -= 1
                        holds[0] += 1
                    job.release()
                else:
                    time.sleep(0.005)
            except Exception as error:
                errors.append(error)
        with guard:
            latencies.extend(local)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for store in stores:
        store.close()
    figures.update(persister=networked_kind, contenders=64, seconds=15, attempts=len(latencies), holds=holds[0],
                   attempts_per_s=round(len(latencies) / 15, 1), errors=len(errors), overlaps=overlaps[0],
                   p50_ms=round(_percentile(latencies, 0.5) * 1e3, 2), p99_ms=round(_percentile(latencies, 0.99) * 1e3, 2))
    assert not errors, errors[:3]
    assert overlaps[0] == 0
    assert holds[0] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_10000_names_flat_cost(networked_kind: str, tmp_path: Any, figures: dict[str, Any]) -> None:
    """Acquire 10,000 distinct names and hold them all, then release: the cost per acquire stays flat as the store fills."""
    url = store_url_for(networked_kind, tmp_path)
    store = persisters.from_url(url)
    prefix = f"reliability-names-{uuid.uuid4().hex[:8]}-"
    jobs = [Singleton(f"{prefix}{i:05d}", store, lock_expire_seconds=600) for i in range(10_000)]
    batches: list[list[float]] = []
    started_all = time.perf_counter()
    try:
        for start in range(0, len(jobs), 1000):
            batch = []
            for job in jobs[start:start + 1000]:
                began = time.perf_counter()
                assert job.lock()
                batch.append(time.perf_counter() - began)
            batches.append(batch)
        acquire_seconds = time.perf_counter() - started_all
        listed = len(store.list(prefix))
    finally:
        released_started = time.perf_counter()
        released = sum(1 for job in jobs if job.held and job.release())
        release_seconds = time.perf_counter() - released_started
        store.close()
    medians = [statistics.median(batch) for batch in batches]
    every = [value for batch in batches for value in batch]
    figures.update(persister=networked_kind, names=len(jobs), listed=listed, released=released,
                   acquires_per_s=round(len(jobs) / acquire_seconds, 1), releases_per_s=round(released / release_seconds, 1),
                   p50_ms=round(_percentile(every, 0.5) * 1e3, 3), p99_ms=round(_percentile(every, 0.99) * 1e3, 3),
                   first_batch_median_ms=round(medians[0] * 1e3, 3), last_batch_median_ms=round(medians[-1] * 1e3, 3),
                   growth=round(medians[-1] / medians[0], 2))
    assert listed == 10_000 and released == 10_000
    # Flat: the last thousand cost at most twice the first (an index scan or a full scan would grow 10x).
    assert medians[-1] <= 2 * medians[0] + 0.001
