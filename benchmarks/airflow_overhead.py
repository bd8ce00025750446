"""What a guard costs an Airflow task on real deployments: ``@task.singleton`` (Redis store) against the same task unguarded.

One deployment at a time (``tests/airflow/deployments.py``: its own PostgreSQL metadata
database, api-server, scheduler, dag-processor, triggerer), for each executor asked for:
the LocalExecutor, and the CeleryExecutor with one Celery worker (Redis broker). Each
run of the ``overhead`` DAG (``tests/airflow/overhead.py``) runs the plain task, then
the guarded one, so every run gives one guarded-minus-plain difference taken at one
moment; the rounds interleave the two that way, and the first run (which warms the
DAG bundle and the executor's workers) is left out. Printed per executor: the medians
of Airflow's task duration and of the execute span (end of "Pre Execute" to start of
"Post Execute") for each task, the median and spread of the per-run differences, the
guarded task's steps read from its log's timestamps (``GUARD_STEPS``), and the load
average before and after. ``--preload`` adds the docs' ``airflow_local_settings.py``
preload of redis-py; ``--connection metastore`` keeps the connection in the metadata
database instead of an ``AIRFLOW_CONN_`` variable.

``--profile DIR`` then runs the DAG as many more times with each task process under
cProfile (switched on through ``airflow_local_settings.py`` for those runs only),
prints the guarded and the plain task's cumulative times for the task runner's steps,
ours and the driver's, and keeps the merged profiles (``pstats``, or ``snakeviz``).

    python benchmarks/airflow_overhead.py                       # both executors, 7 rounds each
    python benchmarks/airflow_overhead.py --executor LocalExecutor --rounds 5 --preload
    python benchmarks/airflow_overhead.py --executor CeleryExecutor --profile /tmp/prof

The CeleryExecutor needs ``apache-airflow-providers-celery`` importable by the
deployment's processes (installed, or on ``PYTHONPATH``); without it that executor is
skipped with the reason. Redis (127.0.0.1:6379, the lock store on db 0 and the Celery
broker on db 13) and PostgreSQL (127.0.0.1:5432, trust) must be running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.airflow.deployments import EXECUTORS, Deployment, celery_missing
from tests.airflow.overhead import GUARD_STEPS, OVERHEAD_DAG, run_once

REDIS = os.environ.get("SINGLETON_BENCH_REDIS", "redis://127.0.0.1:6379/0")
PRELOAD = """# Loaded by every Airflow process: forked task processes inherit the driver instead of importing it.
from singleton_integrations import persisters

persisters.preload("redis")
"""


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    return (f"median {statistics.median(ordered):+.1f} ms, quartiles {quartiles[0]:+.1f} .. {quartiles[2]:+.1f} ms, "
            f"min {ordered[0]:+.1f}, max {ordered[-1]:+.1f} ms (n={len(ordered)})")


def deployment_name(executor: str) -> str:
    return executor.removesuffix("Executor").lower()


def _deployment(executor: str, root: Path, connection: str) -> Deployment:
    connection_env = {"AIRFLOW_CONN_SINGLETON_DEFAULT": json.dumps({"conn_type": "singleton", "password": REDIS})}
    return Deployment(deployment_name(executor), root, executor=executor,
                      env_extra=connection_env if connection == "env" else {})


def _start(deployment: Deployment, tag: str, preload: bool, profile: Path | None, connection: str) -> None:
    local_settings = (PRELOAD if preload else "") + (PROFILE_HOOK.format(folder=str(profile)) if profile else "")
    if local_settings:
        (deployment.home / "config").mkdir(parents=True, exist_ok=True)
        (deployment.home / "config" / "airflow_local_settings.py").write_text(local_settings)
    migration = deployment.prepare()
    if migration.wait(600) != 0:
        raise RuntimeError((deployment.home / "db-migrate.log").read_text()[-3000:])
    (deployment.dags / "overhead_dag.py").write_text(
        "from datetime import datetime\n\nfrom airflow.sdk import dag, task\n" + OVERHEAD_DAG.format(tag=tag))
    deployment.start()
    deployment.wait_healthy()
    deployment.wait_for_dags(["overhead"])
    if connection == "metastore":  # looked up through the supervisor and the api-server, as most deployments do
        deployment.request("POST", "/api/v2/connections", {"connection_id": "singleton_default",
                                                            "conn_type": "singleton", "password": REDIS})


def _measure(deployment: Deployment, tag: str, rounds: int, label: str
             ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    runs: dict[str, list[float]] = {"plain": [], "guarded": [], "plain span": [], "guarded span": [],
                                    "duration": [], "span": []}
    steps: dict[str, list[float]] = {}
    for round_ in range(rounds + 1):
        times = run_once(deployment, f"{label}-{tag}-{round_}")
        if round_ == 0:
            continue  # warms the DAG bundle and the executor's workers (and the Celery worker's start)
        (plain, plain_span), (guarded, guarded_span) = times["plain"], times["guarded"]
        runs["plain"].append(plain * 1000)
        runs["guarded"].append(guarded * 1000)
        runs["plain span"].append(plain_span * 1000)
        runs["guarded span"].append(guarded_span * 1000)
        runs["duration"].append((guarded - plain) * 1000)
        runs["span"].append((guarded_span - plain_span) * 1000)
        for step, milliseconds in times.steps.items():
            steps.setdefault(step, []).append(milliseconds)
    return runs, steps


def _report(executor: str, label: str, runs: dict[str, list[float]], steps: dict[str, list[float]],
            load_before: str, load_after: str) -> None:
    median = {key: statistics.median(values) for key, values in runs.items()}
    print(f"\n{executor} ({label}); load average {load_before} before, {load_after} after")
    print(f"  task duration, median: plain {median['plain']:.0f} ms, guarded {median['guarded']:.0f} ms")
    print(f"  execute span, median:  plain {median['plain span']:.0f} ms, guarded {median['guarded span']:.0f} ms")
    print(f"  guarded - plain, task duration: {_spread(runs['duration'])}")
    print(f"  guarded - plain, execute span:  {_spread(runs['span'])}")
    print("  the guarded task's steps, from its log's timestamps (median, min .. max ms):")
    for start, end, what in GUARD_STEPS:
        values = steps.get(f"{start.strip()} -> {end.strip()}")
        if not values:
            continue
        print(f"    {statistics.median(values):6.1f}  {min(values):6.1f} .. {max(values):6.1f}  "
              f"{start.strip()} -> {end.strip()}: {what}")


# -- profile ---------------------------------------------------------------------------------

#: Appended to ``airflow_local_settings.py``, which every Airflow process loads: a process forked while
#: ``<dir>/on`` exists (a task process, forked by its supervisor) runs under cProfile and writes its
#: profile just before it exits (the task runner ends with ``os._exit``, after clearing atexit).
PROFILE_HOOK = """
import os as _os


