"""The conformance kit's mixins: a test class gets the rules of what it composes, and a composed mixin is a claim.

Each case writes a small test module for a plug-in author's class and runs pytest
on it (``pytester``), so what is checked is what pytest collects and reports.
"""

from __future__ import annotations

import pytest

from singleton_integrations.testing import conformance
from singleton_integrations.testing.conformance import (
    AsyncFace,
    ConformanceKit,
    CoreRules,
    PersisterConformance,
    Renewal,
)

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _bare_pytest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner runs need no installed plugin: loading them all would take most of each case's time."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")

#: Every mixin the package offers (every ``ConformanceKit`` subclass it exports but the all-in-one).
MIXINS = [value for key, value in vars(conformance).items()
          if key in conformance.__all__ and isinstance(value, type) and issubclass(value, ConformanceKit)
          and value not in (ConformanceKit, PersisterConformance)]


def rules_of(*mixins: type) -> set[str]:
    """The test functions the mixins define themselves."""
    return {name for mixin in mixins for name in vars(mixin) if name.startswith("test_")}


def collected(pytester: pytest.Pytester, bases: str, body: str = "") -> set[str]:
    """The test functions pytest collects from ``class TestMine(<bases>)`` on a memory store."""
    pytester.makepyfile(test_mine=f"""
import uuid
import pytest
from singleton_integrations.testing.conformance import *

class TestMine({bases}):
    @pytest.fixture
    def store_url(self):
        return f"memory://{{uuid.uuid4().hex}}"
{body}
""")
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    ids = [line for line in result.outlines if "::" in line]
    return {test_id.split("::")[-1].partition("[")[0] for test_id in ids}


def test_every_rule_belongs_to_exactly_one_mixin() -> None:
    names = [name for mixin in MIXINS for name in vars(mixin) if name.startswith("test_")]
    assert len(MIXINS) >= 10
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)


def test_a_class_collects_only_the_rules_of_the_mixins_it_composes(pytester: pytest.Pytester) -> None:
    wanted = rules_of(CoreRules, Renewal, AsyncFace)
    assert collected(pytester, "CoreRules, Renewal, AsyncFace") == wanted
    left_out = rules_of(*(mixin for mixin in MIXINS if mixin not in (CoreRules, Renewal, AsyncFace)))
    assert left_out and not left_out & wanted
    assert {"test_fair_queue_primitives", "test_min_hold_primitives", "test_sigterm_releases_then_ends_the_process"} <= left_out


def test_persister_conformance_collects_every_mixins_rules(pytester: pytest.Pytester) -> None:
    assert collected(pytester, "PersisterConformance") == rules_of(*MIXINS)
    assert all(issubclass(PersisterConformance, mixin) for mixin in MIXINS)


def test_a_test_class_may_still_leave_out_one_rule(pytester: pytest.Pytester) -> None:
    """As the Redis topologies do: a rule set to None is not collected."""
    names = collected(pytester, "CoreRules", "    test_lock_without_expiry = None\n")
    assert names == rules_of(CoreRules) - {"test_lock_without_expiry"}


def test_a_composed_mixin_is_a_claim_the_store_must_keep(pytester: pytest.Pytester) -> None:
    """A memory store lives in one process: composing Processes fails its rules, the all-in-one skips them."""
    pytester.makepyfile(test_claims="""
import uuid
import pytest
from singleton_integrations.testing.conformance import PersisterConformance, Processes

class Memory:
    @pytest.fixture
    def store_url(self):
        return f"memory://{uuid.uuid4().hex}"

class TestClaimed(Memory, Processes):
    pass

class TestEverything(Memory, PersisterConformance):
    pass
""")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-k", "test_killed_holder_lock_expires", "-rfEs")
    result.assert_outcomes(skipped=1, errors=1)
    result.stdout.fnmatch_lines([
        "*TestClaimed*test_killed_holder_lock_expires*",
        "*TestClaimed composes a mixin that claims multiprocess, but memory lives inside one process*",
    ])
    result.stdout.fnmatch_lines(["SKIPPED*memory lives inside one process*"])


