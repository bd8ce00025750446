"""The lock rules as a pytest suite that any persister can run against itself.

The rules come in mixins, one per capability. A test class says what its store
claims by the mixins it composes, and provides a ``store_url`` fixture whose URL
``persisters.from_url`` understands (register a third-party scheme through the
``singleton_integrations.persisters`` entry-point group)::

    import pytest
    from singleton_integrations.testing.conformance import AsyncFace, CoreRules, Renewal, Waiting

    class TestMyStore(CoreRules, Renewal, Waiting, AsyncFace):
        @pytest.fixture
        def store_url(self):
            return "mystore://127.0.0.1:1234/test"

Only the composed mixins' rules are collected. A composed mixin is a claim: a
store that does not declare what it needs (``multiprocess``, ``fair``, ...) fails
its rules instead of skipping them.

=================================  ==========================================================
mixin                              asks of the store
=================================  ==========================================================
``CoreRules``                      the six primitives, judged by the store's clock (every store)
``Renewal``                        ``renew`` extends only a live lease it owns
``Waiting``                        nothing more; a notifying store must wake, not be polled
``AsyncFace``                      nothing to declare: the ``a*`` twins keep the same rules
``Processes``                      ``multiprocess``: processes share it; exit and SIGTERM release
``StoreClock``                     ``distributed``, judged by its own clock; Debian's ``faketime``
``Notifications``                  ``notifies``: ``watch`` is woken by a release
``MinimumHold``                    ``supports_min_hold``
``FairQueue``                      ``fair``: ``queue_for=``, ``leave_queue``, ``watch(name, owner_token)``
``Limits``                         ``limits``: ``acquire(limit=N)`` keeps up to N holds; ``holders``
``Retention``                      ``purge_after_seconds``, and a ``stored_state`` fixture
``MinimumHoldAcrossProcesses``     ``supports_min_hold`` and ``multiprocess``
``MinimumHoldByStoreClock``        ``supports_min_hold`` and ``distributed``
``NotificationsAcrossProcesses``   ``notifies`` and ``multiprocess``
``FairQueueAcrossProcesses``       ``fair`` and ``multiprocess``
``LimitsWithMinimumHold``          ``limits`` and ``supports_min_hold``
``LimitsWithFairQueue``            ``limits`` and ``fair``
``LimitsAcrossProcesses``          ``limits`` and ``multiprocess``
=================================  ==========================================================

The last seven hold the rules that need two claims at once: compose each beside
both of its halves.

``PersisterConformance`` composes every mixin for a store that should keep every
rule; there a rule whose capability the store does not declare is skipped, as the
built-in persisters' tests expect.

Every case that drives a lock runs twice, on ``Singleton`` (``[sync-...]``) and
on ``AsyncSingleton`` (``[async-...]``, through the persister's async twins on
an event loop of its own); cases that drive the store or child processes
directly run once.
"""

from __future__ import annotations

from ._async_face import AsyncFace
from ._clock import StoreClock
from ._core import CoreRules
from ._fair_queue import FairQueue, FairQueueAcrossProcesses
from ._helpers import (
    APIS,
    PLAIN_NAMES,
    WOKEN_WITHIN,
    AsyncDriven,
    CountingPersister,
    EventLoopThread,
    not_per_api,
    read_fact,
    spawn_role,
    with_query,
)
from ._kit import ConformanceKit
from ._limits import Limits, LimitsAcrossProcesses, LimitsWithFairQueue, LimitsWithMinimumHold
from ._min_hold import MinimumHold, MinimumHoldAcrossProcesses, MinimumHoldByStoreClock
from ._notifications import Notifications, NotificationsAcrossProcesses
from ._processes import Processes
from ._renewal import Renewal
from ._retention import Retention
from ._waiting import Waiting

__all__ = [
    "APIS",
    "PLAIN_NAMES",
    "WOKEN_WITHIN",
    "AsyncDriven",
    "AsyncFace",
    "ConformanceKit",
    "CoreRules",
    "CountingPersister",
    "EventLoopThread",
    "FairQueue",
    "FairQueueAcrossProcesses",
    "Limits",
    "LimitsAcrossProcesses",
    "LimitsWithFairQueue",
    "LimitsWithMinimumHold",
    "MinimumHold",
    "MinimumHoldAcrossProcesses",
    "MinimumHoldByStoreClock",
    "Notifications",
    "NotificationsAcrossProcesses",
    "PersisterConformance",
    "Processes",
    "Renewal",
    "Retention",
    "StoreClock",
    "Waiting",
    "not_per_api",
    "read_fact",
    "spawn_role",
    "with_query",
]


class PersisterConformance(  # pytest runs the last base's rules first: listed last to first, core rules first
    LimitsAcrossProcesses,
    LimitsWithFairQueue,
    LimitsWithMinimumHold,
    Limits,
    Retention,
    FairQueueAcrossProcesses,
    FairQueue,
    NotificationsAcrossProcesses,
    MinimumHoldByStoreClock,
    MinimumHoldAcrossProcesses,
    MinimumHold,
    AsyncFace,
    Notifications,
    Waiting,
    Renewal,
    StoreClock,
    Processes,
    CoreRules,
):
    """Every lock rule of the core, on one store, through both APIs; what the store does not declare is skipped."""

    skip_undeclared = True
