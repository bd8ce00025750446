"""``@singleton(...)``: the function under ``@flow`` or ``@task`` runs in one place at a time.

The lock's outcome becomes the run's native state: Completed when it ran,
Completed named "Skipped" when another holder had the lock and
``on_conflict="skip"``, Failed with ``LockConflict`` for ``"fail"`` (and for
``"wait"`` past ``wait_timeout``), Failed with ``LockLost`` when exclusivity was
lost while running.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import string
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from singleton_integrations import AsyncSingleton, LockConflict, Singleton, validate_limit

from ._block import SingletonBlock
from ._context import current_run, run_logger
from ._lock import SingletonLock
from ._messages import fan_out

__all__ = ["BLOCK_CACHE_SECONDS_ENV", "OnConflict", "clear_block_cache", "current_lock", "singleton"]

OnConflict = Literal["skip", "fail", "wait"]
F = TypeVar("F", bound=Callable[..., Any])
LockName = str | Callable[[dict[str, Any]], str]

#: Seconds a block loaded by name is reused in a process before it is read again (default 60; 0: every run).
BLOCK_CACHE_SECONDS_ENV = "SINGLETON_BLOCK_CACHE_SECONDS"
_DEFAULT_BLOCK_CACHE_SECONDS = 60.0

# Module state is reached only through module functions, which pickle by reference:
# the wrappers below must stay picklable for flow.serve() and ProcessPoolTaskRunner.
_current: ContextVar[Singleton | AsyncSingleton | None] = ContextVar("prefect_blocks_current_lock", default=None)
_loaded: dict[str, tuple[float, SingletonBlock]] = {}
_loaded_guard = threading.Lock()


def current_lock() -> Singleton | AsyncSingleton | None:
    """The lock held for the innermost ``@singleton`` function running here (for its fencing token).

    A ``Singleton`` in sync functions, an ``AsyncSingleton`` in ``async`` ones.
    """
    return _current.get()


def clear_block_cache(name: str | None = None) -> None:
    """Forget blocks loaded by name (all, or ``name``), so the next run reads the saved block again."""
    with _loaded_guard:
        if name is None:
            _loaded.clear()
        else:
            _loaded.pop(name, None)


def singleton(
    block: SingletonBlock | str,
    lock_name: LockName | None = None,
    *,
    on_conflict: OnConflict = "skip",
    wait_timeout: float | None = None,
    lock_expire_seconds: float | None = None,
    min_hold_seconds: float | None = None,
    skipped_state_name: str = "Skipped",
    limit: int = 1,
) -> Callable[[F], F]:
    """Guard a flow's or task's function with a lock; put it under ``@flow`` / ``@task``.

    ``block``: a ``SingletonBlock`` or the name of a saved one (loaded on the first run in
    a process, then reused for ``SINGLETON_BLOCK_CACHE_SECONDS``; see ``clear_block_cache``).
    ``lock_name``: a template filled from the run's parameters (``"export-{region}"``),
    or a callable taking the parameters; default: the function's name.
    ``wait_timeout``: seconds to wait for a busy lock before the conflict outcome;
    default 0 for "skip" and "fail", forever for "wait".
    ``min_hold_seconds``: the name stays held that long after the acquisition even when the
    run ends sooner, so a scheduled slot runs once across deployments started seconds apart.
    ``skipped_state_name``: the name of a skip's Completed state; "Completed" lets the UI's
    deployment Runs tab list skips under its default filter (the message then starts "Skipped:").
    ``limit``: how many runs may hold the lock name at once, across deployments, servers and
    orchestrators (default 1); with all N held, ``on_conflict`` applies and the message names them all.
    """
    if on_conflict not in ("skip", "fail", "wait"):
        raise ValueError(f"on_conflict must be 'skip', 'fail' or 'wait', not {on_conflict!r}")
    if not isinstance(block, (SingletonBlock, str)):
        raise TypeError(f"block must be a SingletonBlock or a saved block's name, not {type(block).__name__}")
    if wait_timeout is not None and (isinstance(wait_timeout, bool) or not isinstance(wait_timeout, (int, float))
                                     or math.isnan(wait_timeout) or wait_timeout < 0):
        raise ValueError(f"wait_timeout must be zero or more seconds, not {wait_timeout!r}")
    if min_hold_seconds is not None and (isinstance(min_hold_seconds, bool)
                                         or not isinstance(min_hold_seconds, (int, float))
                                         or not math.isfinite(min_hold_seconds) or min_hold_seconds <= 0):
        raise ValueError(f"min_hold_seconds must be a positive number of seconds, not {min_hold_seconds!r}")
    if not isinstance(skipped_state_name, str) or not skipped_state_name.strip():
        raise ValueError(f"skipped_state_name must be a non-empty str, not {skipped_state_name!r}")
    limit = block.check_limit(limit) if isinstance(block, SingletonBlock) else validate_limit(limit)
    wait = wait_timeout if wait_timeout is not None else (math.inf if on_conflict == "wait" else None)

    def decorate(fn: F) -> F:
        from prefect import Flow, Task

        if isinstance(fn, (Flow, Task)):
            raise TypeError("put @singleton under @flow or @task, so the lock's outcome becomes the run's state")
        if not callable(fn):
            raise TypeError("@singleton decorates a function")
        _lock_namer(lock_name if lock_name is not None else fn.__name__, inspect.signature(fn), fn)  # check now
        guard = _Guard(block, lock_name if lock_name is not None else fn.__name__, on_conflict, wait,
                       lock_expire_seconds, min_hold_seconds, skipped_state_name, limit)

        # The wrappers refer to module functions only (pickled by reference) and to
        # ``guard`` and ``fn`` (pickled by value with the flow or task).
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                return await _run_guarded_async(guard, fn, args, kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            return _run_guarded(guard, fn, args, kwargs)

        return run  # type: ignore[return-value]

    return decorate


@dataclass(frozen=True)
class _Guard:
    """What a guarded call needs: plain, picklable configuration."""

    block: SingletonBlock | str
    lock_name: LockName
    on_conflict: OnConflict
    wait: float | None
    lock_expire_seconds: float | None
    min_hold_seconds: float | None
    skipped_state_name: str
    limit: int = 1

    def lock_for(self, block: SingletonBlock, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = _lock_namer(self.lock_name, inspect.signature(fn), fn)(args, kwargs)
        return SingletonLock(block, name, wait=self.wait, lock_expire_seconds=self.lock_expire_seconds,
                             min_hold_seconds=self.min_hold_seconds, log_conflict=False, limit=self.limit)


@contextmanager
def _current_lock(held: Singleton | AsyncSingleton) -> Iterator[None]:
    """``current_lock()`` answers ``held`` inside the guarded call, and what it answered before after it."""
    token = _current.set(held)
    try:
        yield
    finally:
        _current.reset(token)


def _skip(guard: _Guard, conflict: LockConflict, fn: Callable[..., Any]) -> Any:
    """What a skipped call returns (``on_conflict="skip"``), after the fan-out warning if it applies."""
    _warn_if_fanned_out(conflict, fn)
    return _skipped(conflict, guard.skipped_state_name)


def _run_guarded(guard: _Guard, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        with guard.lock_for(_load(guard.block), fn, args, kwargs) as held, _current_lock(held):
            return fn(*args, **kwargs)
    except LockConflict as conflict:
        if guard.on_conflict != "skip":
            raise  # the engine records Failed with the LockConflict
        return _skip(guard, conflict, fn)


async def _run_guarded_async(guard: _Guard, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        async with guard.lock_for(await _aload(guard.block), fn, args, kwargs) as held:
            with _current_lock(held):
                return await fn(*args, **kwargs)
    except LockConflict as conflict:
        if guard.on_conflict != "skip":
            raise  # the engine records Failed with the LockConflict
        return _skip(guard, conflict, fn)


def _warn_if_fanned_out(conflict: LockConflict, fn: Callable[..., Any]) -> None:
    """A task run skipped by a task run of its own flow run is a fan-out on one lock name: say so.

    ``.map()`` or ``.submit()`` over a ``@singleton`` task whose lock name names no
    parameter gives every item the same lock: all but one end "Skipped" while the
    flow run is Completed. The skip is right; only the lock name is wrong.
    """
    holder = conflict.holder
    if holder is None:
        return
    run = current_run()
    theirs = holder.metadata.get("prefect_task_run_id")
    if not run.task_run_id or not theirs or theirs == run.task_run_id:
        return
    if holder.metadata.get("prefect_flow_run_id") != run.flow_run_id:
        return
    parameters = list(inspect.signature(fn).parameters)
    recipe = f"{fn.__name__}-{{{parameters[0]}}}" if parameters else "item-{i}"
    run_logger().warning("%s", fan_out(conflict.name, holder, run.task_run_name, recipe, conflict.limit))


def _skipped(conflict: LockConflict, state_name: str) -> Any:
    """Completed, named "Skipped": another holder doing the work is success, not failure.

    The message is said once: Prefect logs it with the final state.
    """
    from prefect.states import Completed

    message = str(conflict) if state_name == "Skipped" else f"Skipped: {conflict}"
    return Completed(name=state_name, message=message)


def _cache_seconds() -> float:
    text = os.environ.get(BLOCK_CACHE_SECONDS_ENV, "")
    try:
        return max(float(text), 0.0) if text.strip() else _DEFAULT_BLOCK_CACHE_SECONDS
    except ValueError:
        raise ValueError(f"{BLOCK_CACHE_SECONDS_ENV} must be a number of seconds, not {text!r}") from None


def _cached(name: str) -> SingletonBlock | None:
    with _loaded_guard:
        found = _loaded.get(name)
    if found is None or time.monotonic() - found[0] >= _cache_seconds():
        return None
    return found[1]


def _remember(name: str, block: SingletonBlock) -> SingletonBlock:
    with _loaded_guard:
        _loaded[name] = (time.monotonic(), block)
    return block


def _load(block: SingletonBlock | str) -> SingletonBlock:
    if isinstance(block, SingletonBlock):
        return block
    return _cached(block) or _remember(block, SingletonBlock.load(block, _sync=True))  # type: ignore[call-arg,arg-type]


async def _aload(block: SingletonBlock | str) -> SingletonBlock:
    if isinstance(block, SingletonBlock):
        return block
    return _cached(block) or _remember(block, await SingletonBlock.aload(block))


def _lock_namer(lock_name: LockName, signature: inspect.Signature, fn: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], str]:
    """Check the template against the function's parameters now, fill it per run."""
    if callable(lock_name):
        def from_callable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
            name = lock_name(_parameters(signature, args, kwargs))
            if not isinstance(name, str):
                raise TypeError(f"the lock_name callable must return a str, not {type(name).__name__}")
            return name

        return from_callable
    if not isinstance(lock_name, str):
        raise TypeError(f"lock_name must be a str template or a callable, not {type(lock_name).__name__}")
    fields = {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(lock_name) if field is not None}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(f for f in fields if f not in signature.parameters and not takes_any)
    if "" in fields or any(f.isdigit() for f in fields):
        raise ValueError(f"lock_name {lock_name!r} must name parameters, as in 'export-{{region}}'")
    if unknown:
        raise ValueError(f"lock_name {lock_name!r} names {', '.join(unknown)}, not parameters of {fn.__name__}()")
    if not fields:
        return lambda args, kwargs: lock_name

    def from_template(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return lock_name.format_map(_parameters(signature, args, kwargs))

    return from_template


def _parameters(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            values.update(values.pop(parameter.name, {}))
    return values

