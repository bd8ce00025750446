"""Test and demo sessions. Airflow and Prefect pin incompatible FastAPI ranges, so each gets its own env."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests_core", "tests_airflow", "tests_prefect"]

STORES = "redis,mongodb,postgres,mysql,test"


def _pytest(session: nox.Session, *paths: str, workers: int = 0) -> None:
    """pytest over ``paths`` (or the session's arguments); ``workers`` > 0 spreads the tests over that many processes.

    Most core tests wait on stores, timers and child processes rather than the CPU,
    so four workers on two cores cut the core session from about 45 to about 12 minutes.
    """
    parallel = ["-n", str(workers)] if workers and not session.posargs else []
    session.run("python", "-m", "pytest", "--durations=15", *parallel, *(session.posargs or paths),
                env={"PYTHONUNBUFFERED": "1"})


#: Debian packages the core tests start or run, with the binary that shows each is there:
#: libfaketime (clock skew), PgBouncer (a pooler in front of PostgreSQL), redis-server (Cluster, Sentinel).
CORE_TOOLS = {"faketime": "faketime", "pgbouncer": "/usr/sbin/pgbouncer", "redis-server": "redis-server"}
#: The Airflow and Prefect UI tests drive Debian's headless Chromium (no browser download).
BROWSER_TOOLS = {"chromium": "chromium"}


def _ensure_debian_tools(session: nox.Session, wanted: dict[str, str]) -> None:
    """Install the missing ones of ``wanted`` (package: binary) with apt-get when running as root."""
    missing = [package for package, binary in wanted.items() if not (shutil.which(binary) or os.path.exists(binary))]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        session.warn(f"{', '.join(missing)} missing and cannot be installed here: the tests that need them will say so")
        return
    session.run("apt-get", "update", "-qq", external=True)
    session.run("apt-get", "install", "-y", "-qq", *missing, external=True, env={"DEBIAN_FRONTEND": "noninteractive"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over every Python file, and mypy (strict on the core) with the drivers' own type hints.

    First in ``nox``'s default run: it takes seconds, and a type error fails before the long test sessions start.
    """
    session.install("ruff>=0.8", "mypy>=1.13", "redis>=5.0.1", "pymongo>=4.13.2", "psycopg[binary]>=3.3.9",
                    "psycopg-pool>=3.2", "pytest>=8.0",  # pytest: the conformance kit's fixtures are typed by it
                    "opentelemetry-api>=1.20")  # the [otel] extra: metrics.py's calls are type-checked too
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session
def tests_core(session: nox.Session) -> None:
    """The core, the five persisters, the CLI and the reliability checks that run in CI."""
    _ensure_debian_tools(session, CORE_TOOLS)
    session.install("-e", f".[{STORES}]", "opentelemetry-sdk>=1.20")  # tests/core/test_metrics.py reads what is recorded
    _pytest(session, "tests/core", "tests/cli", "tests/reliability", workers=4)


@nox.session
def tests_airflow(session: nox.Session) -> None:
    """The Airflow provider against real Airflow (dag.test), two real deployments, and real stores."""
    _ensure_debian_tools(session, BROWSER_TOOLS)
    # Bytecode compiled at install, as pip does: the deployments' task processes must not pay for
    # compiling their imports (this machine sets PYTHONDONTWRITEBYTECODE, so nothing is cached later).
    session.env["UV_COMPILE_BYTECODE"] = "1"
    # statsd: Airflow's StatsD client, for the test that reads the lock metrics a task sends.
    session.install("-e", f".[airflow,{STORES}]", "statsd")
    _pytest(session, "tests/airflow")


@nox.session
def tests_prefect(session: nox.Session) -> None:
    """The Prefect blocks against a real Prefect test harness, a real ``prefect server``, real stores and a real browser."""
    _ensure_debian_tools(session, BROWSER_TOOLS)
    # playwright drives Debian's chromium (executable_path): no browser download.
    # prefect-redis and pip: Prefect's own lock-manager tests run against ours; pip fetches them
    # from the prefect and prefect-redis sdists at test time (tests/prefect/upstream.py).
    # opentelemetry-sdk: served runs export the lock's metrics (tests/prefect/test_metrics_in_runs.py).
    session.install("-e", f".[prefect,otel,{STORES}]", "playwright>=1.40", "prefect-redis", "pip", "opentelemetry-sdk>=1.20")
    _pytest(session, "tests/prefect")


@nox.session
def demo(session: nox.Session) -> None:
    """The README's first command: a race, an expiry, Airflow and Prefect yielding to a cron job."""
    session.install("-e", f".[{STORES}]")
    envs = {}
    for name, extra in (("airflow", "airflow"), ("prefect", "prefect")):
        location = os.path.join(".nox", f"demo_{name}")
        if not os.path.exists(os.path.join(location, "bin", "python")):
            session.run("uv", "venv", "--quiet", "--python", session.python or "python3", location, external=True)
        session.run("uv", "pip", "install", "--quiet", "--python", os.path.join(location, "bin", "python"),
                    "-e", f".[{extra}]", external=True)
        envs[f"SINGLETON_DEMO_{name.upper()}_PYTHON"] = os.path.abspath(os.path.join(location, "bin", "python"))
    session.run("python", "-m", "singleton_integrations.demo", *session.posargs, env=envs)


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Throughput and contention against the floor and peer libraries, on the local servers.

    ``nox -s benchmarks`` runs all five; ``-- throughput ARGS``, ``-- contention ARGS``,
    ``-- mysql ARGS``, ``-- limits ARGS`` or ``-- import ARGS`` runs one. The guarded
    Airflow task and Prefect run have sessions of their own (``benchmarks_airflow``,
    ``benchmarks_prefect``): each needs its orchestrator.
    """
    session.env["UV_COMPILE_BYTECODE"] = "1"  # import_time.py's fresh processes must not compile their imports
    session.install("-e", f".[{STORES}]", "python-redis-lock", "pottery")
    which, *args = session.posargs or ["all"]
    if which in ("all", "throughput"):
        session.run("python", "benchmarks/run.py", *args)
    if which in ("all", "contention"):
        session.run("python", "benchmarks/contention.py", *args)
    if which in ("all", "mysql"):
        session.run("python", "benchmarks/mysql_bench.py", *args)
    if which in ("all", "limits"):
        session.run("python", "benchmarks/limits.py", *args)
    if which in ("all", "import"):
        session.run("python", "benchmarks/import_time.py", *args)


@nox.session
def benchmarks_airflow(session: nox.Session) -> None:
    """A guarded Airflow task against a plain one on real deployments (LocalExecutor and CeleryExecutor)."""
    session.env["UV_COMPILE_BYTECODE"] = "1"  # as in tests_airflow: task processes must not compile their imports
    # Celery 5.7 removed what the Celery provider still imports (celery.backends.database.retry).
    session.install("-e", f".[airflow,{STORES}]", "apache-airflow-providers-celery", "celery>=5.5,<5.7")
    session.run("python", "benchmarks/airflow_overhead.py", *session.posargs)


@nox.session
def benchmarks_prefect(session: nox.Session) -> None:
    """A guarded served Prefect flow run against a plain one on a real Prefect server."""
    session.env["UV_COMPILE_BYTECODE"] = "1"  # run processes must not compile their imports (PYTHONDONTWRITEBYTECODE here)
    session.install("-e", f".[prefect,{STORES}]")
    session.run("python", "benchmarks/prefect_overhead.py", *session.posargs)
