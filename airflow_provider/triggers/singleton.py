"""``SingletonTrigger``: tells a deferred task when a lock looks free; it only observes.

It waits through the core's own wait (``AsyncLease.wait_until_free``): on the store's
release notification (Redis pub/sub, PostgreSQL LISTEN, MongoDB change stream)
through the persister's shared watch, holding no thread, looking again when the
holder's lease or minimum hold ends; stores that cannot notify are polled every
``poll_interval``.

With ``limit=N`` it waits until fewer than N holds are live: woken by a release of
any of them (the store's watch on the name), looking again when the soonest-ending
hold's lease or minimum hold ends.

A triggerer may run the same trigger twice at once (HA, reassignment), so a trigger
that acquired could hold a lock nobody releases. This one never writes: the resumed
task acquires, and defers again if it lost the race.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from singleton_integrations import AsyncLease, redact_url

if TYPE_CHECKING:
    from singleton_integrations import LockRecord
    from singleton_integrations.persisters import Persister

__all__ = ["SingletonTrigger"]

#: With a notifying store, how long to wait on the release notification before looking anyway.
_NOTIFIED_RECHECK = 30.0
#: How soon to look again at a hold whose end has passed by our clock but not yet by the store's.
_OVERDUE_LOOK = 0.25


def _soonest_end(holds: list[LockRecord]) -> float:
    """Seconds until the first of ``holds`` can end by itself (its lease or minimum hold); inf if none can."""
    ends = [record.expires_at.timestamp() for record in holds if record.expires_at is not None]
    if not ends:
        return math.inf
    left = min(ends) - time.time()
    return left + 0.001 if left > 0 else _OVERDUE_LOOK


class SingletonTrigger(BaseTrigger):
    """Fire ``{"status": "free", "observed_at": epoch}`` when ``lock_name`` has no live holder, ``"timeout"`` at ``deadline``.

    Under ``limit=N`` "free" means fewer than N live holds; a timeout event's ``held`` says how many there were.

    :param lock_name: the rendered lock name.
    :param singleton_conn_id: the connection naming the store.
    :param poll_interval: seconds between looks on a store that cannot notify; shortened when the
        holder's lease ends sooner. A notifying store wakes the trigger at the release.
    :param deadline: epoch seconds after which to report ``timeout`` instead of waiting on; None waits on.
    :param limit: the waiting task's ``limit``: fire once fewer than this many holds are live.
    """

    def __init__(
        self,
        *,
        lock_name: str,
        singleton_conn_id: str = "singleton_default",
        poll_interval: float = 5.0,
        deadline: float | None = None,
        limit: int = 1,
    ) -> None:
        super().__init__()
        self.lock_name = lock_name
        self.singleton_conn_id = singleton_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = deadline
        self.limit = int(limit)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "lock_name": self.lock_name,
                "singleton_conn_id": self.singleton_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "limit": self.limit,
            },
        )

    def _event(self, status: str, **details: Any) -> TriggerEvent:
        return TriggerEvent({"status": status, "lock_name": self.lock_name, "deadline": self.deadline, **details})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_provider.hooks.singleton import SingletonHook

        try:
            # The async lookup: a sync one from the event loop can deadlock the triggerer.
            conn = await SingletonHook.aget_connection(self.singleton_conn_id)
            persister = SingletonHook.persister_from_connection(conn)  # shared by every trigger on this store
        except Exception as error:  # noqa: BLE001  (reported to the resumed task, which fails with it)
            yield self._event("error", message=redact_url(f"{type(error).__name__}: {error}"))
            return
        # The core's own wait: woken by the release where the store notifies (looking again every
        # _NOTIFIED_RECHECK s in case a notification was missed), and when the holder's lease or
        # minimum hold ends; stores that cannot notify are looked at every poll_interval.
        look_every = _NOTIFIED_RECHECK if persister.notifies else self.poll_interval
        wait = math.inf if self.deadline is None else max(self.deadline - time.time(), 0.0)
        try:
            if self.limit > 1:
                holds = await self._until_below_limit(persister, wait)
            else:
                holder = await AsyncLease(self.lock_name, persister).wait_until_free(wait=wait,
                                                                                    poll_interval=look_every)
                holds = [] if holder is None else [holder]
        except Exception as error:  # noqa: BLE001  (reported to the resumed task, which fails with it)
            yield self._event("error", message=redact_url(f"{type(error).__name__}: {error}"))
            return
        if not holds:  # observed_at: the resumed task logs how long Airflow took to resume it
            yield self._event("free", observed_at=time.time())
            return
        from airflow_provider._holders import describe_holder

        yield self._event("timeout", holder="; ".join(describe_holder(record) for record in holds), held=len(holds))

    async def _until_below_limit(self, persister: Persister, wait: float) -> list[LockRecord]:
        """Wait until fewer than ``limit`` holds are live: [] once so, else the holds seen when ``wait`` ran out.

        The watch on the name is opened before the first look and kept, so a release between
        a look and the pause is remembered: any release of any hold wakes the wait. A store
        whose watch cannot wake coroutines is looked at every ``poll_interval``.
        """
        deadline = time.monotonic() + wait
        async with persister.awatching(self.lock_name) as watch:
            woken = persister.notifies and watch.wakes_coroutines
            look_every = _NOTIFIED_RECHECK if woken else self.poll_interval
            while True:
                holds = await persister.aholders(self.lock_name)
                if len(holds) < self.limit:
                    return []
                left = deadline - time.monotonic()
                if left <= 0:
                    return holds
                await watch.wait_async(min(left, look_every, _soonest_end(holds)))
