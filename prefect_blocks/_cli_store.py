"""``singleton --prefect-block NAME``: the store and name prefix of a saved ``SingletonBlock``.

Registered in the ``singleton_integrations.stores`` entry-point group. The block
is loaded from the Prefect API this process is configured for (``PREFECT_API_URL``,
the active profile), as ``SingletonBlock.load(NAME)`` in a flow would.
"""

from __future__ import annotations

from prefect.exceptions import ObjectNotFound

from singleton_integrations.stores import SourceNotFound, SourceUnavailable, StoreLocation, StoreSourceError

from ._block import SingletonBlock

__all__ = ["KIND", "prefect_block"]

KIND = "prefect-block"


def prefect_block(name: str) -> StoreLocation:
    """Where the block ``name`` keeps its locks; lock names get its ``name_prefix``, as in ``block.lock(name)``."""
    try:
        block = SingletonBlock.load(name, _sync=True)  # type: ignore[call-arg]
    except ValueError as error:
        if isinstance(error.__cause__, ObjectNotFound):
            raise SourceNotFound(KIND, name, f"the Prefect API at {_api()} has no Singleton block by that name "
                                             "(prefect block ls lists them)") from None
        raise StoreSourceError(KIND, name, str(error)) from None  # the block's own check, without its URL
    except Exception as error:  # noqa: BLE001  (the API is down, refuses, or the profile is wrong)
        raise SourceUnavailable(KIND, name, f"the Prefect API at {_api()} did not answer: "
                                            f"{type(error).__name__}: {error}") from None
    return StoreLocation(block.url.get_secret_value(), name_prefix=block.name_prefix or "",
                         description=f"Prefect block {name!r}")


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "(none: an ephemeral local server)")

