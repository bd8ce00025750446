"""What every step-written persister shares: the drivers and the retention sweep.

A store's rules are written once as a generator of operations (``Steps``): each
yield is one store call, the driver sends back its answer or throws its error
in, and the generator's return value is the primitive's answer. Only the call
itself differs between the sync and the async face, so a store hands the driver
one function that makes one call, and the loop around it lives here once
(httpx's ``auth_flow`` idea). MongoDB and MySQL are written this way; see their
``_<store>_steps`` modules.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

from .._errors import PersisterError

__all__ = ["PURGE_BATCH", "Steps", "adrive", "asweep", "drive", "purge_limit", "sweep"]

_logger = logging.getLogger("singleton_integrations")
_Op = TypeVar("_Op")
_R = TypeVar("_R")

#: A primitive's rules: yields an operation, is sent its answer, returns the primitive's answer.
Steps = Generator[_Op, Any, _R]

#: How many idle names one sweep after a release deletes at most: a sweep must stay a short call.
PURGE_BATCH = 500


class _Turns:
    """Where a driven ``Steps`` is: the next operation, and the answer once it returns (``adrive``'s)."""

    __slots__ = ("_answerable", "_error", "_reply", "_steps", "answer")

    def __init__(self, steps: Generator[Any, Any, Any], answerable: Callable[[BaseException], bool]) -> None:
        self._steps, self._answerable = steps, answerable
        self._reply: Any = None
        self._error: BaseException | None = None
        self.answer: Any = None

    def next(self) -> Any:
        """The next operation, or ``_DONE`` once the steps returned (their value is ``answer``)."""
        error, self._error = self._error, None
        try:
            return self._steps.throw(error) if error is not None else self._steps.send(self._reply)
        except StopIteration as stop:
            self.answer = stop.value
            return _DONE

    def reply(self, reply: Any) -> None:
        self._reply = reply

    def fail(self, failure: Exception) -> None:
        """Hand ``failure`` to the steps if they answer it; re-raise it otherwise."""
        if not self._answerable(failure):
            raise failure
        self._reply, self._error = None, failure


_DONE = object()


def drive(steps: Generator[_Op, Any, _R], call: Callable[[_Op], Any],
          answerable: Callable[[BaseException], bool]) -> _R:
    """Run ``steps`` with blocking calls.

    An error for which ``answerable`` is true is thrown into the steps, which may
    answer it (a duplicate key means somebody else inserted first); any other
    error, such as a lost connection, ends the primitive at once.
    """
    # The loop of ``_Turns`` written out: this runs on every call of an embedded store, whose call is short.
    reply: Any = None
    failure: BaseException | None = None
    while True:
        try:
            op = steps.send(reply) if failure is None else steps.throw(failure)
        except StopIteration as stop:
            answer: _R = stop.value
            return answer
        failure = None
        try:
            reply = call(op)
        except Exception as error:  # re-raised unless the steps answer it
            if not answerable(error):
                raise
            reply, failure = None, error


async def adrive(steps: Generator[_Op, Any, _R], call: Callable[[_Op], Awaitable[Any]],
                 answerable: Callable[[BaseException], bool]) -> _R:
    """``drive`` for coroutines: the same loop, awaiting each call."""
    turns = _Turns(steps, answerable)
    while (op := turns.next()) is not _DONE:
        try:
            turns.reply(await call(op))
        except Exception as failure:  # noqa: BLE001 - fail() re-raises what the steps do not answer
            turns.fail(failure)
    answer: _R = turns.answer
    return answer


def purge_limit(limit: object) -> int:
    """``purge``'s batch size, checked the same way on every store."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"limit must be a positive int, not {limit!r}")
    return limit


def sweep(purge: Callable[[int], int], where: str) -> None:
    """The retention sweep that follows a release: it purges a batch and never fails the release."""
    try:
        _swept(purge(PURGE_BATCH), where)
    except PersisterError as error:
        _logger.debug("retention sweep of %s skipped: %s", where, error)


async def asweep(purge: Callable[[int], Awaitable[int]], where: str) -> None:
    """``sweep`` for coroutines."""
    try:
        _swept(await purge(PURGE_BATCH), where)
    except PersisterError as error:
        _logger.debug("retention sweep of %s skipped: %s", where, error)


def _swept(removed: int, where: str) -> None:
    if removed:
        _logger.info("purged %d idle lock names from %s", removed, where)
