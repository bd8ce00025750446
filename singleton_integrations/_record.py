"""Plain values passed between ``Singleton`` and the persisters."""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "AcquireResult",
    "LockRecord",
    "Owner",
    "validate_metadata",
    "validate_min_hold",
    "validate_name",
    "validate_owner_token",
    "validate_ttl",
]

_HOSTNAME = socket.gethostname()  # read once: every acquire records it
MAX_NAME_LENGTH = 255
MAX_METADATA_ITEMS = 32
MAX_METADATA_VALUE_LENGTH = 1024
#: A caller's own owner token: long enough not to be guessed by chance, short enough for any store.
MIN_OWNER_TOKEN_LENGTH = 16
MAX_OWNER_TOKEN_LENGTH = 128


@dataclass(frozen=True)
class Owner:
    """Who asks for a lock: the random token proves ownership, the rest is for humans."""

    owner_token: str = field(default_factory=lambda: secrets.token_hex(16))
    host: str = field(default_factory=lambda: _HOSTNAME)
    pid: int = field(default_factory=os.getpid)
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # the token is a capability: keep it out of logs
        return f"Owner(host={self.host!r}, pid={self.pid}, metadata={dict(self.metadata)!r})"


@dataclass(frozen=True)
class LockRecord:
    """A live lock as the store sees it; times come from the store's clock.

    ``released_at`` is set while a released lock still holds its name for the
    minimum hold (until ``hold_until``): the slot already ran.
    """

    name: str
    owner_token: str
    fencing_token: int
    host: str
    pid: int
    created_at: datetime
    expires_at: datetime | None
    metadata: Mapping[str, str] = field(default_factory=dict)
    released_at: datetime | None = None
    hold_until: datetime | None = None

    @property
    def released(self) -> bool:
        """True when the holder released and the name is held only for the minimum hold."""
        return self.released_at is not None

    def describe(self) -> str:
        """One line naming the holder, for conflict messages and logs."""
        if self.released_at is not None:
            return self._describe_released()
        parts = [f"{self.host} pid {self.pid}"]
        if self.metadata:
            parts.append(", ".join(f"{k}={v}" for k, v in sorted(self.metadata.items())))
        parts.append(f"since {self.created_at.astimezone(timezone.utc).isoformat(timespec='seconds')}")
        if self.expires_at is not None:
            parts.append(f"until {self.expires_at.astimezone(timezone.utc).isoformat(timespec='seconds')}")
        parts.append(f"fencing token {self.fencing_token}")
        return ", ".join(parts)

    def _describe_released(self) -> str:
        who = f"{self.host} pid {self.pid}"
        if self.metadata:
            who += " (" + ", ".join(f"{k}={v}" for k, v in sorted(self.metadata.items())) + ")"
        until = self.hold_until or self.expires_at
        held = f"; held until {_iso(until)} for the minimum hold" if until is not None else ""
        return f"ran at {_iso(self.created_at)} on {who}, released at {_iso(self.released_at)}{held}, fencing token {self.fencing_token}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view without the owner token (a capability, not information)."""
        return {
            "name": self.name,
            "fencing_token": self.fencing_token,
            "host": self.host,
            "pid": self.pid,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "metadata": dict(self.metadata),
            "released_at": self.released_at.isoformat() if self.released_at else None,
            "hold_until": self.hold_until.isoformat() if self.hold_until else None,
        }

    def __repr__(self) -> str:
        return (
            f"LockRecord(name={self.name!r}, fencing_token={self.fencing_token}, host={self.host!r}, "
            f"pid={self.pid}, created_at={self.created_at.isoformat()}, "
            f"expires_at={self.expires_at.isoformat() if self.expires_at else None}, "
            f"metadata={dict(self.metadata)!r}"
            + (f", released_at={self.released_at.isoformat()}" if self.released_at else "")
            + (f", hold_until={self.hold_until.isoformat()}" if self.hold_until else "")
            + ")"
        )


