"""Metrics of every lock, through one listener: the core calls a ``Recorder``, and one recorder per process listens.

ShedLock's shape: the core emits in one place (the waiting loop and the hold's
state changes), and an exporter is a ``Recorder``. The default one records
through OpenTelemetry's global ``MeterProvider`` when ``opentelemetry-api`` is
installed (``pip install singleton-integrations[otel]``), and nothing otherwise,
at the cost of a method call that does nothing. An integration whose host has its
own metrics (Airflow's ``Stats``) installs its own recorder with ``use``, so each
measurement has one path out of the process.

>>> from singleton_integrations import metrics
>>> class Attempts:
...     count = 0
...     def attempted(self, lock): self.count += 1
...     def acquired(self, lock, *, takeover): pass
...     def not_acquired(self, lock, *, reason): pass
...     def waited(self, lock, seconds): pass
...     def released(self, lock, *, held_seconds): pass
...     def lost(self, lock, *, held_seconds): pass
>>> from singleton_integrations import Singleton, persisters
>>> with metrics.using(Attempts()) as counting:
...     Singleton("metered", persisters.Memory()).lock()
True
>>> counting.count
1
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = [
    "INSTRUMENTS",
    "LOCK_NAME_VARIABLE",
    "REASONS",
    "LockInfo",
    "NoRecorder",
    "OpenTelemetryRecorder",
    "Reason",
    "Recorder",
    "active",
    "configure",
    "current",
    "include_lock_name",
    "use",
    "using",
]

#: Why an attempt ended without the name: a live holder (one look), a minimum hold that
#: keeps a released name (the slot already ran), a wait that ran out, a cancelled wait,
#: or a store that failed (the error is raised to the caller as well).
Reason = Literal["held", "slot_ran", "timeout", "cancelled", "error"]
REASONS: tuple[Reason, ...] = ("held", "slot_ran", "timeout", "cancelled", "error")

#: The instruments' names, shared by every recorder so dashboards work whichever exports them.
INSTRUMENTS = {
    "attempts": "singleton.lock.attempts",
    "acquired": "singleton.lock.acquired",
    "not_acquired": "singleton.lock.not_acquired",
    "released": "singleton.lock.released",
    "lost": "singleton.lock.lost",
    "wait_duration": "singleton.lock.wait_duration",
    "hold_duration": "singleton.lock.hold_duration",
    "active": "singleton.lock.active",
}

#: ``SINGLETON_METRICS_LOCK_NAME=false`` leaves the lock's name out of every measurement.
LOCK_NAME_VARIABLE = "SINGLETON_METRICS_LOCK_NAME"


@dataclass(frozen=True)
class LockInfo:
    """Which lock a measurement is about; built once per lock object, not per call."""

    #: The lock's name.
    name: str
    #: The store's kind, as its URL scheme: ``redis``, ``postgresql``, ``sqlite``, ``memory``, ``mongodb``, ``mysql``...
    store: str
    #: The metadata every hold of this object records (an integration's holder: a DAG and task id, a flow run).
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False)
    #: True for a ``Singleton``: this process follows each hold to its end, so every ``acquired`` is
    #: followed by exactly one ``released`` or ``lost``. False for a ``Lease``, whose end may come in
    #: another process or by expiry: count it in no gauge of live holds.
    follows_hold: bool = True


class Recorder(Protocol):
    """What the core tells a process's recorder; each method must be quick, thread-safe and never raise.

    Per acquisition (``lock()``, ``take()``): ``attempted``, then ``acquired`` or
    ``not_acquired``, then ``waited`` with how long it took. Per hold that
    ``follows_hold``: ``released`` or ``lost``, once.
    """

    def attempted(self, lock: LockInfo) -> None:
        """An acquisition began (one per ``lock()`` or ``take()``, however many store calls its wait makes)."""

    def acquired(self, lock: LockInfo, *, takeover: bool) -> None:
        """It took the name; ``takeover``: from a holder whose lease had ended."""

    def not_acquired(self, lock: LockInfo, *, reason: Reason) -> None:
        """It ended without the name, for ``reason``."""

    def waited(self, lock: LockInfo, seconds: float) -> None:
        """How long the acquisition took, taken or not (one store call's time when it did not wait)."""

    def released(self, lock: LockInfo, *, held_seconds: float | None) -> None:
        """The store confirmed a release; ``held_seconds`` since the acquire was sent (None: taken elsewhere)."""

    def lost(self, lock: LockInfo, *, held_seconds: float | None) -> None:
        """A hold ended without a release: it expired, was taken over, or its renewals failed too long."""


class NoRecorder:
    """Records nothing: the recorder when OpenTelemetry is not installed."""

    __slots__ = ()

    def attempted(self, lock: LockInfo) -> None:
        pass

    def acquired(self, lock: LockInfo, *, takeover: bool) -> None:
        pass

    def not_acquired(self, lock: LockInfo, *, reason: Reason) -> None:
        pass

    def waited(self, lock: LockInfo, seconds: float) -> None:
        pass

    def released(self, lock: LockInfo, *, held_seconds: float | None) -> None:
        pass

    def lost(self, lock: LockInfo, *, held_seconds: float | None) -> None:
        pass


#: Seconds: from a store call (milliseconds) to a day-long wait or hold. OpenTelemetry's
#: default buckets are for milliseconds, which would put every wait in the first two.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            1800.0, 3600.0, 7200.0, 21600.0, 86400.0)


class OpenTelemetryRecorder:
    """Records through an OpenTelemetry ``MeterProvider`` (the global one unless given), meter ``singleton_integrations``.

    Every measurement carries ``lock.name`` (unless left out, see ``configure``) and
    ``lock.store``; ``acquired`` adds ``takeover``, ``not_acquired`` adds ``reason``.
    The global provider may be set after this is built: OpenTelemetry's proxy
    instruments start recording once it is.
    """

    def __init__(self, meter_provider: MeterProvider | None = None, *, include_lock_name: bool | None = None) -> None:
        """``include_lock_name`` None follows ``configure``, else ``SINGLETON_METRICS_LOCK_NAME`` as read at the first measurement."""
        from opentelemetry import metrics as otel

        from . import __version__

        meter = otel.get_meter("singleton_integrations", __version__, meter_provider)
        self._include_lock_name = include_lock_name
        made = {key: _instrument(meter, key, *how) for key, how in _HOW.items()}
        self._attempts, self._acquired, self._not_acquired = made["attempts"], made["acquired"], made["not_acquired"]
        self._released, self._lost, self._active = made["released"], made["lost"], made["active"]
        self._wait, self._hold = made["wait_duration"], made["hold_duration"]
        self._made: dict[tuple[str | None, str, tuple[str, object] | None], dict[str, Any]] = {}

    def _attributes(self, lock: LockInfo, extra: tuple[str, object] | None = None) -> dict[str, Any]:
        """A measurement's attributes, built once per lock and kept: four measurements a cycle
        would otherwise build a dict each (OpenTelemetry only reads them)."""
        include = self._include_lock_name
        if include is None:
            include = _settings.include_lock_name()
        key = (lock.name if include else None, lock.store, extra)
        attributes = self._made.get(key)
        if attributes is None:
            attributes = {"lock.name": lock.name, "lock.store": lock.store} if include else {"lock.store": lock.store}
            if extra is not None:
                attributes[extra[0]] = extra[1]
            if len(self._made) >= _ATTRIBUTES_KEPT:
                self._made = {}
            self._made[key] = attributes
        return attributes

    def attempted(self, lock: LockInfo) -> None:
        self._attempts.add(1, self._attributes(lock))

    def acquired(self, lock: LockInfo, *, takeover: bool) -> None:
        if lock.follows_hold:
            self._active.add(1, self._attributes(lock))
        self._acquired.add(1, self._attributes(lock, ("takeover", takeover)))

    def not_acquired(self, lock: LockInfo, *, reason: Reason) -> None:
        self._not_acquired.add(1, self._attributes(lock, ("reason", reason)))

    def waited(self, lock: LockInfo, seconds: float) -> None:
        self._wait.record(max(seconds, 0.0), self._attributes(lock))

    def released(self, lock: LockInfo, *, held_seconds: float | None) -> None:
        self._ended(self._released, lock, held_seconds)

    def lost(self, lock: LockInfo, *, held_seconds: float | None) -> None:
        self._ended(self._lost, lock, held_seconds)

    def _ended(self, counter: Any, lock: LockInfo, held_seconds: float | None) -> None:
        attributes = self._attributes(lock)
        counter.add(1, attributes)
        if held_seconds is not None:
            self._hold.record(max(held_seconds, 0.0), attributes)
        if lock.follows_hold:
            self._active.add(-1, attributes)


#: Attribute sets a recorder keeps (per lock name and outcome); past it the cache starts over,
#: so a process with generated lock names keeps no more than this.
_ATTRIBUTES_KEPT = 1024

#: Each instrument's kind, unit and description.
_HOW = {
    "attempts": ("counter", "{attempt}", "Acquisitions begun (lock() or take() calls)"),
    "acquired": ("counter", "{acquisition}", "Acquisitions that took the name"),
    "not_acquired": ("counter", "{acquisition}", "Acquisitions that ended without the name"),
    "released": ("counter", "{release}", "Releases the store confirmed"),
    "lost": ("counter", "{hold}", "Holds that ended without a release"),
    "active": ("up_down_counter", "{hold}", "Holds this process has and follows to their end (Singleton)"),
    "wait_duration": ("histogram", "s", "How long an acquisition took, taken or not"),
    "hold_duration": ("histogram", "s", "How long a hold lasted, to its release or loss"),
}


def _instrument(meter: Any, key: str, kind: str, unit: str, description: str) -> Any:
    make = getattr(meter, f"create_{kind}")
    if kind == "histogram":
        try:  # bucket advice came with opentelemetry-api 1.23
            return make(INSTRUMENTS[key], unit=unit, description=description,
                        explicit_bucket_boundaries_advisory=list(_BUCKETS))
        except TypeError:
            pass
    return make(INSTRUMENTS[key], unit=unit, description=description)


# -- the process's recorder ----------------------------------------------------------------


class _Settings:
    """``configure``'s choices; unset ones come from the environment."""

    def __init__(self) -> None:
        self.lock_name: bool | None = None

    def include_lock_name(self) -> bool:
        if self.lock_name is None:
            # Only a clear "no" leaves names out: a typo must not silently drop a dashboard's series.
            value = os.environ.get(LOCK_NAME_VARIABLE, "true").strip().lower()
            self.lock_name = value not in ("false", "0", "no", "off")
        return self.lock_name


_settings = _Settings()
_guard = threading.Lock()
_recorder: Recorder | None = None  # None until the first measurement decides


def configure(*, include_lock_name: bool | None = None) -> None:
    """Process-wide settings of the default recorder.

    ``include_lock_name=False`` leaves ``lock.name`` out of every measurement, for
    processes with many or generated lock names (each name is a time series); None
    goes back to ``SINGLETON_METRICS_LOCK_NAME`` (default true).
    """
    if include_lock_name is not None and not isinstance(include_lock_name, bool):
        raise TypeError(f"include_lock_name must be a bool or None, not {type(include_lock_name).__name__}")
    _settings.lock_name = include_lock_name


def include_lock_name() -> bool:
    """Whether measurements carry ``lock.name``: ``configure``'s choice, else ``SINGLETON_METRICS_LOCK_NAME``.

    For recorders other than the default, so one setting rules every path out.
    """
    return _settings.include_lock_name()


def current() -> Recorder:
    """The process's recorder: the one ``use`` installed, else OpenTelemetry's when importable, else ``NoRecorder``."""
    recorder = _recorder
    if recorder is None:
        with _guard:
            if _recorder is None:
                _install(_default())
            recorder = _recorder
            assert recorder is not None
    return recorder


def active() -> Recorder | None:
    """The process's recorder, or None when it records nothing: the core then skips a measurement's work."""
    recorder = current()
    return None if type(recorder) is NoRecorder else recorder


def _install(recorder: Recorder) -> None:
    global _recorder
    _recorder = recorder


def _default() -> Recorder:
    try:
        import opentelemetry.metrics  # noqa: F401 - only whether it is there; imported once
    except ImportError:
        return NoRecorder()
    return OpenTelemetryRecorder()


_Rec = TypeVar("_Rec", bound=Recorder)


def use(recorder: Recorder | None) -> Recorder | None:
    """Make ``recorder`` the process's recorder (None: the default again); returns the one it replaces.

    For an integration that emits through its host's metrics instead (Airflow's
    ``Stats``), so nothing is counted twice.
    """
    for method in ("attempted", "acquired", "not_acquired", "waited", "released", "lost"):
        if recorder is not None and not callable(getattr(recorder, method, None)):
            raise TypeError(f"a recorder needs a {method}() method; {type(recorder).__name__} has none")
    global _recorder
    with _guard:
        previous, _recorder = _recorder, recorder
    return previous


@contextlib.contextmanager
def using(recorder: _Rec) -> Iterator[_Rec]:
    """``use`` for a block: the previous recorder comes back at its end."""
    previous = use(recorder)
    try:
        yield recorder
    finally:
        use(previous)
