"""``SingletonTrigger``: tells a deferred task when a lock looks free; it only observes.

It waits through the core's own wait (``AsyncLease.wait_for_room``): on the store's
release notification (Redis pub/sub, PostgreSQL LISTEN, MongoDB change stream)
through the persister's shared watch, holding no thread, looking again when the
holder's lease or minimum hold ends; stores that cannot notify are polled every
``poll_interval``. With ``limit=N`` the same wait ends once fewer than N holds are
live: a release of any of them wakes it.

A triggerer may run the same trigger twice at once (HA, reassignment), so a trigger
that acquired could hold a lock nobody releases. This one never writes: the resumed
task acquires, and defers again if it lost the race.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from singleton_integrations import AsyncLease, redact_url

__all__ = ["SingletonTrigger"]

#: With a notifying store, how long to wait on the release notification before looking anyway.
_NOTIFIED_RECHECK = 30.0


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
            holds = await AsyncLease(self.lock_name, persister, limit=self.limit).wait_for_room(
                wait=wait, poll_interval=look_every)
        except Exception as error:  # noqa: BLE001  (reported to the resumed task, which fails with it)
            yield self._event("error", message=redact_url(f"{type(error).__name__}: {error}"))
            return
        if not holds:  # observed_at: the resumed task logs how long Airflow took to resume it
            yield self._event("free", observed_at=time.time())
            return
        from airflow_provider._holders import describe_holder

        yield self._event("timeout", holder="; ".join(describe_holder(record) for record in holds), held=len(holds))
