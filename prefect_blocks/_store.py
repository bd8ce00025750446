"""One persister per store URL and process, shared by blocks and lock managers.

Blocks and lock managers keep only configuration (they are pickled and sent to
other processes); the clients live here, rebuilt lazily in each process.
"""

from __future__ import annotations

import os
import threading

from singleton_integrations import persisters
from singleton_integrations.persisters import Persister

__all__ = ["persister_for"]

_persisters: dict[tuple[int, str], Persister] = {}
_guard = threading.Lock()


def persister_for(url: str) -> Persister:
    """The pooled persister for ``url`` in this process (a forked child gets its own)."""
    key = (os.getpid(), url)
    with _guard:
        found = _persisters.get(key)
        if found is None:
            found = _persisters[key] = persisters.from_url(url)
        return found
