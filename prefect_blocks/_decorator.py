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
import string
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Literal, TypeVar

from singleton_integrations import LockConflict, Singleton

from ._block import SingletonBlock
from ._context import run_logger

__all__ = ["OnConflict", "current_lock", "singleton"]

OnConflict = Literal["skip", "fail", "wait"]
F = TypeVar("F", bound=Callable[..., Any])
LockName = str | Callable[[dict[str, Any]], str]

_current: ContextVar[Singleton | None] = ContextVar("prefect_blocks_current_lock", default=None)


def current_lock() -> Singleton | None:
    """The lock held for the innermost ``@singleton`` function running here (for its fencing token)."""
    return _current.get()


def singleton(
    block: SingletonBlock | str,
    lock_name: LockName | None = None,
    *,
    on_conflict: OnConflict = "skip",
    wait_timeout: float | None = None,
    lock_expire_seconds: float | None = None,
) -> Callable[[F], F]:
    """Guard a flow's or task's function with a lock; put it under ``@flow`` / ``@task``.

    ``block``: a ``SingletonBlock`` or the name of a saved one (loaded at run time).
    ``lock_name``: a template filled from the run's parameters (``"export-{region}"``),
    or a callable taking the parameters; default: the function's name.
    ``wait_timeout``: seconds to wait for a busy lock before the conflict outcome;
    default 0 for "skip" and "fail", forever for "wait".
    """
    if on_conflict not in ("skip", "fail", "wait"):
        raise ValueError(f"on_conflict must be 'skip', 'fail' or 'wait', not {on_conflict!r}")
    if not isinstance(block, (SingletonBlock, str)):
        raise TypeError(f"block must be a SingletonBlock or a saved block's name, not {type(block).__name__}")
    if wait_timeout is not None and (isinstance(wait_timeout, bool) or not isinstance(wait_timeout, (int, float))
                                     or math.isnan(wait_timeout) or wait_timeout < 0):
        raise ValueError(f"wait_timeout must be zero or more seconds, not {wait_timeout!r}")
    wait = wait_timeout if wait_timeout is not None else (math.inf if on_conflict == "wait" else None)

    def decorate(fn: F) -> F:
        from prefect import Flow, Task

        if isinstance(fn, (Flow, Task)):
            raise TypeError("put @singleton under @flow or @task, so the lock's outcome becomes the run's state")
        if not callable(fn):
            raise TypeError("@singleton decorates a function")
        signature = inspect.signature(fn)
        name_of = _lock_namer(lock_name if lock_name is not None else fn.__name__, signature, fn)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                resolved = await _aload(block)
                try:
                    async with resolved.lock(name_of(args, kwargs), wait=wait,
                                             lock_expire_seconds=lock_expire_seconds) as held:
                        token = _current.set(held.sync)
                        try:
                            return await fn(*args, **kwargs)
                        finally:
                            _current.reset(token)
                except LockConflict as conflict:
                    if on_conflict != "skip":
                        raise  # the engine records Failed with the LockConflict
                    return _skipped(conflict)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            resolved = _load(block)
            try:
                with resolved.lock(name_of(args, kwargs), wait=wait, lock_expire_seconds=lock_expire_seconds) as held:
                    token = _current.set(held)
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        _current.reset(token)
            except LockConflict as conflict:
                if on_conflict != "skip":
                    raise  # the engine records Failed with the LockConflict
                return _skipped(conflict)

        return run  # type: ignore[return-value]

    return decorate


def _skipped(conflict: LockConflict) -> Any:
    """Completed, named "Skipped": another holder doing the work is success, not failure."""
    from prefect.states import Completed

    message = f"Skipped: {conflict}"
    run_logger().info("%s", message)
    return Completed(name="Skipped", message=message)


def _load(block: SingletonBlock | str) -> SingletonBlock:
    if isinstance(block, SingletonBlock):
        return block
    return SingletonBlock.load(block, _sync=True)  # type: ignore[call-arg,return-value]


async def _aload(block: SingletonBlock | str) -> SingletonBlock:
    if isinstance(block, SingletonBlock):
        return block
    return await SingletonBlock.aload(block)


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

