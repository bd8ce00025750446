"""Checks of the options these blocks add, made where the user writes them rather than at the first run."""

from __future__ import annotations

__all__ = ["validate_limit"]


def validate_limit(limit: object) -> int:
    """How many may hold a lock name at once: a whole number, 1 (one holder, the default) or more.

    The core bounds it from above and asks the store whether it keeps several holds.
    """
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int (how many may hold the lock at once), not {type(limit).__name__}")
    if limit < 1:
        raise ValueError(f"limit must be 1 or more (how many may hold the lock at once), not {limit!r}")
    return limit
