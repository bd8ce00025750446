"""The provider's exceptions keep their Airflow meaning (retry or not) and survive pickling."""

from __future__ import annotations

import pickle

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_provider import SingletonLockConflict, SingletonLockLost, SingletonWaitTimeout


def test_retry_semantics_follow_the_base_classes() -> None:
    assert issubclass(SingletonLockConflict, AirflowException)
    assert not issubclass(SingletonLockConflict, AirflowFailException), "retries must apply"
    assert issubclass(SingletonWaitTimeout, SingletonLockConflict)
    assert issubclass(SingletonLockLost, AirflowFailException), "a lost lock must not be retried blindly"


def test_exceptions_pickle_with_their_details() -> None:
    for error in (SingletonLockConflict("n", "host pid 1"), SingletonWaitTimeout("n", "h", "waited"),
                  SingletonLockLost("n")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.lock_name == "n"
    assert pickle.loads(pickle.dumps(SingletonLockConflict("n", "host pid 1"))).holder_description == "host pid 1"


def test_the_core_errors_catch_the_airflow_ones() -> None:
    """``except LockConflict`` and ``except LockLost`` work whichever layer raised."""
    from singleton_integrations import LockConflict, LockLost, LockRecord

    assert issubclass(SingletonLockConflict, LockConflict) and issubclass(SingletonWaitTimeout, LockConflict)
    assert issubclass(SingletonLockLost, LockLost)
    try:
        raise SingletonLockConflict("n", "deployment east (dag d, run r, task t)")
    except LockConflict as error:
        assert error.name == "n" and error.holder is None and "deployment east" in str(error)
    from datetime import datetime, timezone

    record = LockRecord("n", "secret-owner-token", 7, "host", 1, datetime.now(timezone.utc), None)
    conflict = pickle.loads(pickle.dumps(SingletonLockConflict("n", record)))
    assert conflict.holder == record and "fencing token 7" in str(conflict)
    assert "secret-owner-token" not in str(conflict)
