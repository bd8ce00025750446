"""MySQL/MariaDB in one run: the uncontended cycle against the floor and GET_LOCK, hand-over latency, 16 processes.

* **Uncontended cycle** (``lock()`` + ``release()`` of ``Singleton``) against the
  floor: ``INSERT ... ON DUPLICATE KEY UPDATE`` that takes a free or expired row,
  then an owner-checked ``DELETE``, on PyMySQL with one reused connection, and
  against ``GET_LOCK``/``RELEASE_LOCK`` (a session lock: no lease, no holder
  record, nothing written). Rounds are interleaved (order reversed every other
  round); a ratio is the median of the per-round ratios, so load on a shared
  machine cancels. Each case's statements and round trips per cycle are counted
  in the driver (one profiling pass before the timing).
* **Hand-over latency** in one process (``benchmarks/run.py``'s measurement).
* **16 processes on one name** (``benchmarks/contention.py``'s measurement):
  hand-overs per second, fairness (fewest ÷ most acquisitions), latency; ours and
  ``GET_LOCK``.

Writes a MySQL section into ``benchmarks/RESULTS.md`` and ``benchmarks/CONTENTION.md``
(between markers, so the other stores' figures stay) and prints it.

    python benchmarks/mysql_bench.py             # about two minutes
    python benchmarks/mysql_bench.py --quick     # a rough pass
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import contention  # noqa: E402
import run  # noqa: E402
from run import Case  # noqa: E402

from singleton_integrations import persisters  # noqa: E402

TABLE = run.MYSQL_TABLE
MARK = "<!-- mysql_bench.py: from here to its end mark; the rest of the file is run.py's or contention.py's -->"
END_MARK = "<!-- /mysql_bench.py -->"
READING = (
    "Where the time goes: the floor and ours both make 2 round trips and 2 flushed commits per cycle, so the "
    "server does alike work; the difference is client CPU (the column above): PyMySQL parses one answer per "
    "statement (7 per cycle, against 2), and the lock keeps its own books (owner token, lease estimate, events). "
    "On a loaded "
    "2-CPU machine that CPU becomes waiting for a core, so the ratio moves with the load. Contended: waiters in "
    "other processes poll every 250 ms (MySQL cannot notify a client), and the fair queue gives a free name only "
    "to the longest waiter, so each hand-over waits for that waiter's next poll (jittered 125-250 ms): a few "
    "hand-overs per second, in turn. `GET_LOCK` is granted inside the server at once, but it has no lease (a hung "
    "holder keeps it until its connection ends), no holder record and no fencing token, and it is bound to one "
    "session (it breaks behind a proxy that reuses connections)."
)


@contextlib.contextmanager
def counting_commands() -> Iterator[list[str]]:
    """Every command PyMySQL sends (one round trip each), as the first word of each statement it carries."""
    import pymysql.connections

    sent: list[str] = []
    original = pymysql.connections.Connection._execute_command

    def counted(self: Any, command: int, sql: Any) -> Any:
        text = sql.decode("utf-8", "replace") if isinstance(sql, (bytes, bytearray)) else str(sql)
        # The persister's statements sent together are separated by ";\n".
        words = [part.split(None, 1)[0].upper() for part in text.split(";\n") if part.strip()]
        sent.append("+".join(words) or str(command))
        return original(self, command, sql)

    pymysql.connections.Connection._execute_command = counted
    try:
        yield sent
    finally:
        pymysql.connections.Connection._execute_command = original


def profile(cases: list[Case], cycles: int = 50) -> dict[str, str]:
    """Per case: round trips per cycle and the statements they carry."""
    found = {}
    for case in cases:
        with counting_commands() as sent:
            for _ in range(cycles):
                case.cycle()
        words: dict[str, int] = {}
        for word in sent:
            words[word] = words.get(word, 0) + 1
        detail = ", ".join(f"{count / cycles:g} {word}" for word, count in sorted(words.items(), key=lambda kv: -kv[1]))
        found[case.label] = f"{len(sent) / cycles:g} ({detail})"
    return found


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def per_round_ratios(case: Case, floor: Case) -> list[float]:
    return [mine / base for mine, base in zip(case.rates, floor.rates, strict=False) if base > 0]


def render(cases: list[Case], trips: dict[str, str], latencies: list[float] | str,
           handovers: list[contention.HandoverResult], skipped: list[str], loads: dict[str, str],
           args: argparse.Namespace, elapsed: float) -> tuple[str, str]:
    floor = next((case for case in cases if case.floor), None)
    lines = [
        MARK,
        "## MySQL and MariaDB (benchmarks/mysql_bench.py)",
        "",
        f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {platform.node()} "
        f"({os.cpu_count()} CPUs, Python {platform.python_version()}); {run.mysql_server_version()} on loopback "
        f"(`innodb_flush_log_at_trx_commit=1`: every commit is flushed). Everything below ran in one run of "
        f"{elapsed:.0f} s. **The machine was shared with other jobs** (load average 1/5/15 min: "
        f"{loads['start']} at the start, {loads['throughput']} after the cycles, {loads['end']} at the end), so "
        "absolute rates are low and noisy; the ratios, taken round by round, are the figures to read.",
        "",
        f"Uncontended `lock()` + `release()` cycles per second: {args.rounds} interleaved rounds of {args.seconds:g} s "
        f"after a {args.warmup:g} s warm-up (order reversed every other round). Ratio: the median of the per-round "
        "ratios to the floor, with their spread. Round trips: commands sent per cycle, counted in PyMySQL, with the "
        "statements each carries.",
        "",
        "| Implementation | cycles/s (median) | runs (min-max) | ratio to floor | per-round ratios (min-max) "
        "| round trips per cycle | client CPU µs/cycle | notes |",
        "|---|---:|---|---:|---|---|---:|---|",
    ]
    for case in cases:
        ratios = per_round_ratios(case, floor) if floor else []
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "n/a"
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
        label = f"**{case.label}**" if case.label.startswith("singleton-integrations") else case.label
        cpu = f"{statistics.median(case.cpu_per_cycle) * 1e6:.0f}" if case.cpu_per_cycle else ""
        lines.append(f"| {label} | {case.rate:.0f} | {min(case.rates):.0f}-{max(case.rates):.0f} | {ratio} | {spread} "
                     f"| {trips.get(case.label, '')} | {cpu} | {case.note} |")
    lines += ["", "Target (issue 23): at least 0.9 of the floor.", "", READING, ""]
    if isinstance(latencies, str):
        lines.append(f"Hand-over latency in one process: not measured ({latencies}).")
    else:
        lines.append(
            f"Hand-over latency in one process (a waiter in `lock(wait=30)` on its own persister; run.py's measure): "
            f"{len(latencies)} hand-overs, median {statistics.median(latencies) * 1e3:.2f} ms, "
            f"p99 {run.percentile(latencies, 0.99) * 1e3:.2f} ms, max {max(latencies) * 1e3:.2f} ms "
            "(a release in the same process wakes the waiter; other processes poll every 250 ms).")
    contended = [
        "",
        f"{args.processes} processes on one name for {args.handover_seconds:g} s, each holding it "
        f"{contention.HOLD_SECONDS * 1000:g} ms then asking again (contention.py's measure): a hand-over is a change "
        "of holder; its latency runs from one process's release to the next holder's acquire.",
        "",
        "| implementation | processes | acquisitions | hand-overs/s | fairness (fewest/most) | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for result in handovers:
        label = "**ours** (fair queue, poll 250 ms)" if result.implementation == "ours" else result.implementation
        contended.append(f"| {label} | {result.processes} | {result.acquisitions} | {result.handovers_per_s:.0f} | "
                         f"{result.fairness:.2f} ({result.fewest}/{result.most}) | {result.p50_ms:.2f} | "
                         f"{result.p99_ms:.2f} |")
    if skipped:
        contended += ["", "Not measured: " + "; ".join(skipped) + "."]
    quick = " --quick" if args.quick else ""
    closing = ["", f"Rerun: `python benchmarks/mysql_bench.py{quick}` (the `mysql` extra; "
               "`SINGLETON_TEST_MYSQL_URL` names another server).", END_MARK]
    results = "\n".join(lines + contended + closing)
    contention_section = "\n".join([
        MARK, "### MySQL and MariaDB: contended hand-over between processes (benchmarks/mysql_bench.py)", "",
        f"Measured with the figures in RESULTS.md's MySQL section, in the same run; load average {loads['end']}.",
        *contended, *closing,
    ])
    return results, contention_section


def place_section(path: Path, section: str) -> None:
    """Replace the marked MySQL section of ``path``, or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(MARK) + r".*?" + re.escape(END_MARK), re.DOTALL)
    found = pattern.search(text)
    text = pattern.sub(lambda _: section, text) if found else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, quick 5)")
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--handovers", type=int, default=None, help="in-process hand-overs (default 200, quick 50)")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="Markdown file for the section, or -")
    parser.add_argument("--contention", default=str(HERE / "CONTENTION.md"), help="Markdown file for the section, or -")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (5 if args.quick else 15)
    if args.rounds < 5:
        parser.error("at least 5 rounds")
    args.seconds, args.warmup = (0.3, 0.2) if args.quick else (1.0, 0.5)  # MySQL cycles are slow: 1 s rounds
    args.handover_seconds = 3.0 if args.quick else 10.0
    count = args.handovers or (50 if args.quick else 200)

    started = time.monotonic()
    loads = {"start": load()}
    cases = []
    for factory in run.mysql_cases():
        case = factory()
        case.cycle()  # fail early and visibly, not in the middle of the timing
        cases.append(case)
    try:
        trips = profile(cases)
        print(f"round trips per cycle: {trips}", file=sys.stderr)
        run.throughput(cases, args.rounds, args.seconds, args.warmup)
    finally:
        for case in cases:
            with contextlib.suppress(Exception):
                case.close()
    loads["throughput"] = load()

    url = run.mysql_url()
    latencies: list[float] | str
    try:
        latencies = run.handover(lambda: persisters.MySql(url, table=TABLE), count, "mysql")
    except Exception as error:
        latencies = f"{type(error).__name__}: {error}"
    finally:
        run.mysql_drop(url, TABLE, f"{TABLE}_waiters", f"{TABLE}_holds")

    handovers: list[contention.HandoverResult] = []
    skipped: list[str] = []
    separator = "&" if "?" in url else "?"
    for impl in ("ours", "GET_LOCK"):
        try:
            handovers.append(contention._handover("mysql", impl, f"{url}{separator}table={TABLE}", args.processes,
                                                  args.handover_seconds))
            print(f"handover {impl}: {handovers[-1]}", file=sys.stderr)
        except Exception as error:
            skipped.append(f"{impl}: {type(error).__name__}: {str(error)[:200]}")
    run.mysql_drop(url, TABLE, f"{TABLE}_waiters", f"{TABLE}_holds")
    loads["end"] = load()

    results, contention_section = render(cases, trips, latencies, handovers, skipped, loads, args,
                                         time.monotonic() - started)
    print(results)
    if args.results != "-":
        place_section(Path(args.results), results)
    if args.contention != "-":
        place_section(Path(args.contention), contention_section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
