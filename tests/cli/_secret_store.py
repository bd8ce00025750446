"""For the tests that hand ``singleton`` a store through an orchestrator or a URI: a store that needs a password,
and a runner that fails when any output shows it (as written or percent-encoded)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from tests.servers import redis_server, unavailable

__all__ = ["PASSWORD", "SINGLETON", "assert_hidden", "redis_requiring_password", "singleton"]

PASSWORD = "s3cret/Pa55@word"  # '/' and '@' must survive percent-encoding both ways
SINGLETON = Path(sys.executable).with_name("singleton")


def assert_hidden(*texts: str, password: str = PASSWORD) -> None:
    for text in texts:
        assert password not in text and quote(password, safe="") not in text, text


@contextmanager
def redis_requiring_password() -> Iterator[str]:
    """A throwaway redis-server with ``--requirepass``: the URL's password must reach it intact."""
    try:
        server = redis_server.start_throwaway("--requirepass", PASSWORD)
    except (FileNotFoundError, RuntimeError) as error:
        unavailable("Redis", f"no throwaway redis-server: {error}")
    try:
        yield f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
    finally:
        server.stop()


def singleton(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console script with ``env`` over this environment; its output never shows the password or a traceback."""
    result = subprocess.run([str(SINGLETON), *args], env={**os.environ, **(env or {})}, capture_output=True,
                            text=True, timeout=120, check=False)
    assert_hidden(result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result