def _iso(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds") if moment is not None else "?"


@dataclass(frozen=True)
class AcquireResult:
    """What one atomic acquire did.

    ``record`` is our new lock when ``acquired``; otherwise the live holder's, or
    None when it vanished between the attempt and the read. ``expired`` is the
    expired lock this acquire replaced, if any, so the caller can say whose it was.
    ``queued_behind``: refused only because the free name goes to an earlier waiter.
    ``retry_after`` bounds a waiter's pause: the holder's lease or minimum hold ends then.
    ``holders``: on a refusal under ``limit=N`` (N > 1), every live hold of the name, by
    fencing token, read in the same step; empty where the store did not read them.

    A ``Lease`` taken with an owner token that already holds the name gets
    ``acquired`` with the current record (the same fencing token), on every store.
    """

    acquired: bool
    record: LockRecord | None
    expired: LockRecord | None = None
    retry_after: float | None = None  # seconds until the holder's lease ends, by the store's clock
    queued_behind: bool = False
    holders: tuple[LockRecord, ...] = ()


def validate_name(name: object) -> str:
    """Refuse names that cannot be stored faithfully everywhere, before any I/O."""
    if not isinstance(name, str):
        raise TypeError(f"a lock name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("a lock name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"a lock name must be at most {MAX_NAME_LENGTH} characters, not {len(name)}")
    bad = next((c for c in name if ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029"), None)
    if bad is not None:
        raise ValueError(f"a lock name must not contain control characters (found {bad!r})")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise ValueError("a lock name must not contain lone surrogates")
    return name


def validate_ttl(seconds: object, what: str = "lock_expire_seconds") -> float | None:
    """A lease length: a positive finite number, or None for a lock that never expires."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{what} must be a number or None, not {type(seconds).__name__}")
    value = float(seconds)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, not {seconds!r}")
    if value < 0.001:
        raise ValueError(f"{what} must be at least 0.001 (one millisecond), not {seconds!r}")
    if value > 10 * 365 * 86400:
        raise ValueError(f"{what} must be at most ten years; use None for a lock that never expires")
    return value


#: The most holds ``limit`` may allow on one name: every refusal reads them all.
MAX_LIMIT = 1000


def validate_limit(limit: object) -> int:
    """How many may hold a name at once: an int from 1 (one holder, the default) to ``MAX_LIMIT``."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, not {type(limit).__name__}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be from 1 to {MAX_LIMIT}, not {limit!r}")
    return limit


def validate_min_hold(seconds: object) -> float | None:
    """A minimum hold: None (no hold) or a positive finite number of seconds, at most ten years."""
    if seconds is None:
        return None
    return validate_ttl(seconds, "min_hold_seconds")


def validate_metadata(metadata: object) -> dict[str, str]:
    """Holder metadata: a small mapping of short strings, shown in conflict messages."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str, not {type(metadata).__name__}")
    if len(metadata) > MAX_METADATA_ITEMS:
        raise ValueError(f"metadata may hold at most {MAX_METADATA_ITEMS} items")
    clean: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("metadata keys and values must be str")
        if not key or len(key) > 64 or key.startswith("$") or "." in key or "\x00" in key:
            raise ValueError(f"metadata key {key!r} must be 1-64 characters without '$' prefix, '.' or NUL")
        if len(value) > MAX_METADATA_VALUE_LENGTH or "\x00" in value:
            raise ValueError(f"metadata value for {key!r} must be at most {MAX_METADATA_VALUE_LENGTH} characters without NUL")
        clean[key] = value
    return clean


def validate_owner_token(token: object) -> str:
    """A caller's own owner token: 16 to 128 visible ASCII characters (no spaces).

    The token is a capability, whoever knows it can renew and release the lock,
    so it must not be short enough to guess; every store keeps it as plain text.
    """
    if not isinstance(token, str):
        raise TypeError(f"an owner token must be a str, not {type(token).__name__}")
    if not MIN_OWNER_TOKEN_LENGTH <= len(token) <= MAX_OWNER_TOKEN_LENGTH:
        raise ValueError(
            f"an owner token must be {MIN_OWNER_TOKEN_LENGTH} to {MAX_OWNER_TOKEN_LENGTH} characters, not {len(token)}"
        )
    if not all("!" <= c <= "~" for c in token):
        raise ValueError("an owner token must be visible ASCII characters, without spaces")
    return token
