"""Lock metrics (issue 20): what OpenTelemetry's SDK reads from every store, through both faces and the leases.

The process's global ``MeterProvider`` is set once here, with an ``InMemoryMetricReader``
(cumulative), and the default recorder records through it as it would in an application.
Each case uses a name of its own and reads only that name's points, so the cases share the
reader safely. Real stores only; times are never asserted, only that durations were recorded.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry import metrics as otel_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from singleton_integrations import AsyncLease, AsyncSingleton, Lease, Singleton, metrics, persisters
from singleton_integrations.persisters import Persister
from singleton_integrations.testing.conformance._helpers import AsyncDriven, EventLoopThread, eventually
from tests.conftest import store_url_for

STORES = ("memory", "sqlite", "redis", "postgres", "mongodb", "mysql")
#: The ``lock.store`` attribute each store's measurements carry: its URL scheme.
STORE_ATTRIBUTE = {"memory": "memory", "sqlite": "sqlite", "redis": "redis", "postgres": "postgresql",
                   "mongodb": "mongodb", "mysql": "mysql"}
INSTRUMENTS = ("singleton.lock.attempts", "singleton.lock.acquired", "singleton.lock.not_acquired",
               "singleton.lock.released", "singleton.lock.lost", "singleton.lock.wait_duration",
               "singleton.lock.hold_duration", "singleton.lock.active")

_global_reader: InMemoryMetricReader | None = None


def _reader() -> InMemoryMetricReader:
    """The global provider's reader: OpenTelemetry lets a process set its provider once, so once per process."""
    global _global_reader
    if _global_reader is None:
        _global_reader = InMemoryMetricReader()
        otel_metrics.set_meter_provider(MeterProvider(metric_readers=[_global_reader]))
    return _global_reader


class Seen:
    """What a reader collected for one lock name (or, ``name`` None, for points without ``lock.name``)."""

    def __init__(self, reader: InMemoryMetricReader, name: str | None) -> None:
        self.points: list[tuple[str, dict[str, Any], Any]] = []
        data = reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                if scope.scope.name != "singleton_integrations":
                    continue
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        attributes = dict(point.attributes or {})
                        if attributes.get("lock.name") == name:
                            self.points.append((metric.name, attributes, point))

    def total(self, instrument: str, **attributes: Any) -> float:
        """A counter's sum, or a histogram's count, over the points that have ``attributes``."""
        found = 0.0
        for metric, have, point in self.points:
            if metric == instrument and all(have.get(key) == value for key, value in attributes.items()):
                found += point.count if hasattr(point, "count") else point.value
        return found

    def stores(self) -> set[Any]:
        return {attributes.get("lock.store") for _, attributes, _ in self.points}

    def instruments(self) -> set[str]:
        return {metric for metric, _, _ in self.points}


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return _reader()


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sync", "async"])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def runner(api: str) -> Iterator[EventLoopThread | None]:
    loop = EventLoopThread() if api == "async" else None
    yield loop
    if loop is not None:
        loop.close()


@pytest.fixture
def persister(store_kind: str, tmp_path: Path, runner: EventLoopThread | None) -> Iterator[Persister]:
    store = persisters.from_url(store_url_for(store_kind, tmp_path))
    yield store
    if runner is not None:
        runner.run(store.aclose(), timeout=30)
    store.close()


@pytest.fixture
def name() -> str:
    return f"metrics-{uuid.uuid4().hex}"


def _lock(runner: EventLoopThread | None, name: str, persister: Persister, **options: Any) -> Any:
    """A ``Singleton``, or an ``AsyncSingleton`` driven from this thread in the async run."""
    options.setdefault("lock_expire_seconds", 30)
    options.setdefault("release_on_sigterm", False)
    if runner is None:
        return Singleton(name, persister, **options)
    return AsyncDriven(AsyncSingleton(name, persister, **options), runner)


# -- every instrument, on every store, through both faces -----------------------------------


