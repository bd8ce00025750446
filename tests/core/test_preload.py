"""``persisters.preload``: a store's driver is imported before its first use, in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from singleton_integrations import persisters

_PROBE = """
import json, sys
from singleton_integrations import persisters
import singleton_integrations.persisters.redis, singleton_integrations.persisters.postgres
import singleton_integrations.persisters.mongodb
before = {m: m in sys.modules for m in ("redis", "psycopg", "pymongo")}
persisters.preload(*sys.argv[1:])
after = {m: m in sys.modules for m in ("redis", "psycopg", "pymongo")}
print(json.dumps([before, after]))
"""


def _modules(*stores: str) -> tuple[dict[str, bool], dict[str, bool]]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *stores], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    before, after = json.loads(out)
    return before, after


def test_importing_a_persister_does_not_import_its_driver_but_preload_does() -> None:
    before, after = _modules("redis", "postgresql://127.0.0.1/test")
    assert before == {"redis": False, "psycopg": False, "pymongo": False}
    assert after == {"redis": True, "psycopg": True, "pymongo": False}


def test_preload_takes_schemes_and_urls_and_needs_no_server() -> None:
    _, after = _modules("mongodb://127.0.0.1:1/never", "sqlite", "memory")
    assert after["pymongo"] and not after["redis"]


def test_preload_of_an_unknown_store_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"no persister for scheme 'nosuch'.*known schemes: .*redis"):
        persisters.preload("nosuch")