def test_limits_is_a_claim_too(pytester: pytest.Pytester) -> None:
    """A store that keeps one hold of a name fails a class that composes Limits; the all-in-one skips the rules."""
    pytester.makepyfile(test_limits_claim="""
import pytest
from singleton_integrations import persisters
from singleton_integrations.testing.conformance import CountingPersister, Limits, PersisterConformance

class OneHoldOnly:
    @pytest.fixture
    def store_url(self):
        return "memory://"

    @pytest.fixture
    def persister(self):
        return CountingPersister(persisters.Memory(), limits=False)

class TestClaimed(OneHoldOnly, Limits):
    pass

class TestEverything(OneHoldOnly, PersisterConformance):
    pass
""")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-k", "test_mixed_limits_count_every_live_hold",
                                          "-rfEs")
    result.assert_outcomes(skipped=2, errors=2)  # each once per face
    result.stdout.fnmatch_lines([
        "*TestClaimed composes a mixin that claims limits, but memory keeps one hold of a name at a time*"])
    result.stdout.fnmatch_lines(["SKIPPED*memory keeps one hold of a name at a time (limits is False)*"])


def test_the_limit_combinations_claim_both_halves() -> None:
    assert conformance.Limits.needs == ("limits",)
    assert set(conformance.LimitsAcrossProcesses.needs) == {"limits", "multiprocess"}
    assert set(conformance.LimitsWithMinimumHold.needs) == {"limits", "supports_min_hold"}
    assert set(conformance.LimitsWithFairQueue.needs) == {"limits", "fair"}


def test_the_hold_log_checker_counts_honestly() -> None:
    """Released holds count by the log's order; killed and lost ones by the store's clock until their lease end."""
    from singleton_integrations.testing.conformance._limits import _most_at_once

    def start(token: int, created: float, expires: float) -> dict[str, object]:
        return {"event": "start", "token": token, "created": created, "expires": expires}

    def end(token: int, released: bool = True) -> list[dict[str, object]]:
        return [{"event": "end", "token": token, "expires": 99.0},
                {"event": "released", "token": token, "released": released}]

    handed_on = [start(1, 0, 2), *end(1), start(2, 1, 3), *end(2)]
    assert _most_at_once(handed_on) == 1
    overlapping = [start(1, 0, 2), start(2, 1, 3), *end(1), *end(2)]
    assert _most_at_once(overlapping) == 2
    # A killed holder (no end) counts until its lease ends by the store's clock, not after.
    killed = [start(1, 0, 2), start(2, 1.5, 3.5), *end(2), start(3, 2.0, 4.0), *end(3)]
    assert _most_at_once(killed) == 2
    killed_taken_early = [start(1, 0, 2), start(2, 1.5, 3.5), start(3, 1.9, 3.9)]
    assert _most_at_once(killed_taken_early) == 3
    # A stopped holder's hold is lost at its lease end, whenever it wakes to note it.
    stopped = [start(1, 0, 2), start(2, 2.5, 4.5), {"event": "lost", "token": 1}, *end(2)]
    assert _most_at_once(stopped) == 1
    # A release refused after the end line: the hold ended with its renewed lease (99 here), not at the line.
    refused = [start(1, 0, 2), *end(1, released=False), start(2, 50, 52)]
    assert _most_at_once(refused) == 2
    # Grant order is token order, not log order: hold 4 was granted before hold 5 but wrote its start line
    # after it, and hold 1 (killed) had ended by the store's clock when hold 5 was granted.
    late_line = [start(1, 0, 5.0), start(2, 1, 99), start(5, 5.1, 9), start(4, 4.9, 9), *end(5), *end(4), *end(2)]
    assert _most_at_once(late_line) == 3
    # ... and a hold granted earlier still counts when its start line comes later.
    crossing = [start(2, 1, 99), start(5, 5.1, 9), start(4, 4.9, 9), start(6, 5.2, 9), *end(5), *end(4), *end(6),
                *end(2)]
    assert _most_at_once(crossing) == 4
