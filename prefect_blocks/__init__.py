"""Prefect blocks for singleton-integrations: one run at a time across deployments, workers and orchestrators.

``SingletonBlock`` holds the store URL; ``block.lock(name)`` guards a block of code,
``@singleton(...)`` a flow or task, and ``SingletonLockManager`` Prefect's SERIALIZABLE
transactions. Register the block with ``prefect block register -m prefect_blocks``.
"""

from __future__ import annotations

from singleton_integrations import LockConflict, LockLost

from ._block import SingletonBlock
from ._decorator import BLOCK_CACHE_SECONDS_ENV, OnConflict, clear_block_cache, current_lock, singleton
from ._events import EVENT_NAMES, HOLD_LABEL, lock_resource_id
from ._lock import SingletonLock
from ._lock_manager import SingletonLockManager

__all__ = [
    "BLOCK_CACHE_SECONDS_ENV",
    "EVENT_NAMES",
    "HOLD_LABEL",
    "LockConflict",
    "LockLost",
    "OnConflict",
    "SingletonBlock",
    "SingletonLock",
    "SingletonLockManager",
    "clear_block_cache",
    "current_lock",
    "lock_resource_id",
    "singleton",
]
