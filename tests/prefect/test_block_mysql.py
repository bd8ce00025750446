"""The block on a MySQL/MariaDB store: saved and loaded through the Prefect API, a lock in a flow, a conflict with another process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from prefect import flow, get_client

from prefect_blocks import LockConflict, SingletonBlock, singleton
from singleton_integrations.testing.conformance import with_query
from tests.servers import mysql_server

from .conftest import held_elsewhere


@pytest.fixture
def mysql_url() -> Iterator[str]:
    """The test server, in a table of this test's own (dropped after)."""
    base = mysql_server.url()
    table = f"singleton_prefect_{uuid.uuid4().hex[:10]}"
    yield with_query(base, table=table)
    mysql_server.drop_store_tables(base, table)


def test_a_saved_mysql_block_keeps_its_password_secret() -> None:
    name = f"mysql-{uuid.uuid4().hex[:8]}"
    url = "mysql://app:s3cret-Maria@db.example:3306/locks?table=jobs&ssl=true"
    SingletonBlock(url=url, lock_expire_seconds=90).save(name)
    loaded = SingletonBlock.load(name)
    assert loaded.url.get_secret_value() == url
    assert "s3cret" not in repr(loaded)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, "singleton", include_secrets=False)
    assert "s3cret" not in str(document.data)


def test_a_mysql_block_locks_in_a_flow_and_reports_a_conflict(mysql_url: str) -> None:
    name = f"mysql-block-{uuid.uuid4().hex[:8]}"
    SingletonBlock(url=mysql_url, lock_expire_seconds=30).save(name)
    block = SingletonBlock.load(name)
    lock_name = f"prefect-mysql-{uuid.uuid4().hex[:8]}"

    @flow
    def locked() -> int:
        with block.lock(lock_name) as held:
            record = block.holder(lock_name)
            assert record is not None and record.fencing_token == held.fencing_token
            return int(held.fencing_token)

    @flow
    @singleton(block=block, lock_name=lock_name)
    def guarded() -> str:
        return "ran"

    first = locked()
    assert block.holder(lock_name) is None
    assert guarded() == "ran"
    with held_elsewhere(mysql_url, lock_name, "--metadata", "job=cron") as other:
        assert other.fencing_token > first
        with pytest.raises(LockConflict, match=f"pid {other.pid}.*job=cron"), block.lock(lock_name):
            pytest.fail("the body must not run")
        assert guarded(return_state=True).name == "Skipped"
    with block.lock(lock_name, wait=10) as held:
        assert held.fencing_token > other.fencing_token
