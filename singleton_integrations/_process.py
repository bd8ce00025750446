"""Process-wide duties of held locks: release on SIGTERM and at exit, forget in a forked child."""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from typing import TYPE_CHECKING, Any

from ._events import logger

if TYPE_CHECKING:
    from ._singleton import Singleton

__all__ = ["register", "unregister"]

try:
    from _signal import getsignal as _raw_getsignal
except ImportError:  # pragma: no cover - other interpreters
    _raw_getsignal = signal.getsignal

_held: weakref.WeakSet[Singleton] = weakref.WeakSet()
_guard = threading.RLock()  # re-entrant: the SIGTERM handler runs on the main thread mid-call
_previous_handler: Any = None
_installed = False


def register(singleton: Singleton, on_sigterm: bool) -> None:
    """Track a held lock; install the SIGTERM handler once, from the main thread only."""
    with _guard:
        _held.add(singleton)
    if on_sigterm:
        _install_sigterm_handler()


def unregister(singleton: Singleton) -> None:
    with _guard:
        _held.discard(singleton)


def _release_all(reason: str) -> None:
    with _guard:
        held = [s for s in _held if s._owned_here()]
    for singleton in held:
        try:
            singleton._release_for(reason)
        except Exception:
            logger.exception("releasing lock %r on %s failed", singleton.name, reason)


def _on_sigterm(signum: int, frame: Any) -> None:
    _release_all("SIGTERM")
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


atexit.register(_release_all, "process exit")
os.register_at_fork(after_in_child=_after_fork_in_child)
