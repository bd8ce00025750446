"""What every rule mixin stands on: the fixtures, the two faces of the lock, and the capability checks."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar, NoReturn

import pytest

from ... import AsyncSingleton, Singleton, persisters
from ...persisters import Persister
from ._helpers import APIS, AsyncDriven, EventLoopThread, eventually, noting, read_fact, spawn_role

__all__ = ["ConformanceKit"]

#: Why a rule cannot run on a store that lacks a capability, as the skip (or failure) says it.
_LACKING = {
    "multiprocess": "{backend} lives inside one process",
    "distributed": "{backend} judges expiry by {clock}, which every client shares",
    "supports_min_hold": "{backend} does not declare supports_min_hold",
    "fair": "{backend} does not queue waiters: a free name goes to whoever asks first",
    "notifies": "{backend} cannot notify; waiting polls every {poll_interval} s",
    "limits": "{backend} keeps one hold of a name at a time (limits is False)",
}


class ConformanceKit:
    """The fixtures and helpers the rule mixins share; a test class needs only a ``store_url`` fixture.

    Compose it through the mixins (``CoreRules``, ``Renewal``, ...), never alone: it holds no rule.
    """

    api = "sync"
    runner: EventLoopThread | None = None
    #: A class that composes a mixin claims that the store has what the mixin needs, so a store
    #: that does not declare it (``fair``, ``supports_min_hold``, ...) fails the mixin's rules.
    #: ``PersisterConformance`` composes every mixin for every store, so it sets this and skips
    #: what a store does not declare instead.
    skip_undeclared: ClassVar[bool] = False
    #: The ``Persister`` flags every rule a mixin defines needs; each mixin declares its own.
    needs: ClassVar[tuple[str, ...]] = ()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Each case that drives a lock runs on both APIs; ``not_per_api`` cases run once."""
        if "api" in metafunc.fixturenames:
            apis = getattr(metafunc.function, "_conformance_apis", APIS)
            metafunc.parametrize("api", apis, indirect=True, scope="function")

    # -- fixtures ---------------------------------------------------------------

    @pytest.fixture(name="api")
    def _api(self, request: pytest.FixtureRequest) -> str:
        return str(getattr(request, "param", "sync"))

    @pytest.fixture(autouse=True)
    def _drive(self, api: str) -> Iterator[None]:
        """``singleton()`` builds the API this run is for; async ones run on a loop of their own."""
        self.api = api
        self.runner = EventLoopThread() if api == "async" else None
        yield
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    @pytest.fixture
    def persister(self, store_url: str, _drive: None) -> Iterator[Persister]:
        persister = persisters.from_url(store_url)
        yield persister
        if self.runner is not None:
            self.runner.run(persister.aclose(), timeout=30)
        persister.close()

    @pytest.fixture
    def name(self) -> str:
        return f"conformance-{uuid.uuid4().hex}"

    @pytest.fixture
    def processes(self) -> Iterator[list[subprocess.Popen[str]]]:
        started: list[subprocess.Popen[str]] = []
        yield started
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()

    # -- the lock and its events ---------------------------------------------------

    def singleton(self, name: str, persister: Persister, **options: Any) -> Any:
        """A ``Singleton``, or an ``AsyncSingleton`` behind ``AsyncDriven`` in the async run."""
        options.setdefault("lock_expire_seconds", 30)
        options.setdefault("release_on_sigterm", False)
        if self.runner is None:
            return Singleton(name, persister, **options)
        return AsyncDriven(AsyncSingleton(name, persister, **options), self.runner)

    @staticmethod
    def record_events(singleton: Singleton) -> list[tuple[str, Any]]:
        seen: list[tuple[str, Any]] = []
        for event in ("locking", "locked", "conflict", "expired", "releasing", "released", "error", "renewed", "lost"):
            singleton.on(event, noting(seen, event))
        return seen

    @staticmethod
    def wait_until_expired(persister: Persister, name: str) -> None:
        assert eventually(lambda: persister.get(name) is None), "the lock never expired by the store's clock"

    @staticmethod
    def start_holder(processes: list[subprocess.Popen[str]], role: str, name: str, store_url: str,
                     **args: Any) -> subprocess.Popen[str]:
        """A child process playing ``role`` (see ``_child``) that has taken ``name``; the test's fixture ends it."""
        child = spawn_role(role, {"name": name, "url": store_url, **args})
        processes.append(child)
        fact = read_fact(child)
        assert fact["acquired"] is True, fact
        return child

    # -- what the store claims ------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _claimed(self, request: pytest.FixtureRequest) -> None:
        """Before a rule runs, the store must declare what the mixin that holds the rule ``needs``."""
        rule = request.function.__name__
        mixin = next((cls for cls in type(self).__mro__ if rule in vars(cls)), None)
        needs: tuple[str, ...] = vars(mixin).get("needs", ()) if mixin is not None else ()
        if needs:
            persister = request.getfixturevalue("persister")
            for capability in needs:
                self.need(persister, capability)

    def need(self, persister: Persister, capability: str, lacking: str | None = None) -> None:
        """The store declares ``capability`` (a ``Persister`` flag), or the rule is skipped or failed (``undeclared``)."""
        if not getattr(persister, capability):
            reason = lacking or _LACKING[capability]
            self.undeclared(capability, reason.format(backend=persister.backend, clock=persister.clock,
                                                      poll_interval=persister.poll_interval))

    def undeclared(self, capability: str, reason: str) -> NoReturn:
        """A rule needs ``capability`` and the store lacks it (``reason``): skipped where every mixin is composed,
        failed where the test class claimed it by composing the mixin."""
        if self.skip_undeclared:
            pytest.skip(reason)
        pytest.fail(f"{type(self).__name__} composes a mixin that claims {capability}, but {reason}: "
                    "declare it, or leave out the mixin that needs it", pytrace=False)

    @staticmethod
    def faketime(offset: str) -> tuple[str, ...]:
        """A command prefix that runs a child with its wall clock moved by ``offset`` (libfaketime's ``+2h`` form).

        It preloads libfaketime itself rather than running Debian's ``faketime`` wrapper: the
        wrapper names a shared-memory semaphore after its pid and leaves it behind when it is
        killed, so a later wrapper given the same pid fails ("sem_open: File exists").
        """
        faketime = shutil.which("faketime")
        libraries = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1")
                           + glob.glob("/usr/local/lib/faketime/libfaketime.so.1"))
        if faketime is None or not libraries:
            if os.environ.get("CI") == "true":
                pytest.fail("faketime is not installed (apt-get install faketime)")
            pytest.skip("faketime is not installed (apt-get install faketime)")
        return ("env", f"LD_PRELOAD={libraries[0]}", f"FAKETIME={offset}")
