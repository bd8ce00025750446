"""Real servers for the tests: each module finds or starts one and returns its URL.

Shared here: what to do when a server is missing (fail under ``CI=true``,
skip elsewhere), how to pick a free loopback port for a throwaway server, and how
to stop a process one started.
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any, NoReturn

__all__ = ["ServerUnavailable", "free_port", "stop_process", "unavailable"]


class ServerUnavailable(RuntimeError):
    """A store the tests need could not be found or started."""


def unavailable(store: str, why: str) -> NoReturn:
    """Fail under CI (a missing server must never pass silently), else skip."""
    if os.environ.get("CI", "").strip().lower() == "true":
        raise ServerUnavailable(f"{store} is required under CI=true: {why}")
    import pytest

    pytest.skip(f"{store} unavailable: {why}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