def test_acquire_and_release(reader: InMemoryMetricReader, runner: EventLoopThread | None, persister: Persister,
                             store_kind: str, name: str) -> None:
    lock = _lock(runner, name, persister)
    assert lock.lock() is True
    held = Seen(reader, name)
    assert held.total("singleton.lock.attempts") == 1
    assert held.total("singleton.lock.acquired", takeover=False) == 1
    assert held.total("singleton.lock.active") == 1
    assert held.total("singleton.lock.wait_duration") == 1
    assert lock.release() is True
    seen = Seen(reader, name)
    assert seen.total("singleton.lock.released") == 1
    assert seen.total("singleton.lock.hold_duration") == 1
    assert seen.total("singleton.lock.active") == 0
    assert seen.total("singleton.lock.not_acquired") == 0 and seen.total("singleton.lock.lost") == 0
    assert seen.stores() == {STORE_ATTRIBUTE[store_kind]}


def test_conflict_is_held(reader: InMemoryMetricReader, runner: EventLoopThread | None, persister: Persister,
                          name: str) -> None:
    holder = _lock(runner, name, persister)
    assert holder.lock()
    assert _lock(runner, name, persister).lock() is False
    seen = Seen(reader, name)
    assert seen.total("singleton.lock.attempts") == 2
    assert seen.total("singleton.lock.not_acquired", reason="held") == 1
    assert seen.total("singleton.lock.wait_duration") == 2
    holder.release()


def test_a_wait_that_runs_out_is_timeout(reader: InMemoryMetricReader, runner: EventLoopThread | None,
                                         persister: Persister, name: str) -> None:
    holder = _lock(runner, name, persister)
    assert holder.lock()
    assert _lock(runner, name, persister).lock(wait=0.3) is False
    seen = Seen(reader, name)
    assert seen.total("singleton.lock.not_acquired", reason="timeout") == 1
    assert seen.total("singleton.lock.not_acquired", reason="held") == 0
    assert seen.total("singleton.lock.attempts") == 2  # one per lock() call, whatever its wait's store calls
    holder.release()


def test_a_minimum_hold_is_slot_ran(reader: InMemoryMetricReader, runner: EventLoopThread | None,
                                    persister: Persister, name: str) -> None:
    if not persister.supports_min_hold:
        pytest.skip(f"{persister.backend} keeps no minimum hold")
    first = _lock(runner, name, persister, min_hold_seconds=60)
    assert first.lock() and first.release()
    assert _lock(runner, name, persister, min_hold_seconds=60).lock() is False
    seen = Seen(reader, name)
    assert seen.total("singleton.lock.not_acquired", reason="slot_ran") == 1
    assert seen.total("singleton.lock.released") == 1


def test_taking_over_an_expired_holder(reader: InMemoryMetricReader, runner: EventLoopThread | None,
                                       persister: Persister, name: str) -> None:
    stale = _lock(runner, name, persister, lock_expire_seconds=0.3)
    assert stale.lock()
    assert eventually(lambda: persister.get(name) is None), "the lock never expired by the store's clock"
    taker = _lock(runner, name, persister)
    assert taker.lock() is True
    seen = Seen(reader, name)
    assert seen.total("singleton.lock.acquired", takeover=True) == 1
    assert seen.total("singleton.lock.acquired", takeover=False) == 1
    assert stale.release() is False  # it learns at release that its hold is gone
    after = Seen(reader, name)
    assert after.total("singleton.lock.lost") == 1
    assert after.total("singleton.lock.released") == 0
    assert after.total("singleton.lock.active") == 1  # the taker's hold
    assert taker.release()
    assert Seen(reader, name).total("singleton.lock.active") == 0


def test_a_refused_renewal_is_lost_once(reader: InMemoryMetricReader, runner: EventLoopThread | None,
                                        persister: Persister, name: str) -> None:
    lock = _lock(runner, name, persister)
    assert lock.lock()
    assert persister.force_release(name) is not None
    assert lock.renew() is False
    assert lock.release() is False  # the loss is already counted: a hold ends once
    seen = Seen(reader, name)
    assert seen.total("singleton.lock.lost") == 1
    assert seen.total("singleton.lock.hold_duration") == 1
    assert seen.total("singleton.lock.released") == 0
    assert seen.total("singleton.lock.active") == 0


def test_every_instrument_has_the_lock_attributes(reader: InMemoryMetricReader, runner: EventLoopThread | None,
                                                  persister: Persister, store_kind: str, name: str) -> None:
    lock = _lock(runner, name, persister)
    assert lock.lock()
    assert _lock(runner, name, persister).lock() is False
    assert persister.force_release(name) is not None
    assert lock.renew() is False
    assert lock.lock() and lock.release()
    seen = Seen(reader, name)
    assert seen.instruments() == set(INSTRUMENTS)
    assert seen.stores() == {STORE_ATTRIBUTE[store_kind]}


