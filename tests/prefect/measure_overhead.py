"""What ``@singleton`` adds to each call, with a block object and with a saved block's name (issue 9, item 2).

    PREFECT_API_URL=http://127.0.0.1:4200/api python tests/prefect/measure_overhead.py redis://127.0.0.1:6379/0 [CALLS]

Times the guarded function itself (acquire, release, events, block loading), so
Prefect's own per-run cost is not in the figures. Prints the median and p90 per call.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid

from prefect_blocks import SingletonBlock, clear_block_cache, singleton


def timed(call, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def report(label: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    print(f"{label:<34} median {statistics.median(ordered):6.2f} ms   p90 {ordered[int(len(ordered) * 0.9)]:6.2f} ms")


def main() -> None:
    url = sys.argv[1]
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    name = f"overhead-{uuid.uuid4().hex[:8]}"
    block = SingletonBlock(url=url, lock_expire_seconds=60)
    block.save(name, overwrite=True)

    def work() -> int:
        return 1

    bare = work
    by_object = singleton(block=block, lock_name=f"{name}-object")(work)
    by_name = singleton(block=name, lock_name=f"{name}-name")(work)
    by_object()  # connect once: pools are per process
    report("unguarded", timed(bare, calls))
    report("@singleton(block=<object>)", timed(by_object, calls))
    clear_block_cache()
    first = timed(by_name, 1)[0]
    print(f"{'@singleton(block=<name>) first run':<34} {first:6.2f} ms (loads the block)")
    report("@singleton(block=<name>) cached", timed(by_name, calls))
    uncached = []
    for _ in range(min(calls, 20)):
        clear_block_cache()
        uncached += timed(by_name, 1)
    report("@singleton(block=<name>) uncached", uncached)


if __name__ == "__main__":
    main()
