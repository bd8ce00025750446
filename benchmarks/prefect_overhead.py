"""What ``@singleton`` adds to a served Prefect flow run, each run in a fresh process (issue 22).

    python benchmarks/prefect_overhead.py                 # 7 interleaved pairs
    python benchmarks/prefect_overhead.py --pairs 5 --importtime

Starts a real ``prefect server start`` (``tests/prefect/real_server.py``), saves a
``SingletonBlock`` on the test Redis, and serves three deployments with ``serve()``:
``overhead-plain`` (returns at once), ``overhead-guarded`` (the same body under
``@singleton(block=<saved block's name>)``) and ``overhead-probe``. Each run executes in a
new process spawned by the serve process, as in production. The pairs run one run at a
time, the order alternating, and the figure is each run's Running-to-Completed time read
from its states on the server: the median and spread of (guarded - plain) over the pairs.

The probe run, in a fresh process like the others, times the guarded run's parts one by
one: the Redis driver's import, the block read (``SingletonBlock.load``, with the HTTP
requests it makes), then the project's own share: the core's persister (its module and
client), and the first guarded call with the block loaded and the driver imported
(connecting, acquiring, holder metadata, events, releasing, with the API requests it
makes: none); then warm guarded calls interleaved with the bare core's lock cycle. The load average is printed before and after: a shared machine
moves the figures more than the change being measured, so compare runs taken together.
``--importtime`` writes ``-X importtime`` of every run process to the serve log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefect import flow, serve  # noqa: E402

from prefect_blocks import singleton  # noqa: E402

BLOCK_ENV, LOCK_ENV = "OVERHEAD_BLOCK", "OVERHEAD_LOCK"
#: Read when the serve process (and each run process, which imports this file again) starts.
BLOCK = os.environ.get(BLOCK_ENV, "overhead")
LOCK = os.environ.get(LOCK_ENV, "overhead")
RUN_TIMEOUT = 180.0


@flow(name="overhead-plain")
def plain() -> int:
    return 1


@flow(name="overhead-guarded")
@singleton(block=BLOCK, lock_name=LOCK)
def guarded() -> int:
    return 1


@flow(name="overhead-probe")
def probe(out: str) -> None:
    """The guarded run's parts, timed one by one in this fresh run process; written as JSON to ``out``."""
    import httpx

    requests: list[str] = []
    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def counting_send(self: httpx.Client, request: httpx.Request, *args: Any, **kwargs: Any) -> httpx.Response:
        requests.append(f"{request.method} {request.url.path.removeprefix('/api')}")
        return sync_send(self, request, *args, **kwargs)

    async def acounting_send(self: httpx.AsyncClient, request: httpx.Request, *args: Any, **kwargs: Any) -> httpx.Response:
        requests.append(f"{request.method} {request.url.path.removeprefix('/api')}")
        return await async_send(self, request, *args, **kwargs)

    httpx.Client.send, httpx.AsyncClient.send = counting_send, acounting_send  # type: ignore[method-assign]
    from prefect_blocks import SingletonBlock

    figures: dict[str, object] = {}
    started = time.perf_counter()
    import redis  # noqa: F401 - the driver's import, which the first guarded call does otherwise

    figures["driver_import_ms"] = (time.perf_counter() - started) * 1000
    before = len(requests)
    started = time.perf_counter()
    block = SingletonBlock.load(BLOCK, _sync=True)  # what @singleton(block=<name>) does in a sync flow
    figures["block_read_ms"] = (time.perf_counter() - started) * 1000
    figures["block_read_requests"] = requests[before:]

    cpu_started = time.thread_time()  # this thread's CPU: what a busy machine inflates least
    started = time.perf_counter()
    block.get_persister()  # the core's persister module and client; nothing connects yet
    figures["persister_ms"] = (time.perf_counter() - started) * 1000

    def work() -> int:
        return 1

    first = singleton(block=block, lock_name=LOCK + "-probe-first")(work)
    warm = singleton(block=block, lock_name=LOCK + "-probe-warm")(work)
    before = len(requests)
    started = time.perf_counter()
    first()  # connects, acquires, emits, releases
    figures["first_call_ms"] = (time.perf_counter() - started) * 1000
    figures["own_cpu_ms"] = (time.thread_time() - cpu_started) * 1000
    figures["first_call_requests"] = requests[before:]
    core = block.get_singleton(LOCK + "-probe-core")
    warm_guarded, warm_core = [], []
    for _ in range(20):  # interleaved: the same lock cycle with and without the Prefect layer
        started = time.perf_counter()
        warm()
        warm_guarded.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        core.lock()
        core.release()
        warm_core.append((time.perf_counter() - started) * 1000)
    figures["warm_guarded_ms"] = statistics.median(warm_guarded)
    figures["warm_core_ms"] = statistics.median(warm_core)
    httpx.Client.send, httpx.AsyncClient.send = sync_send, async_send  # type: ignore[method-assign]
    Path(out).write_text(json.dumps(figures))


def _serve() -> None:
    serve(plain.to_deployment(name="served"), guarded.to_deployment(name="served"), probe.to_deployment(name="served"),
          pause_on_shutdown=False, print_starting_message=True)


# -- the driver ----------------------------------------------------------------------


def _load() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _running_to_completed(client: object, run_id: object) -> float:
    """Seconds from the run's Running state to its Completed state, by the server's timestamps."""
    states = {state.type.value: state.timestamp for state in client.read_flow_run_states(run_id)}  # type: ignore[attr-defined]
    return float((states["COMPLETED"] - states["RUNNING"]).total_seconds())