# -- cancellation -------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["async"])
def test_a_cancelled_async_wait_is_cancelled(reader: InMemoryMetricReader, runner: EventLoopThread,
                                             persister: Persister, name: str) -> None:
    holder = _lock(runner, name, persister)
    assert holder.lock()
    waiter = AsyncSingleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)

    async def wait_then_cancel() -> bool:
        task = asyncio.ensure_future(waiter.lock(wait=600))
        while Seen(reader, name).total("singleton.lock.attempts") < 2:  # the waiter began: its attempt counted
            await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert runner.run(wait_then_cancel()) is True
    seen = Seen(reader, name)
    assert seen.total("singleton.lock.not_acquired", reason="cancelled") == 1
    assert seen.total("singleton.lock.not_acquired", reason="timeout") == 0
    assert not waiter.held
    holder.release()


@pytest.mark.parametrize("api", ["sync"])
def test_a_cancelled_blocking_wait_is_cancelled(reader: InMemoryMetricReader, persister: Persister, name: str) -> None:
    holder = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    assert holder.lock()
    cancel = threading.Event()
    waiter = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    answers: list[bool] = []
    thread = threading.Thread(target=lambda: answers.append(waiter.lock(wait=600, cancel=cancel)))
    thread.start()
    assert eventually(lambda: Seen(reader, name).total("singleton.lock.attempts") == 2)
    cancel.set()
    thread.join(60)
    assert answers == [False]
    assert Seen(reader, name).total("singleton.lock.not_acquired", reason="cancelled") == 1
    holder.release()


# -- detached leases -----------------------------------------------------------------------


def test_leases_record_acquired_not_acquired_and_released(reader: InMemoryMetricReader, runner: EventLoopThread | None,
                                                          persister: Persister, store_kind: str, name: str) -> None:
    if runner is None:
        lease, other = Lease(name, persister, lock_expire_seconds=30), Lease(name, persister, lock_expire_seconds=30)
        taken, refused = lease.take(), other.take()
        released, foreign = lease.release(), other.release()
    else:
        lease, other = AsyncLease(name, persister, lock_expire_seconds=30), AsyncLease(name, persister,
                                                                                       lock_expire_seconds=30)
        taken, refused = runner.run(lease.take()), runner.run(other.take())
        released, foreign = runner.run(lease.release()), runner.run(other.release())
    assert taken.acquired and not refused.acquired and released and not foreign
    seen = Seen(reader, name)
    assert seen.total("singleton.lock.attempts") == 2
    assert seen.total("singleton.lock.acquired", takeover=False) == 1
    assert seen.total("singleton.lock.not_acquired", reason="held") == 1
    assert seen.total("singleton.lock.released") == 1  # only the release the store confirmed
    assert seen.total("singleton.lock.active") == 0  # a lease's end may come elsewhere: no gauge of it
    assert seen.total("singleton.lock.hold_duration") == 0
    assert seen.stores() == {STORE_ATTRIBUTE[store_kind]}


def test_a_wait_until_free_takes_nothing_and_records_nothing(reader: InMemoryMetricReader, name: str) -> None:
    store = persisters.Memory()
    assert Lease(name, store).wait_until_free(wait=0) is None
    assert Seen(reader, name).points == []


# -- the settings and the recorder interface ------------------------------------------------


def test_configure_leaves_the_lock_name_out(reader: InMemoryMetricReader, name: str) -> None:
    private = InMemoryMetricReader()
    store = persisters.Memory()
    with metrics.using(metrics.OpenTelemetryRecorder(MeterProvider(metric_readers=[private]))):
        metrics.configure(include_lock_name=False)
        try:
            lock = Singleton(name, store)
            assert lock.lock() and lock.release()
        finally:
            metrics.configure(include_lock_name=None)
    assert Seen(private, name).points == []
    unnamed = Seen(private, None)
    assert unnamed.instruments() >= {"singleton.lock.attempts", "singleton.lock.acquired", "singleton.lock.released"}
    assert unnamed.stores() == {"memory"}
    assert all("lock.name" not in attributes for _, attributes, _ in unnamed.points)


