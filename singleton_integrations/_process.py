"""Process-wide duties of held locks: release on SIGTERM and at exit, forget in a forked child.

Releasing at exit has one deadline for every held lock together
(``EXIT_RELEASE_SECONDS``), and the releases run in parallel: a hung store costs
the process at most that long to exit, however many locks it holds. A lock not
released by then (or after SIGKILL, which no handler sees) stays held on the
store until its lease (``lock_expire_seconds``) or its minimum hold ends.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ._events import logger

if TYPE_CHECKING:
    from ._record import LockRecord
    from .persisters._base import Persister

__all__ = ["EXIT_RELEASE_SECONDS", "ExitHeld", "after_exit_release", "register", "release_all", "unregister"]

#: The most that releasing every held lock may take at exit or on SIGTERM, all locks
#: together. Orchestrators usually wait longer before SIGKILL (Kubernetes: 30 s).
EXIT_RELEASE_SECONDS = 10.0

class ExitHeld(Protocol):
    """What this module needs of a held lock (the core's ``LockState``), so it does not import the lock's rules."""

    release_on_sigterm: bool

    @property
    def name(self) -> str: ...

    @property
    def persister(self) -> Persister: ...

    @property
    def hold(self) -> LockRecord | None: ...

    def owned_here(self) -> bool: ...

    def exit_snapshot(self) -> LockRecord | None: ...

    def exit_released(self, hold: LockRecord, confirmed: bool, reason: str) -> None: ...


try:
    from _signal import getsignal as _raw_getsignal  # type: ignore[import-not-found]  # CPython's C module: typeshed has no stub for it
except ImportError:  # pragma: no cover - other interpreters
    _raw_getsignal = signal.getsignal

_held: weakref.WeakSet[ExitHeld] = weakref.WeakSet()
_guard = threading.RLock()  # re-entrant: the SIGTERM handler runs on the main thread mid-call
_previous_handler: Any = None
_installed = False


def register(state: ExitHeld, on_sigterm: bool) -> None:
    """Track a held lock; install the SIGTERM handler once, from the main thread only."""
    with _guard:
        _held.add(state)
    if on_sigterm:
        _install_sigterm_handler()


def unregister(state: ExitHeld) -> None:
    with _guard:
        _held.discard(state)


def _release_one(state: ExitHeld, reason: str) -> None:
    hold = state.exit_snapshot()
    if hold is None:
        return
    try:
        confirmed = bool(state.persister.release(state.name, hold.owner_token))
    except Exception as error:  # noqa: BLE001 - whatever the store raised, the lease ends on its own; release the rest
        logger.warning("releasing lock %r on %s failed: %s", state.name, reason, error)
        return
    state.exit_released(hold, confirmed, reason)


def release_all(reason: str, deadline_seconds: float | None = None, *, sigterm: bool = False) -> list[str]:
    """Release every lock this process holds, in parallel, within one deadline; the names not released.

    On SIGTERM, a lock made with ``release_on_sigterm=False`` is left to its owner: it is
    released by whoever stops the work first (the Airflow provider's guarded tasks), and
    at exit like every other.
    """
    limit = EXIT_RELEASE_SECONDS if deadline_seconds is None else deadline_seconds
    with _guard:
        held = [state for state in _held if state.owned_here() and state.hold is not None
                and (state.release_on_sigterm or not sigterm)]
    if not held:
        return []
    end = time.monotonic() + limit
    workers = []
    for state in held:
        worker = threading.Thread(
            target=_release_one, args=(state, reason), name=f"singleton-exit:{state.name}", daemon=True
        )
        worker.start()
        workers.append((state, worker))
    unfinished = []
    for state, worker in workers:
        worker.join(max(end - time.monotonic(), 0.0))
        if worker.is_alive():
            unfinished.append(state.name)
    if unfinished:
        logger.warning(
            "gave up releasing %d lock(s) on %s after %g s (the store did not answer): %s; "
            "they stay held until their lease ends",
            len(unfinished),
            reason,
            limit,
            ", ".join(map(repr, unfinished)),
        )
    return unfinished


def _on_sigterm(signum: int, frame: Any) -> None:
    release_all("SIGTERM", sigterm=True)
    previous = _previous_handler
    if callable(previous):
        previous(signum, frame)
    elif previous in (signal.SIG_DFL, None):
        # End as the process would have without us: default action of SIGTERM.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    # SIG_IGN: the process chose to ignore SIGTERM; keep running.


def _install_sigterm_handler() -> None:
    global _previous_handler, _installed
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    # Checked on every acquire: a framework may have replaced our handler since.
    # The C-level getter skips the enum conversion signal.getsignal does (hot path).
    if _raw_getsignal(signal.SIGTERM) is _on_sigterm:
        return
    current = signal.getsignal(signal.SIGTERM)
    _previous_handler = current
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True


def _after_fork_in_child() -> None:
    # The child owns none of the parent's locks: no renewal, no release on its exit.
    global _held, _guard
    _held = weakref.WeakSet()
    _guard = threading.RLock()  # the parent's may have been held by another thread at fork


_after_exit: list[Callable[[], None]] = []


def after_exit_release(callback: Callable[[], None]) -> None:
    """Run ``callback`` at exit after every held lock was released (persisters close shared pools here).

    A persister's own ``atexit`` handler would run before this module's (last
    registered runs first) and close the connections the exit release still needs.
    """
    _after_exit.append(callback)


def _at_exit() -> None:
    release_all("process exit")
    for callback in reversed(_after_exit):
        try:
            callback()
        except Exception as error:  # noqa: BLE001 - at exit, nobody is left to tell; run the other hooks
            logger.debug("an exit hook failed: %s", type(error).__name__)


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
