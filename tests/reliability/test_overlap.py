"""Many processes, one name: no two holds overlap and fencing tokens only rise.

Each worker logs a hold as (start, end) read from CLOCK_MONOTONIC, which Linux
shares across processes, taken after ``lock()`` returned and before
``release()`` was called: the logged interval lies inside the real hold, so any
overlap found here is a real double holder.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import read_fact, spawn, stop


@dataclass(frozen=True)
class Hold:
    start: float
    end: float
    token: int
    pid: int


def read_logs(paths: list[Path]) -> tuple[list[Hold], int, int, list[str]]:
    holds: list[Hold] = []
    conflicts = errors = 0
    messages: list[str] = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("# summary"):
                _, _, _, c, e = line.split()
                conflicts += int(c)
                errors += int(e)
            elif line.startswith("# error"):
                messages.append(line)
            elif line:
                start, end, token, pid = line.split()
                holds.append(Hold(float(start), float(end), int(token), int(pid)))
    return holds, conflicts, errors, messages


def check_holds(holds: list[Hold]) -> tuple[int, int]:
    """(overlaps, token regressions) over the holds ordered by start."""
    overlaps = regressions = 0
    latest_end = float("-inf")
    previous_token = 0
    for hold in sorted(holds, key=lambda h: h.start):
        if hold.start < latest_end:
            overlaps += 1
        if hold.token <= previous_token:
            regressions += 1
        latest_end = max(latest_end, hold.end)
        previous_token = hold.token
    return overlaps, regressions


def test_checker_finds_overlaps_and_regressions() -> None:
    """The checker itself: it must flag a planted overlap and a token that goes down."""
    clean = [Hold(0, 1, 1, 1), Hold(1, 2, 2, 2), Hold(2.5, 3, 5, 1)]
    assert check_holds(clean) == (0, 0)
    assert check_holds([Hold(0, 2, 1, 1), Hold(1, 3, 2, 2)]) == (1, 0)
    assert check_holds([Hold(0, 10, 1, 1), Hold(2, 3, 2, 2), Hold(4, 5, 3, 3)]) == (2, 0)
    assert check_holds([Hold(0, 1, 2, 1), Hold(1, 2, 2, 2)]) == (0, 1)


def run_overlap(url: str, tmp_path: Path, processes: int, seconds: float, wait: float) -> dict[str, Any]:
    name = f"reliability-overlap-{uuid.uuid4().hex[:12]}"
    logs = [tmp_path / f"holds-{i}.log" for i in range(processes)]
    children = [
        spawn("overlap", {"url": url, "name": name, "ttl": 30, "wait": wait, "work": 0.002, "log": str(log)},
              stdin=True)
        for log in logs
    ]
    try:
        for child in children:
            assert read_fact(child, timeout=120)["event"] == "ready"
        start_at = time.monotonic() + 0.5
        for child in children:
            assert child.stdin is not None
            child.stdin.write(json.dumps({"start_at": start_at, "until": start_at + seconds}) + "\n")
            child.stdin.flush()
        for child in children:
            child.wait(start_at - time.monotonic() + seconds + 60)
            assert child.returncode == 0, child.stderr.read() if child.stderr else ""
    finally:
        for child in children:
            stop(child)
    holds, conflicts, errors, messages = read_logs(logs)
    overlaps, regressions = check_holds(holds)
    return {"processes": processes, "seconds": seconds, "holds": len(holds), "conflicts": conflicts,
            "errors": errors, "overlaps": overlaps, "token_regressions": regressions,
            "holders": len({h.pid for h in holds}), "error_samples": messages[:3]}


def assert_clean(result: dict[str, Any], processes: int) -> None:
    assert result["errors"] == 0, result["error_samples"]
    assert result["overlaps"] == 0
    assert result["token_regressions"] == 0
    # Liveness, loosely (a loaded machine or a slow store gives fewer turns): several processes took turns.
    assert result["holds"] >= 2 and result["holders"] >= 2


def test_no_overlap_quick(kind: str, url: str, tmp_path: Path, figures: dict[str, Any]) -> None:
    """CI-sized: 8 processes for 4 s on one name, each attempt waiting up to 50 ms."""
    result = run_overlap(url, tmp_path, processes=8, seconds=4.0, wait=0.05)
    figures.update(persister=kind, **result)
    assert_clean(result, 8)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_overlap_many_processes(kind: str, url: str, tmp_path: Path, figures: dict[str, Any]) -> None:
    """32 processes loop acquire / work / release on one name for 20 s."""
    result = run_overlap(url, tmp_path, processes=32, seconds=20.0, wait=0.2)
    figures.update(persister=kind, **result)
    assert_clean(result, 32)