def _run(client: object, deployment_id: object, **parameters: object) -> object:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)  # type: ignore[attr-defined]
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        [found] = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))  # type: ignore[attr-defined]
        if found.state is not None and found.state.is_final():
            if found.state.type.value != "COMPLETED" or found.state.name != "Completed":
                raise SystemExit(f"{found.name}: {found.state!r}")
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"{found.name} did not finish in {RUN_TIMEOUT:.0f} s: {found.state!r}")
        time.sleep(0.05)


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    return f"median {statistics.median(ordered) * 1000:+7.1f} ms   min {ordered[0] * 1000:+7.1f}   max {ordered[-1] * 1000:+7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=7, help="interleaved (plain, guarded) pairs (default 7)")
    parser.add_argument("--probes", type=int, default=3, help="probe runs, each in a fresh process (default 3)")
    parser.add_argument("--importtime", action="store_true", help="-X importtime of each run process, into the serve log")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        _serve()
        return

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_blocks import SingletonBlock
    from tests.prefect.real_server import prefect_server
    from tests.servers import redis_server, stop_process

    store = redis_server.url()
    names = {BLOCK_ENV: f"overhead-{uuid.uuid4().hex[:8]}", LOCK_ENV: f"overhead-{uuid.uuid4().hex[:8]}"}
    print(_load(), "(before)")
    with tempfile.TemporaryDirectory(prefix="prefect-overhead-") as home, prefect_server(Path(home)) as server:
        env = server.env(**names, PREFECT_RUNNER_POLL_FREQUENCY="1")
        # Run processes write and reuse bytecode, as on any real install: without it each one
        # compiles Prefect's, redis-py's and our modules from source (PYTHONDONTWRITEBYTECODE).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if arguments.importtime:
            env["PYTHONPROFILEIMPORTTIME"] = "1"
        log_path = Path(home) / "serve.log"
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            SingletonBlock(url=store, lock_expire_seconds=60).save(names[BLOCK_ENV])
            with open(log_path, "w") as log:
                served = subprocess.Popen([sys.executable, __file__, "--serve"], env=env, cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT, text=True)
            try:
                _measure(get_client, arguments, served, log_path, Path(home))
            finally:
                stop_process(served)
                if arguments.importtime:
                    kept = Path(tempfile.gettempdir()) / "prefect-overhead-serve.log"
                    kept.write_text(log_path.read_text(errors="replace"))
                    print(f"serve log with -X importtime: {kept}")
    print(_load(), "(after)")


def _measure(get_client: object, arguments: argparse.Namespace, served: subprocess.Popen[str], log_path: Path, home: Path) -> None:
    with get_client(sync_client=True) as client:  # type: ignore[operator]
        deadline = time.monotonic() + RUN_TIMEOUT
        while "overhead-probe/served" not in log_path.read_text(errors="replace"):
            if served.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.25)
        ids = {name: client.read_deployment_by_name(f"{name}/served").id
               for name in ("overhead-plain", "overhead-guarded", "overhead-probe")}
        _run(client, ids["overhead-plain"])  # warm the server and the serve process
        _run(client, ids["overhead-guarded"])
        plain_s: list[float] = []
        guarded_s: list[float] = []
        for pair in range(arguments.pairs):
            order = ("overhead-plain", "overhead-guarded") if pair % 2 == 0 else ("overhead-guarded", "overhead-plain")
            for name in order:
                seconds = _running_to_completed(client, _run(client, ids[name]).id)  # type: ignore[attr-defined]
                (plain_s if name == "overhead-plain" else guarded_s).append(seconds)
        print(f"\nRunning to Completed, {arguments.pairs} interleaved pairs, each run in a fresh process ({_load()}):")
        print(f"  plain            {_spread(plain_s)}")
        print(f"  guarded          {_spread(guarded_s)}")
        print(f"  guarded - plain  {_spread([g - p for g, p in zip(guarded_s, plain_s, strict=True)])}")
        probes = []
        for number in range(arguments.probes):
            out = home / f"probe-{number}.json"
            _run(client, ids["overhead-probe"], out=str(out))
            probes.append(json.loads(out.read_text()))
    print(f"\nThe guarded run's parts, in a fresh run process ({len(probes)} probe runs, medians; {_load()}):")
    for key, label in (("driver_import_ms", "import redis (the driver; not the project's)"),
                       ("block_read_ms", "SingletonBlock.load (Prefect's block read)"),
                       ("persister_ms", "the core's persister: its module and client"),
                       ("first_call_ms", "first guarded call: connect, acquire, events, release"),
                       ("own_ms", "the project's own share (the two above)"),
                       ("own_cpu_ms", "  its CPU time in the run's thread"),
                       ("warm_guarded_ms", "a warm guarded call"),
                       ("warm_core_ms", "a warm core lock() + release(), same store")):
        values = [float(probe[key]) if key != "own_ms" else float(probe["persister_ms"]) + float(probe["first_call_ms"])
                  for probe in probes]
        print(f"  {label:<56} {statistics.median(values):7.1f} ms   (min {min(values):.1f}, max {max(values):.1f})")
    print(f"  the block read's API requests:      {probes[0]['block_read_requests']}")
    print(f"  the first guarded call's requests:  {probes[0]['first_call_requests']}")

if __name__ == "__main__":
    main()
