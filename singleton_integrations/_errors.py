"""The exception tree, one root so callers can catch everything the library raises.

    SingletonError
    ├── LockConflict      another live holder has the lock (carries who and since when)
    ├── LockLost          a held lock expired or was taken while we believed we held it
    ├── PersisterError    the store failed; the driver's error is the ``__cause__``
    │   └── MissingDependency (also ImportError)  an optional extra is not installed
    ├── NotHeld           an admin release found no live hold of the name (``admin.force_release``)
    └── TokenChanged      an admin release found another hold than the fencing token it named
    └── InvalidName / InvalidOption are ``ValueError``/``TypeError`` subclasses raised
        at construction, so bad input fails before any I/O.

Every exception pickles: integrations ship them across process boundaries
(Airflow's task runner, Prefect's result persistence).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._record import LockRecord

__all__ = [
    "LockConflict",
    "LockLost",
    "MissingDependency",
    "NotHeld",
    "PersisterError",
    "SingletonError",
    "TokenChanged",
]


class SingletonError(Exception):
    """Root of every error this library raises on purpose."""


class LockConflict(SingletonError):
    """Another live holder has the lock; ``holder`` says who, when known.

    During a minimum hold the holder's record is marked released, and the
    message says the slot already ran (when, where, and until when it is held).
    """

    def __init__(self, name: str, holder: LockRecord | None = None, message: str | None = None,
                 holders: tuple[LockRecord, ...] = (), limit: int = 1) -> None:
        self.name = name
        self.holder = holder
        #: Under ``limit=N``: every live hold the refused attempt saw, by fencing token.
        self.holders = holders
        self.limit = limit
        super().__init__(message if message is not None else conflict_message(name, holder, holders, limit))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.holder, str(self), self.holders, self.limit))


def conflict_message(name: str, holder: LockRecord | None, holders: tuple[LockRecord, ...] = (),
                     limit: int = 1) -> str:
    """Why an attempt on ``name`` was refused, naming whom it saw: every hold under ``limit=N``."""
    if limit > 1:
        seen = holders or ((holder,) if holder is not None else ())
        named = "; ".join(hold.describe() for hold in seen) or "holders the store did not name"
        return f"lock {name!r} is at its limit, {len(holders) or limit} of {limit} held: {named}"
    if holder is None:
        return f"lock {name!r} is held by another process"
    if holder.released:  # released into its minimum hold: the slot already ran
        return f"lock {name!r} already ran its slot: {holder.describe()}"
    return f"lock {name!r} is held by {holder.describe()}"


class LockLost(SingletonError):
    """The lock was ours but no longer is: it expired, or a renewal was refused."""

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        super().__init__(message or f"exclusivity on lock {name!r} was lost")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, str(self)))


class PersisterError(SingletonError):
    """The store could not be reached or refused an operation; names the backend."""

    def __init__(self, backend: str, message: str) -> None:
        self.backend = backend
        super().__init__(f"{backend}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_persister_error, (type(self), self.backend, str(self)))


def _rebuild_persister_error(cls: type[PersisterError], backend: str, text: str) -> PersisterError:
    error = cls.__new__(cls)
    error.backend = backend
    Exception.__init__(error, text)
    return error


class MissingDependency(PersisterError, ImportError):
    """An optional extra is needed; the message says which one to install."""

    def __init__(self, backend: str, extra: str, module: str) -> None:
        self.extra = extra
        PersisterError.__init__(
            self,
            backend,
            f"the {module!r} package is not installed; run: pip install 'singleton-integrations[{extra}]'",
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_persister_error, (type(self), self.backend, str(self)))


class NotHeld(SingletonError):
    """An admin release found nothing to release: the name is free, or only kept for a minimum hold.

    ``record`` is the finished hold still keeping the name (released into its
    minimum hold), or None when the name is free.
    """

    def __init__(self, name: str, fencing_token: int | None = None, record: LockRecord | None = None,
                 message: str | None = None) -> None:
        self.name = name
        self.fencing_token = fencing_token
        self.record = record
        if message is None:
            named = f" (fencing token {fencing_token})" if fencing_token is not None else ""
            if record is None:
                message = f"lock {name!r} is not held{named}; nothing was released"
            else:
                message = (f"lock {name!r}{named} was already released by its holder and is kept only for its "
                           f"minimum hold: {record.describe()}; nothing was released")
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.fencing_token, self.record, str(self)))


class TokenChanged(SingletonError):
    """An admin release named a hold by its fencing token, and another hold has the name now.

    Nothing was released: the lock changed hands (or was taken again) after the
    operator looked. ``holder`` is the hold found instead, when known.
    """

    def __init__(self, name: str, fencing_token: int, holder: LockRecord | None = None,
                 message: str | None = None) -> None:
        self.name = name
        self.fencing_token = fencing_token
        self.holder = holder
        if message is None:
            if holder is None:
                now = "another hold has it now"
            elif holder.released:
                now = f"the name is kept for another hold's minimum hold: {holder.describe()}"
            else:
                now = f"it is held now by {holder.describe()}"
            message = f"lock {name!r} is no longer held with fencing token {fencing_token}: {now}; nothing was released"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.fencing_token, self.holder, str(self)))
