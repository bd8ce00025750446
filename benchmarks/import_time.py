"""What a fresh process pays before and around one lock: each Airflow task and Prefect run starts one.

Each figure is one new interpreter, timed from spawn to exit, in wall time and in CPU time
(user + system, from the child's own rusage: less swayed by a busy machine than wall time):

- ``floor``: ``python -c pass``, the interpreter alone;
- ``redis``: ``import redis``, the driver alone (the floor included);
- ``package``: ``import singleton_integrations``;
- ``sync api``: ``from singleton_integrations import Singleton, persisters``;
- ``lock``: that, plus one ``Singleton`` on Redis, ``lock()`` and ``release()``;
- ``share``: the same run with ``redis`` imported first, untimed, and the rest timed inside the
  process: the project's own share of a guarded run (its imports, building the persister and the
  lock, the two round trips), with nothing of the interpreter's start or the driver's import in it.

``lock`` minus ``redis``, paired per round, estimates the same share from whole processes; on a
busy machine its spread is wide, which is why ``share`` is measured directly too. Every case of every tree runs
once per round, in a shuffled order, so drift on a shared machine hits all alike; the figures are
medians over rounds with their spread (lowest..highest). ``--tree NAME=PATH`` times another
checkout (e.g. a ``git worktree`` of an older commit) in the same rounds.

    python benchmarks/import_time.py                                   # this checkout, 7 rounds
    git worktree add --detach /tmp/before HEAD~1
    python benchmarks/import_time.py --tree before=/tmp/before --tree after=. --rounds 9
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

_LOCK = """
import sys
from singleton_integrations import Singleton, persisters
lock = Singleton(sys.argv[1], persisters.from_url(sys.argv[2]))
if not lock.lock():
    sys.exit("the benchmark's lock was held by someone else")
lock.release()
"""

#: Cases that do not import this project: run once per round, whatever the trees.
_SHARED = {"floor": "pass", "redis": "import redis"}
_SHARE = """
import sys, time
import redis
wall, cpu = time.perf_counter(), time.process_time()
from singleton_integrations import Singleton, persisters
lock = Singleton(sys.argv[1], persisters.from_url(sys.argv[2]))
if not lock.lock():
    sys.exit("the benchmark's lock was held by someone else")
lock.release()
print((time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000)
"""
_PER_TREE = {
    "package": "import singleton_integrations",
    "sync api": "from singleton_integrations import Singleton, persisters",
    "lock": _LOCK,
    "share": _SHARE,
}


def _run(code: str, tree: Path | None, args: list[str], cwd: str) -> tuple[float, float]:
    """Milliseconds of wall time and of CPU time of one fresh interpreter running ``code``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)  # before site-packages, so before an editable install's path
    with tempfile.TemporaryFile() as errors, tempfile.TemporaryFile() as output:  # files: never a full pipe
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                                 stdout=output, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own CPU time, not all children's
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            errors.seek(0)
            raise SystemExit(f"a timed child failed ({code.strip().splitlines()[-1]!r}):\n{errors.read().decode()}")
        output.seek(0)
        measured = output.read().split()
    if measured:  # the child timed itself
        return float(measured[0]), float(measured[1])
    return wall * 1000, (usage.ru_utime + usage.ru_stime) * 1000


def _check_tree(name: str, tree: Path, cwd: str) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, "PYTHONPATH": str(tree)}
    found = subprocess.run([sys.executable, "-c", "import singleton_integrations as s; print(s.__file__)"],
                           cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"tree {name!r} imports singleton_integrations from {found}, not from {tree}")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f}  ({min(values):6.1f} .. {max(values):6.1f})"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="a checkout to time (repeatable); default: this one")
    parser.add_argument("--url", default=os.environ.get("SINGLETON_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compiles each tree's .pyc)")
    options = parser.parse_args()
    trees = dict(item.split("=", 1) for item in options.tree) if options.tree else {"current": str(_ROOT)}
    paths = {name: Path(path).resolve() for name, path in trees.items()}

    jobs: list[tuple[str, str, Path | None, str]] = [(case, "", None, code) for case, code in _SHARED.items()]
    jobs += [(case, name, path, code) for name, path in paths.items() for case, code in _PER_TREE.items()]
    wall: dict[tuple[str, str], list[float]] = {(case, name): [] for case, name, _, _ in jobs}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in wall}
    lock_name = f"import-time-{uuid.uuid4().hex}"
    load_before = _load()
    with tempfile.TemporaryDirectory() as cwd:  # nowhere near a checkout, so only PYTHONPATH decides
        for name, path in paths.items():
            _check_tree(name, path, cwd)
        for round_number in range(options.warmup + options.rounds):
            random.shuffle(jobs)
            for case, name, path, code in jobs:
                args = [lock_name, options.url] if case in ("lock", "share") else []
                took = _run(code, path, args, cwd)
                if round_number >= options.warmup:
                    wall[case, name].append(took[0])
                    cpu[case, name].append(took[1])

    print(f"{sys.executable} (Python {sys.version.split()[0]}), {options.rounds} rounds; "
          f"load average {load_before} before, {_load()} after")
    print("milliseconds per fresh process: median (lowest .. highest)")
    print(f"{'case':<28}{'wall':>32}{'cpu':>32}")
    for case, name in wall:
        label = f"{case} [{name}]" if name else case
        print(f"{label:<28}{_spread(wall[case, name]):>32}{_spread(cpu[case, name]):>32}")
    print("lock - redis, paired per round:")
    for name in paths:
        shares = [(a - b, c - d) for a, b, c, d in zip(wall["lock", name], wall["redis", ""],
                                                        cpu["lock", name], cpu["redis", ""], strict=True)]
        label = f"lock - redis [{name}]"
        print(f"{label:<28}{_spread([s[0] for s in shares]):>32}{_spread([s[1] for s in shares]):>32}")
    if len(paths) > 1:
        first = next(iter(paths))
        print(f"ratios to [{first}], per round then median (cpu):")
        for name in list(paths)[1:]:
            for case in _PER_TREE:
                ratios = [b / a for a, b in zip(cpu[case, first], cpu[case, name], strict=True)]
                print(f"  {case} [{name}] / [{first}]: {statistics.median(ratios):.2f} "
                      f"({min(ratios):.2f} .. {max(ratios):.2f})")


if __name__ == "__main__":
    main()
