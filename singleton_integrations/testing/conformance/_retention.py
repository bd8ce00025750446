"""Retention: an idle, free name's state is purged after ``purge_after_seconds``, and its fencing tokens still rise."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from ... import Singleton, persisters
from ...persisters import Persister
from ._helpers import (
    PURGE_WAIT,
    Retaining,
    eventually,
    not_per_api,
    with_query,
)
from ._kit import ConformanceKit

__all__ = ["Retention"]


class Retention(ConformanceKit):
    """Retention: the ``purge_after_seconds`` option (30 days by default, by URL query or keyword, ``none``
    keeps everything) and the purge of an idle name's state, after which its fencing tokens still rise.

    Asks of the store: a ``purge_after_seconds`` option and attribute, and of the test class a
    ``stored_state(persister, name)`` fixture that reads the store beside the persister; a store whose own
    sweep runs seldom may offer ``purge()``, which the case calls.
    """

    @pytest.fixture
    def stored_state(self) -> Callable[[Persister, str], bool]:
        """Override: ``stored_state(persister, name)`` is True while the store keeps anything for ``name``.

        It may match ``name`` as a substring: the retention case gives its other names no such overlap.
        """
        self.undeclared("a stored_state fixture",
                        "no stored_state fixture: override it to say whether the store keeps state for a name")

    @not_per_api
    def test_purge_after_seconds_option(self, store_url: str) -> None:
        """The retention option: 30 days by default, set by URL query or keyword, ``none`` keeps all state."""
        from ...persisters import DEFAULT_PURGE_AFTER_SECONDS

        def fresh(url: str) -> str:  # a memory:// name is one store per process, made with its first options
            return f"memory://{uuid.uuid4().hex}" + url.partition("?")[1] + url.partition("?")[2] \
                if url.startswith("memory://") else url

        for url, options, expected in (
            (store_url, {}, DEFAULT_PURGE_AFTER_SECONDS),
            (with_query(store_url, purge_after_seconds=5), {}, 5.0),
            (store_url, {"purge_after_seconds": 7}, 7.0),
            (with_query(store_url, purge_after_seconds="none"), {}, None),
            (store_url, {"purge_after_seconds": None}, None),
        ):
            store = persisters.from_url(fresh(url), **options)
            try:
                assert isinstance(store, Retaining), f"{type(store).__name__} has no purge_after_seconds"
                assert store.purge_after_seconds == expected, (url, options)
            finally:
                store.close()
        for bad in ("-1", "soon"):
            with pytest.raises((TypeError, ValueError)):
                persisters.from_url(fresh(with_query(store_url, purge_after_seconds=bad)))

    @not_per_api
    def test_purge_removes_idle_state_and_tokens_still_rise(self, store_url: str, name: str,
                                                            stored_state: Callable[[Persister, str], bool]) -> None:
        purging = persisters.from_url(with_query(store_url, purge_after_seconds=1))
        try:
            # A short lease: a store may count the idle period from the lease's end, not the release.
            idle = Singleton(name, purging, lock_expire_seconds=2, release_on_sigterm=False)
            assert idle.lock()
            token = idle.fencing_token
            assert token is not None
            assert idle.release()
            # Other names must not contain ``name``: stored_state may look for it as a substring.
            kept = Singleton(f"held-{uuid.uuid4().hex}", purging, lock_expire_seconds=None, release_on_sigterm=False)
            assert kept.lock()
            assert stored_state(purging, name), "stored_state found nothing for a name just used"
            time.sleep(2.5)
            churn = Singleton(f"churn-{uuid.uuid4().hex}", purging, lock_expire_seconds=30, release_on_sigterm=False)

            sweep = getattr(purging, "purge", None)  # a store whose own sweep runs seldom may offer it on demand

            def purged() -> bool:
                # Other names come and go, giving an opportunistic sweep its chance.
                assert churn.lock() and churn.release()
                if callable(sweep):
                    sweep()
                return not stored_state(purging, name)

            assert eventually(purged, timeout=PURGE_WAIT, interval=0.5), "an idle, free name's state was kept"
            assert kept.verify(), "a held name's state was purged"
            again = Singleton(name, purging, lock_expire_seconds=30, release_on_sigterm=False)
            assert again.lock()
            assert again.fencing_token is not None and again.fencing_token > token, \
                "the fencing token went back after the purge"
            assert again.release() and kept.release()
        finally:
            purging.close()
