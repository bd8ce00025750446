"""Lock metrics through Airflow's ``Stats`` (StatsD, or OpenTelemetry as Airflow is configured), while a task runs.

The core tells one ``singleton_integrations.metrics.Recorder`` per process about every
acquisition and hold. While a guarded task runs, ``StatsRecorder`` is that recorder,
so its locks' measurements leave the process the way Airflow's own metrics do (same
names as the core's instruments, ``singleton.lock.acquired`` ...), and through that
one path only: the default (OpenTelemetry) recorder is set aside meanwhile, and comes
back when the task's method returns.

Tags: ``lock_name`` (unless ``metrics.include_lock_name()`` says no), ``dag_id`` and
``task_id`` from the holder metadata the task writes, ``store``, and ``reason`` or
``takeover`` where the core gives them. StatsD drops tags unless Airflow's
``statsd_datadog_enabled`` or ``statsd_influxdb_enabled`` is on.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from singleton_integrations import metrics
from singleton_integrations.metrics import INSTRUMENTS, LockInfo

__all__ = ["StatsRecorder", "recording_stats", "stats_recording"]

_log = logging.getLogger(__name__)
#: Characters Airflow's StatsD names refuse (letters, digits and ``_.-/`` pass).
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]")
_F = TypeVar("_F", bound=Callable[..., Any])


def _stats() -> Any:
    try:
        from airflow.sdk.observability.stats import Stats
    except ImportError:  # Airflow before the Task SDK's observability module
        from airflow.stats import Stats
    return Stats


class StatsRecorder:
    """A ``metrics.Recorder`` that emits through Airflow's ``Stats``; it never raises into the lock's code."""

    def __init__(self) -> None:
        self._stats = _stats()

    def _tags(self, lock: LockInfo, **extra: Any) -> dict[str, str]:
        tags = {"store": lock.store}
        if metrics.include_lock_name():
            tags["lock_name"] = lock.name
        for key in ("dag_id", "task_id"):
            if lock.metadata.get(key):
                tags[key] = lock.metadata[key]
        tags.update({key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in extra.items()})
        # Airflow drops a whole measurement whose tags (written into the name for InfluxDB) hold other characters.
        return {key: _TAG_UNSAFE.sub("_", value) for key, value in tags.items()}

    def _emit(self, kind: str, key: str, value: float | None, tags: dict[str, str]) -> None:
        try:
            if kind == "incr":
                self._stats.incr(INSTRUMENTS[key], tags=tags)
            else:  # a duration, in milliseconds as StatsD timers are
                self._stats.timing(INSTRUMENTS[key], max(value or 0.0, 0.0) * 1000.0, tags=tags)
        except Exception:  # noqa: BLE001  (a metrics backend must never fail a lock)
            _log.debug("could not emit %s", INSTRUMENTS[key], exc_info=True)

    def attempted(self, lock: LockInfo) -> None:
        self._emit("incr", "attempts", None, self._tags(lock))

    def acquired(self, lock: LockInfo, *, takeover: bool) -> None:
        self._emit("incr", "acquired", None, self._tags(lock, takeover=takeover))

    def not_acquired(self, lock: LockInfo, *, reason: metrics.Reason) -> None:
        self._emit("incr", "not_acquired", None, self._tags(lock, reason=reason))

    def waited(self, lock: LockInfo, seconds: float) -> None:
        self._emit("timing", "wait_duration", seconds, self._tags(lock))

    def released(self, lock: LockInfo, *, held_seconds: float | None) -> None:
        self._ended("released", lock, held_seconds)

    def lost(self, lock: LockInfo, *, held_seconds: float | None) -> None:
        self._ended("lost", lock, held_seconds)

    def _ended(self, key: str, lock: LockInfo, held_seconds: float | None) -> None:
        tags = self._tags(lock)
        self._emit("incr", key, None, tags)
        if held_seconds is not None:
            self._emit("timing", "hold_duration", held_seconds, tags)


@contextmanager
def stats_recording() -> Iterator[StatsRecorder]:
    """``StatsRecorder`` as the process's recorder for a block; the previous one comes back at its end."""
    with metrics.using(StatsRecorder()) as recorder:
        yield recorder


def recording_stats(method: _F) -> _F:
    """Run an operator method (``execute``, ``execute_complete``) with its locks' metrics going to ``Stats``."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stats_recording():
            return method(*args, **kwargs)

    return cast(_F, wrapper)
