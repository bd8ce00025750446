"""The demo's core parts (race, expiry, fencing, cron) on a throwaway store; `nox -s demo` adds the orchestrators."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def test_demo_core_parts_pass_and_leave_nothing_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINGLETON_")}
    chart = tmp_path / "timeline.svg"
    result = subprocess.run([sys.executable, "-m", "singleton_integrations.demo", "--svg", str(chart)], env=env,
                            capture_output=True, text=True, timeout=240)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "ok: exactly one of 4 won" in out
    # SQLite's first token for a name is its clock in milliseconds, so tokens keep rising even after a purge.
    rose = re.search(r"ok: the 'expired' event fired; the fencing token rose (\d+) -> (\d+)", out)
    assert "'expired' event" in out and rose and int(rose[2]) > int(rose[1]), out
    fenced = re.search(r"ok: fencing tokens rose (\d+) -> (\d+); the stale write was refused", out)
    assert "refused" in out and fenced and int(fenced[2]) > int(fenced[1]), out
    assert "already ran this slot" in out and "deployment=a" in out
    assert "ok: deploy-b exited 75 without running: the slot already ran on deploy-a" in out
    assert "ok: the next slot ran after the hold" in out
    assert re.search(r"cron job runs under `singleton run` \(fencing token \d+\)", out)
    assert "skipped: SINGLETON_DEMO_AIRFLOW_PYTHON is not set" in out
    assert "skipped: SINGLETON_DEMO_PREFECT_PYTHON is not set" in out
    assert "none left running" in out and "every check passed" in out
    assert "Traceback" not in result.stderr
    bars = [e for e in ET.parse(chart).getroot().iter() if e.tag.endswith("rect")]
    assert len(bars) >= 9, "a background and one bar per hold (race, crash x2, fencing x2, slot x2, cron)"


def test_the_wheel_ships_the_orchestrator_scenes(tmp_path: Path) -> None:
    """An installed package runs the whole demo: its Airflow DAG and Prefect flow are package files."""
    import shutil
    import zipfile

    uv = shutil.which("uv")
    assert uv, "uv comes with the README's `pip install 'nox[uv]'`"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(root)], check=True, capture_output=True,
                   timeout=240)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for scene in ("airflow", "prefect"):
        assert f"singleton_integrations/demo_scenes/{scene}/nightly_export.py" in names, sorted(names)
