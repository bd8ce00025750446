"""``@singleton`` arguments: checked when decorating, lock names filled from each run's parameters."""

from __future__ import annotations

import uuid

import pytest
from prefect import flow, task

from prefect_blocks import BLOCK_CACHE_SECONDS_ENV, SingletonBlock, clear_block_cache, current_lock, singleton

from .conftest import held_elsewhere


@pytest.fixture
def block(store_url: str) -> SingletonBlock:
    return SingletonBlock(url=store_url, lock_expire_seconds=30)


def test_template_must_name_parameters(block: SingletonBlock) -> None:
    def export(region: str, day: str = "today") -> None: ...

    singleton(block=block, lock_name="export-{region}-{day}")(export)  # fine
    with pytest.raises(ValueError, match=r"names zone, not parameters of export\(\)"):
        singleton(block=block, lock_name="export-{zone}")(export)
    with pytest.raises(ValueError, match="must name parameters"):
        singleton(block=block, lock_name="export-{}")(export)


def test_rejects_bad_arguments(block: SingletonBlock) -> None:
    with pytest.raises(ValueError, match="on_conflict"):
        singleton(block=block, on_conflict="queue")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wait_timeout"):
        singleton(block=block, on_conflict="wait", wait_timeout=-1)
    with pytest.raises(TypeError, match="SingletonBlock or a saved block's name"):
        singleton(block=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="under @flow or @task"):
        singleton(block=block)(flow(lambda: None))
    with pytest.raises(TypeError, match="under @flow or @task"):
        singleton(block=block)(task(lambda: None))


def test_names_from_defaults_kwargs_and_callables(block: SingletonBlock, store_url: str, lock_name: str) -> None:
    @flow
    @singleton(block=block, lock_name=lock_name + "-{region}-{day}")
    def by_template(region: str, day: str = "mon") -> str:
        return current_lock().name

    @flow
    @singleton(block=block, lock_name=lambda params: f"{lock_name}-{params['region'].upper()}")
    def by_callable(region: str) -> str:
        return current_lock().name

    @task
    @singleton(block=block)
    def by_function_name() -> str:
        return current_lock().name

    @flow
    def parent() -> str:
        return by_function_name()

    assert by_template("eu") == f"{lock_name}-eu-mon"
    assert by_template(region="us", day="tue") == f"{lock_name}-us-tue"
    assert by_callable("eu") == f"{lock_name}-EU"
    assert parent() == "by_function_name"
    with held_elsewhere(store_url, f"{lock_name}-EU"):
        assert by_callable("eu", return_state=True).name == "Skipped"
        assert by_callable("us", return_state=True).name == "Completed"


def test_lock_expire_seconds_override(block: SingletonBlock, lock_name: str) -> None:
    @flow
    @singleton(block=block, lock_name=lock_name, lock_expire_seconds=7)
    def job() -> float:
        record = block.holder(lock_name)
        return (record.expires_at - record.created_at).total_seconds()

    assert 6 < job() <= 7


def test_decorated_flows_and_tasks_pickle_and_run_from_the_copy(block: SingletonBlock, lock_name: str) -> None:
    """flow.serve() and ProcessPoolTaskRunner send the function by cloudpickle: the copy must work."""
    import cloudpickle

    @flow(name=f"pickled-{lock_name}")
    @singleton(block=block, lock_name=lock_name + "-{n}")
    def guarded(n: int) -> str:
        return current_lock().name

    @task
    @singleton(block=f"never-loaded-{lock_name}", on_conflict="fail")
    async def guarded_task() -> None: ...

    copy = cloudpickle.loads(cloudpickle.dumps(guarded))
    cloudpickle.loads(cloudpickle.dumps(guarded_task))
    assert copy(3) == f"{lock_name}-3"
    with held_elsewhere(block.url.get_secret_value(), f"{lock_name}-4"):
        assert copy(4, return_state=True).name == "Skipped"


def test_a_block_loaded_by_name_is_cached_until_cleared(store_url: str, lock_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    block_name = f"cached-{uuid.uuid4().hex[:8]}"
    SingletonBlock(url=store_url, name_prefix="first/").save(block_name)

    @flow
    @singleton(block=block_name, lock_name=lock_name)
    def job() -> str:
        return current_lock().name

    assert job() == f"first/{lock_name}"
    SingletonBlock(url=store_url, name_prefix="second/").save(block_name, overwrite=True)
    assert job() == f"first/{lock_name}", "reused within SINGLETON_BLOCK_CACHE_SECONDS"
    clear_block_cache(block_name)
    assert job() == f"second/{lock_name}", "read again after clear_block_cache()"
    SingletonBlock(url=store_url, name_prefix="third/").save(block_name, overwrite=True)
    monkeypatch.setenv(BLOCK_CACHE_SECONDS_ENV, "0")
    assert job() == f"third/{lock_name}", "0 reads the block on every run"


def test_skipped_state_name(block: SingletonBlock, store_url: str, lock_name: str) -> None:
    @flow
    @singleton(block=block, lock_name=lock_name, skipped_state_name="Completed")
    def job() -> None: ...

    with held_elsewhere(store_url, lock_name):
        state = job(return_state=True)
    assert (state.type.value, state.name) == ("COMPLETED", "Completed")
    assert state.message.startswith(f"Skipped: lock '{lock_name}' is held by ")
    with pytest.raises(ValueError, match="skipped_state_name"):
        singleton(block=block, skipped_state_name="")
    with pytest.raises(ValueError, match="min_hold_seconds"):
        singleton(block=block, min_hold_seconds=0)
