"""``SingletonBlock``: a store URL kept as a Prefect secret, and the bridge to the core lock."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from singleton_integrations import (
    DEFAULT_LOCK_EXPIRE_SECONDS,
    AsyncSingleton,
    Singleton,
    redact_url,
    scheme_of,
    validate_limit,
)
from singleton_integrations.persisters import Persister

from ._lock import SingletonLock
from ._lock_manager import SingletonLockManager
from ._store import persister_for

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from singleton_integrations import LockRecord

__all__ = ["DOCUMENTATION_URL", "LOGO_URL", "URL_PATTERN", "SingletonBlock", "SingletonOptions"]

PROJECT_URL = "https://github.com/singleton-integrations/singleton-integrations"
DOCUMENTATION_URL = f"{PROJECT_URL}/blob/main/docs/prefect.md"
#: The same square PNG ships as ``prefect_blocks/logo.png``.
LOGO_URL = "https://raw.githubusercontent.com/singleton-integrations/singleton-integrations/main/prefect_blocks/logo.png"

#: A scheme then ``://``: what ``persisters.from_url`` needs, checked by the block form before saving.
URL_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://"
_SCHEME_HINT = ("the store URL needs a scheme, e.g. redis://host:6379/0, postgresql://host/db, "
                "mongodb://host/db, mysql://host/db or sqlite:////path/locks.db")


def _only(schema: dict[str, Any], kind: str) -> None:
    """Show an optional field in the form as its plain type, without the "null" toggle."""
    for choice in schema.pop("anyOf", []):
        if choice.get("type") == kind:
            schema.update(choice)


class SingletonOptions(TypedDict, total=False):
    """The keywords of ``SingletonBlock.get_singleton`` and ``get_async_singleton``."""

    lock_expire_seconds: float | None
    min_hold_seconds: float | None
    metadata: Mapping[str, str] | None
    release_on_sigterm: bool
    apply_prefix: bool
    limit: int


class SingletonBlock(Block):
    """Only one run at a time across deployments, workers and orchestrators, through a shared lock store.

    The same lock name on the same store is the same lock for the core library,
    the ``singleton`` CLI, the Airflow provider and these blocks.
    """

    # A rejected URL may carry a password: keep inputs out of validation errors.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name: ClassVar[str] = "Singleton"
    _block_type_slug: ClassVar[str] = "singleton"
    _logo_url: ClassVar[Any] = LOGO_URL
    _documentation_url: ClassVar[Any] = DOCUMENTATION_URL
    _description: ClassVar[str] = (
        "A distributed lock store (Redis, PostgreSQL, MongoDB, SQLite) that keeps a flow or task "
        "from running twice at once across deployments, workers, workspaces and orchestrators."
    )
    # The UI replaces only the first BLOCK_NAME with the block's name: say it once.
    _code_example: ClassVar[str] = '''
        ```python
        from prefect import flow
        from prefect_blocks import SingletonBlock, singleton

        singleton_block = SingletonBlock.load("BLOCK_NAME")

        @flow
        def nightly():
            with singleton_block.lock("nightly-report"):
                ...  # runs in one place at a time; LockConflict elsewhere

        @flow
        @singleton(block=singleton_block, lock_name="export-{region}")  # Completed "Skipped" when held
        def export(region: str):
            ...
        ```
    '''

    url: SecretStr = Field(
        default=...,
        title="Store URL",
        description=(
            "The lock store, e.g. redis://host:6379/0, postgresql://user:password@host/db, "
            "mongodb://host/db, mysql://user:password@host/db or sqlite:////shared/locks.db."
        ),
        # In the schema, so the UI's form refuses a URL without a scheme before it saves.
        json_schema_extra={"pattern": URL_PATTERN},
    )
    lock_expire_seconds: float | None = Field(
        default=DEFAULT_LOCK_EXPIRE_SECONDS,
        gt=0,
        title="Lock expire seconds",
        description="How long a lock outlives a holder that stops renewing it (crash, kill -9).",
        # The form offers a number only: its "null" choice was dropped on save; never_expires says "never".
        json_schema_extra=lambda schema: _only(schema, "number"),
    )
    never_expires: bool = Field(
        default=False,
        title="Never expires",
        description=(
            "Keep a lock until it is released, even if its holder dies (an admin frees it with "
            "`singleton release`); lock expire seconds and auto renew are then ignored."
        ),
    )
    auto_renew: bool = Field(
        default=True,
        title="Auto renew",
        description="Renew the lease while the run is alive, so long runs keep the lock and dead ones lose it.",
    )
    name_prefix: str | None = Field(
        default=None,
        title="Name prefix",
        description="Prepended to every lock name; leave empty so the same name is the same lock everywhere.",
        json_schema_extra=lambda schema: _only(schema, "string"),
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: SecretStr) -> SecretStr:
        try:
            scheme_of(url.get_secret_value())
        except ValueError:  # the core's message quotes the URL; a form field may hold a password anywhere
            raise ValueError(_SCHEME_HINT) from None
        return url

    @model_validator(mode="after")
    def _check_renewal(self) -> SingletonBlock:
        if self.auto_renew and self.lock_expire_seconds is None and not self.never_expires:
            raise ValueError("auto_renew needs lock_expire_seconds: a lock that never expires has nothing to renew; "
                             "set never_expires=True for such a lock")
        return self

    @property
    def lease_seconds(self) -> float | None:
        """The lease each lock gets: None when the block says it never expires."""
        return None if self.never_expires else self.lock_expire_seconds

    @classmethod
    def _from_block_document(cls, block_document: Any) -> Any:
        """Prefect reports a saved block that does not validate as a generic "failed validation";
        say what is wrong, without the input (a URL may carry a password)."""
        try:
            return super()._from_block_document(block_document)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc']) or 'block'}: {problem['msg'].removeprefix('Value error, ')}"
                for problem in error.errors(include_input=False, include_url=False)
            )
            raise ValueError(f"the Singleton block {block_document.name!r} cannot be used: {problems}. "
                             "Fix it in the UI (Blocks) or save it again from code.") from None

    # -- bridges to the core ---------------------------------------------------------

    def lock_name(self, name: str) -> str:
        """The stored name for ``name``: the block's prefix, if any, then the name."""
        return f"{self.name_prefix or ''}{name}"

    def get_persister(self) -> Persister:
        """The store's persister, pooled per process (nothing connects until first use)."""
        return persister_for(self.url.get_secret_value())

    def get_singleton(self, name: str, **options: Unpack[SingletonOptions]) -> Singleton:
        """A core ``Singleton`` configured from this block, for code that wants the plain API.

        ``lock_expire_seconds`` defaults to the block's ``lease_seconds``, renewed when the
        block says ``auto_renew``; ``apply_prefix=False`` takes ``name`` as stored;
        ``limit=N`` lets up to N holders in at once (see ``lock``).
        """
        name, persister, core = self._singleton_arguments(name, options)
        return Singleton(name, persister, **core)

    def get_async_singleton(self, name: str, **options: Unpack[SingletonOptions]) -> AsyncSingleton:
        """``get_singleton`` as an ``AsyncSingleton``, for ``async`` flows and tasks."""
        name, persister, core = self._singleton_arguments(name, options)
        return AsyncSingleton(name, persister, **core)

    def _singleton_arguments(self, name: str, options: SingletonOptions) -> tuple[str, Persister, dict[str, Any]]:
        lease = options.get("lock_expire_seconds")
        lease = self.lease_seconds if lease is None else lease
        core: dict[str, Any] = {
            "lock_expire_seconds": lease,
            "auto_renew": self.auto_renew and lease is not None,
            "metadata": options.get("metadata"),
            "release_on_sigterm": options.get("release_on_sigterm", True),
        }
        if options.get("min_hold_seconds") is not None:
            core["min_hold_seconds"] = options["min_hold_seconds"]
        limit = self.check_limit(options.get("limit", 1))
        if limit > 1:
            core["limit"] = limit
        name = self.lock_name(name) if options.get("apply_prefix", True) else name
        return name, self.get_persister(), core

    def lock(
        self,
        name: str,
        wait: float | None = None,
        lock_expire_seconds: float | None = None,
        *,
        min_hold_seconds: float | None = None,
        limit: int = 1,
    ) -> SingletonLock:
        """Hold ``name`` for a ``with`` or ``async with`` block; ``LockConflict`` when another holds it.

        ``wait`` seconds to wait for a busy lock (default: do not wait);
        ``lock_expire_seconds`` overrides the block's lease for this lock;
        ``min_hold_seconds`` keeps the name held that long after the acquisition even when
        released sooner, so a schedule's slot runs once across deployments started seconds apart;
        ``limit=N`` lets up to N holders in at once (each with a lease and fencing token of its
        own), on a store that keeps several holds; ``LockConflict`` then names all N.
        """
        return SingletonLock(self, name, wait=wait, lock_expire_seconds=lock_expire_seconds,
                             min_hold_seconds=min_hold_seconds, limit=self.check_limit(limit))

    def check_limit(self, limit: object) -> int:
        """``limit`` if this block's store can keep it: a ``TypeError`` or ``ValueError`` that says why not."""
        checked = validate_limit(limit)
        if checked > 1 and not self.get_persister().limits:
            raise ValueError(f"limit={checked} needs a store that keeps several holds of a lock name; the "
                             f"{scheme_of(self.url.get_secret_value())}:// store does not (its persister's limits is False)")
        return checked

    def holder(self, name: str) -> LockRecord | None:
        """Who holds ``name`` now, if anyone (host, pid, run ids, since when, fencing token); one hold under a limit."""
        return self.get_persister().get(self.lock_name(name))

    def holders(self, name: str) -> list[LockRecord]:
        """Every live hold of ``name``, by fencing token: more than one only under ``limit``."""
        return self.get_persister().holders(self.lock_name(name))

    def get_lock_manager(self, name_prefix: str = SingletonLockManager.DEFAULT_NAME_PREFIX) -> SingletonLockManager:
        """A ``prefect.locking`` lock manager on this store, for SERIALIZABLE transactions and cache policies."""
        return SingletonLockManager(self.url, name_prefix=(self.name_prefix or "") + name_prefix)

    def __repr__(self) -> str:
        return (
            f"SingletonBlock(url={redact_url(self.url.get_secret_value())!r}, lock_expire_seconds={self.lock_expire_seconds!r}, "
            f"never_expires={self.never_expires!r}, auto_renew={self.auto_renew!r}, name_prefix={self.name_prefix!r})"
        )