def _profile_forked_child(folder={folder!r}):
    if not _os.path.exists(_os.path.join(folder, "on")):
        return
    import cProfile

    profile = cProfile.Profile()
    real_exit = _os._exit

    def _exit(code):
        profile.disable()
        profile.dump_stats(_os.path.join(folder, f"{{_os.getpid()}}.prof"))
        real_exit(code)

    _os._exit = _exit
    profile.enable()


_os.register_at_fork(after_in_child=_profile_forked_child)
"""


def _profile(deployment: Deployment, tag: str, rounds: int, folder: Path) -> None:
    """Run the DAG with every task process under cProfile; print where the guarded task's extra time goes."""
    import pstats

    switch = folder / "on"
    switch.touch()
    try:
        for round_ in range(rounds):
            run_once(deployment, f"profile-{tag}-{round_}")
    finally:
        switch.unlink()
    time.sleep(2)  # the last task process writes its profile as it exits
    kept: dict[str, list[Path]] = {"guarded": [], "plain": []}
    for path in folder.glob("*.prof"):
        stats = pstats.Stats(str(path))
        functions = {(Path(file).name, name) for file, _, name in stats.stats}  # type: ignore[attr-defined]
        if ("task_runner.py", "main") not in functions:
            continue  # another forked process (a DAG file parse)
        kept["guarded" if ("singleton.py", "_try_acquire") in functions else "plain"].append(path)
    for task, paths in kept.items():
        if not paths:
            continue
        stats = pstats.Stats(*map(str, paths), stream=sys.stdout)
        print(f"\n  profile of the {task} task processes ({len(paths)} runs; cumulative seconds are their sum):")
        stats.sort_stats("cumulative").print_stats(r"singleton|redis|task_runner.py:\d+\((run|_execute_task|"
                                                   r"startup|parse|finalize|_prepare|main)\)", 45)
        stats.dump_stats(str(folder / f"{deployment.name}-{task}.prof"))
    print(f"  profiles: {folder}/{deployment.name}-{{guarded,plain}}.prof")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--executor", choices=EXECUTORS, action="append", help="default: both")
    parser.add_argument("--rounds", type=int, default=7, help="measured runs per executor (after one warm-up run)")
    parser.add_argument("--preload", action="store_true", help="preload redis in airflow_local_settings.py")
    parser.add_argument("--connection", choices=("env", "metastore"), default="env",
                        help="singleton_default from an AIRFLOW_CONN_ variable, or from the metadata database")
    parser.add_argument("--profile", type=Path, help="then profile as many more runs' task processes (cProfile) into "
                                                     "this folder")
    parser.add_argument("--keep", type=Path, help="keep the deployments' homes and logs in this folder")
    args = parser.parse_args()
    executors = args.executor or list(EXECUTORS)
    tag = uuid.uuid4().hex[:8]
    root = args.keep or Path(tempfile.mkdtemp(prefix="airflow-overhead-"))
    print(f"{args.rounds} measured runs per executor; Redis store {REDIS}; load average {_load()}")
    for executor in executors:
        if executor == "CeleryExecutor" and (reason := celery_missing()):
            print(f"\n{executor}: skipped, {reason}")
            continue
        profile = args.profile / deployment_name(executor) if args.profile else None
        if profile:
            profile.mkdir(parents=True, exist_ok=True)
        deployment = _deployment(executor, root, args.connection)
        try:
            _start(deployment, tag, args.preload, profile, args.connection)
            load_before = _load()
            runs, steps = _measure(deployment, tag, args.rounds, executor)
            label = (f"connection from the {'environment' if args.connection == 'env' else 'metadata database'}"
                     f"{', redis preloaded in airflow_local_settings' if args.preload else ''}")
            _report(executor, label, runs, steps, load_before, _load())
            if profile:
                _profile(deployment, tag, args.rounds, profile)
        finally:
            deployment.stop()  # also drops its database; one deployment at a time: the next starts on a quiet machine
            if not args.keep:
                deployment.remove()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