def test_the_environment_leaves_the_lock_name_out() -> None:
    code = textwrap.dedent("""
        from opentelemetry import metrics as otel
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from singleton_integrations import Singleton, persisters
        reader = InMemoryMetricReader()
        otel.set_meter_provider(MeterProvider(metric_readers=[reader]))
        lock = Singleton("secret-customer-42", persisters.Memory())
        assert lock.lock() and lock.release()
        points = [dict(p.attributes) for rm in reader.get_metrics_data().resource_metrics
                  for sm in rm.scope_metrics for m in sm.metrics for p in m.data.data_points]
        assert points and all("lock.name" not in p and p["lock.store"] == "memory" for p in points), points
        print("ok")
    """)
    env = {**os.environ, "SINGLETON_METRICS_LOCK_NAME": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_replaced_recorder_hears_everything_and_the_default_nothing(reader: InMemoryMetricReader, name: str) -> None:
    heard: list[tuple[str, Any]] = []

    class Listening:
        def attempted(self, lock: metrics.LockInfo) -> None:
            heard.append(("attempted", lock.name))

        def acquired(self, lock: metrics.LockInfo, *, takeover: bool) -> None:
            heard.append(("acquired", takeover))

        def not_acquired(self, lock: metrics.LockInfo, *, reason: metrics.Reason) -> None:
            heard.append(("not_acquired", reason))

        def waited(self, lock: metrics.LockInfo, seconds: float) -> None:
            heard.append(("waited", seconds >= 0))

        def released(self, lock: metrics.LockInfo, *, held_seconds: float | None) -> None:
            heard.append(("released", held_seconds is not None and held_seconds >= 0))

        def lost(self, lock: metrics.LockInfo, *, held_seconds: float | None) -> None:
            heard.append(("lost", held_seconds))

    store = persisters.Memory()
    with metrics.using(Listening()) as listening:
        assert metrics.current() is listening
        lock = Singleton(name, store, metadata={"dag_id": "d"})
        assert lock.lock() and not Singleton(name, store).lock() and lock.release()
    assert metrics.current() is not listening
    assert heard == [("attempted", name), ("acquired", False), ("waited", True), ("attempted", name),
                     ("not_acquired", "held"), ("waited", True), ("released", True)]
    assert Seen(reader, name).points == []  # one path out: the replaced recorder did not also record


def test_use_returns_the_previous_recorder_and_checks_the_new_one() -> None:
    mine = metrics.NoRecorder()
    previous = metrics.use(mine)
    try:
        assert metrics.current() is mine
        with pytest.raises(TypeError, match="attempted"):
            metrics.use(object())  # type: ignore[arg-type]
        assert metrics.current() is mine
    finally:
        assert metrics.use(previous) is mine
    with pytest.raises(TypeError):
        metrics.configure(include_lock_name="no")  # type: ignore[arg-type]


def test_a_broken_recorder_never_breaks_the_lock(name: str) -> None:
    class Broken(metrics.NoRecorder):
        def acquired(self, lock: metrics.LockInfo, *, takeover: bool) -> None:
            raise RuntimeError("exporter down")

    with metrics.using(Broken()):
        lock = Singleton(name, persisters.Memory())
        assert lock.lock() is True
        assert lock.held and lock.release()


def test_without_opentelemetry_the_core_never_imports_it() -> None:
    code = textwrap.dedent("""
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Blocker())
        import asyncio
        from singleton_integrations import AsyncSingleton, Lease, Singleton, metrics, persisters
        store = persisters.Memory()
        lock = Singleton("job", store)
        assert lock.lock() and lock.release()
        lease = Lease("job", store)
        assert lease.take().acquired and lease.release()

        async def main():
            alock = AsyncSingleton("job", store)
            assert await alock.lock() and await alock.release()

        asyncio.run(main())
        assert isinstance(metrics.current(), metrics.NoRecorder)
        assert not [m for m in sys.modules if m.split(".")[0] == "opentelemetry"], "imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_module_doctest_runs() -> None:
    import doctest

    assert doctest.testmod(metrics).failed == 0


def test_other_recorders_read_the_same_lock_name_setting() -> None:
    assert metrics.include_lock_name() is True
    metrics.configure(include_lock_name=False)
    try:
        assert metrics.include_lock_name() is False
    finally:
        metrics.configure(include_lock_name=None)
    assert metrics.include_lock_name() is True
