"""The ``singleton`` command: run a shell command under a named lock, like ``flock -n`` across hosts.

Exit codes (docs/cli.md has the table): the command's own code, or 128+N when
signal N killed it; 1 for "free"/"nothing to release"; 64 usage; 69 store
unavailable; 70 internal error; 75 conflict (``--conflict-exit-code``), and for
``release --fencing-token`` another hold has the lock; 79 the lock was lost and
the command was terminated; 126/127 command not executable/found.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from types import FrameType
from typing import Any, NoReturn, final

from . import __version__, admin, persisters, stores
from ._errors import NotHeld, PersisterError, SingletonError, TokenChanged
from ._record import MAX_LIMIT, LockRecord, validate_limit, validate_name
from ._singleton import Singleton
from ._urls import redact_url, scrub
from .admin import LockRow

__all__ = [
    "EXIT_CONFLICT",
    "EXIT_FREE",
    "EXIT_LOCK_LOST",
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "EXIT_SOFTWARE",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "main",
]

EXIT_FREE = 1  # status: nobody holds the lock; release: nothing was held
EXIT_USAGE = 64  # EX_USAGE: bad arguments, bad URL, bad lock name
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the store cannot be reached, refused, or its driver is missing
EXIT_SOFTWARE = 70  # EX_SOFTWARE: a bug in singleton itself
EXIT_CONFLICT = 75  # EX_TEMPFAIL: another live holder has the lock (run; release --fencing-token)
EXIT_LOCK_LOST = 79  # next to the sysexits range: the lease was lost, so CMD was terminated
EXIT_NOT_EXECUTABLE = 126  # as shells do
EXIT_NOT_FOUND = 127  # as shells do

DEFAULT_RUN_TTL = 60.0
DEFAULT_KILL_AFTER = 10.0
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: ``--KIND NAME`` options that name a store through ``singleton_integrations.stores`` resolvers.
_SOURCES = {
    "airflow-conn": ("ID", ("the store of this Airflow connection, looked up through Airflow (its secrets backend, "
                            "AIRFLOW_CONN_<ID>, its metadata database); needs the airflow extra")),
    "prefect-block": ("NAME", ("the store of this saved Singleton block, loaded from the Prefect API; lock names "
                               "get its name prefix; needs the prefect extra")),
}

log = logging.getLogger("singleton_integrations.cli")


class UsageError(Exception):
    """Bad arguments: reported in one line with ``EXIT_USAGE``."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 64, not argparse's usage dump and exit 2
        raise UsageError(f"{self.prog}: {message}")


# -- argument types -----------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _wait_seconds(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _seconds(text)


def _exit_code(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 255:
        raise argparse.ArgumentTypeError(f"expected an exit code from 0 to 255, got {text!r}")
    return int(text)


def _limit(text: str) -> int:
    try:
        return validate_limit(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_LIMIT}, got {text!r}") from None


def _fencing_token(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a fencing token (a whole number, as status and list show it), got {text!r}")
    return int(text)


def _metadata_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _source_name(text: str) -> str:
    if not text.strip() or any(ord(c) < 32 for c in text):
        raise argparse.ArgumentTypeError(f"expected a name, got {text!r}")
    return text


def _build_parser(with_command: bool = True) -> _Parser:
    common = _Parser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--url", help="store URL, or an Airflow connection URI of the provider's types "
                                     "(default: $SINGLETON_URL, else SQLite in your state directory)")
    for kind, (metavar, text) in _SOURCES.items():
        where.add_argument(f"--{kind}", metavar=metavar, type=_source_name, help=text)
    common.add_argument("-v", "--verbose", action="store_true", help="log every lock event to stderr")

    parser = _Parser(prog="singleton", description="Only one instance of a job at a time, across processes and hosts.")
    parser.add_argument("--version", action="version", version=f"singleton-integrations {__version__}")
    commands = parser.add_subparsers(dest="action", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser("run", parents=[common], help="run CMD while holding the lock NAME",
                              usage="singleton run NAME [options] -- CMD [ARGS...]")
    run.add_argument("name", metavar="NAME")
    run.add_argument("--ttl", type=_seconds, metavar="S", default=DEFAULT_RUN_TTL,
                     help=f"lease length in seconds (default {DEFAULT_RUN_TTL:g}); renewed every third of it")
    run.add_argument("--wait", type=_wait_seconds, metavar="S", default=0.0,
                     help="wait up to S seconds for the lock (default 0)")
    run.add_argument("--min-hold", type=_seconds, metavar="S", default=None,
                     help="keep the name taken until S seconds after the start, even if CMD ends sooner, so "
                          "runs started within S seconds of each other (other hosts' schedulers) skip the slot")
    run.add_argument("--limit", type=_limit, metavar="N", default=1,
                     help="let up to N runs hold NAME at once, across hosts (default 1); each counts every live "
                          "hold, so runs given different N each stay within their own")
    run.add_argument("--renew", action=argparse.BooleanOptionalAction, default=True,
                     help="keep renewing the lease while CMD runs (default on)")
    run.add_argument("--conflict-exit-code", type=_exit_code, metavar="N", default=EXIT_CONFLICT,
                     help=f"exit code when another holder has the lock (default {EXIT_CONFLICT})")
    run.add_argument("--kill-after", type=_seconds, metavar="S", default=DEFAULT_KILL_AFTER,
                     help=f"after losing the lock, SIGKILL CMD if SIGTERM has not ended it in S s "
                          f"(default {DEFAULT_KILL_AFTER:g})")
    run.add_argument("--metadata", type=_metadata_item, action="append", default=[], metavar="KEY=VALUE",
                     help="shown to whoever finds the lock held; repeatable")
    if with_command:  # without '--', CMD is whatever follows NAME
        run.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="the command and its arguments")
    run.set_defaults(handler=_cmd_run)

    status = commands.add_parser("status", parents=[common], help="who holds NAME (exit 0 if held, 1 if free)")
    status.add_argument("name", metavar="NAME")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_cmd_status)

    listing = commands.add_parser("list", parents=[common], help="live locks as a table")
    listing.add_argument("--prefix", default="", help="only names starting with this")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_list)

    release = commands.add_parser("release", parents=[common], help="break a lock (admin): the hold with a fencing "
                                  "token, or whoever holds it with --force")
    release.add_argument("name", metavar="NAME")
    release.add_argument("--fencing-token", type=_fencing_token, metavar="N", default=None,
                         help="release only while the hold with fencing token N has the lock (see status or list); "
                              f"if another hold has it now, release nothing and exit {EXIT_CONFLICT}")
    release.add_argument("--force", action="store_true",
                         help="without --fencing-token: confirms breaking the lock whoever holds it")
    release.set_defaults(handler=_cmd_release)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["run"] and "--" in argv:
        cut = argv.index("--")
        args = _build_parser(with_command=False).parse_args(argv[:cut])
        args.command = argv[cut + 1:]
        return args
    args = _build_parser().parse_args(argv)
    if args.action == "run" and args.command and args.command[0].startswith("-"):
        raise UsageError(f"singleton run: options after NAME need '--' before CMD (got {args.command[0]!r})")
    return args


# -- the store ---------------------------------------------------------------------------


class _Store:
    """Opens the persister and maps what it raises to the CLI's errors, scrubbing passwords.

    ``url`` comes from ``--url`` or ``$SINGLETON_URL`` (None: the SQLite default), or from
    ``source``, where ``--airflow-conn`` or ``--prefect-block`` resolved to.
    """

    def __init__(self, url: str | None, source: stores.StoreLocation | None = None) -> None:
        self.url = url
        self.urls = [url]  # every spelling of the URL whose secrets must not show
        self.name_prefix = source.name_prefix if source else ""
        self.source = source.description if source else ""
        try:
            if url and source is None:
                self.url = stores.store_url(url)  # an Airflow connection URI: the store URL it names
                if self.url != url:
                    self.urls.append(self.url)
                    self.source = f"--url {redact_url(url)}"
            self.persister = persisters.from_url(self.url) if self.url else persisters.Sqlite()
        except ImportError as error:
            raise PersisterError(_scheme(self.url), f"this store is not available here ({error})") from None
        except (ValueError, TypeError) as error:
            origin = f" from {self.source}" if self.source else ""
            raise UsageError(f"singleton: bad store URL{origin}: {self.scrub(str(error))}") from None
        if not self.persister.multiprocess:
            raise UsageError(f"singleton: {redact_url(self.url or '')!r} lives inside one process; "
                             "the CLI needs a store other processes can see")
        if self.source:
            log.debug("the store of %s: %s", self.source, redact_url(self.url or ""))

    def where(self) -> str:
        """Where the store came from, for errors: empty for a URL given as it is."""
        return f" at {redact_url(self.url or '')} ({self.source})" if self.source else ""

    def stored(self, name: str) -> str:
        """The name as stored: the source's name prefix, then ``name``."""
        return _name(self.name_prefix + _name(name))

    def shown(self, record: LockRecord) -> LockRecord:
        """``record`` named as the user names it, without the source's name prefix."""
        if self.name_prefix and record.name.startswith(self.name_prefix):
            return dataclasses.replace(record, name=record.name[len(self.name_prefix):])
        return record

    def call(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except SingletonError:
            raise
        except Exception as error:  # a driver error the persister did not wrap
            raise PersisterError(self.persister.backend, f"{type(error).__name__}: {error}") from error

    def scrub(self, text: str) -> str:
        return _scrub(text, *self.urls)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort; the process is ending
            self.persister.close()


def _scrub(text: str, *urls: str | None) -> str:
    """``text`` without the URLs' passwords, in any spelling, even where a driver echoed them bare."""
    return scrub(text, *urls)


def _scheme(url: str | None) -> str:
    return (url or "sqlite:").partition(":")[0].lower() or "store"


# -- output helpers ----------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"singleton: {message}", file=sys.stderr, flush=True)


def _iso(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _relative(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    delta = moment.timestamp() - time.time()
    span = abs(delta)
    text = f"{span:.0f} s" if span < 120 else f"{span / 60:.0f} min" if span < 7200 else f"{span / 3600:.1f} h"
    return f"in {text}" if delta >= 0 else f"{text} ago"


def _metadata_text(record: LockRecord) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(record.metadata.items()))


def _holder_line(record: LockRecord) -> str:
    """Who holds a lock, for humans: host, pid, since when, until when, fencing token, metadata."""
    if record.released_at is not None:
        return _ran_line(record)
    line = (f"lock {record.name!r} is held by {record.host} pid {record.pid} since {_iso(record.created_at)} "
            f"({_relative(record.created_at)}), expires {_relative(record.expires_at)}, "
            f"fencing token {record.fencing_token}")
    meta = _metadata_text(record)
    return f"{line}, {meta}" if meta else line


def _ran_line(record: LockRecord) -> str:
    """A lock released into its minimum hold: the slot already ran, when and where, and when it frees."""
    meta = _metadata_text(record)
    where = f"{record.host} pid {record.pid}" + (f" ({meta})" if meta else "")
    until = record.hold_until or record.expires_at
    return (f"lock {record.name!r} already ran this slot: started {_iso(record.created_at)} "
            f"({_relative(record.created_at)}) on {where}, finished {_iso(record.released_at)}; "
            f"held until {_iso(until)} ({_relative(until)}) for the minimum hold, fencing token {record.fencing_token}")


class _EventFilter(logging.Filter):
    """Show the events a CLI user needs (a takeover, a loss, admin actions); everything with -v."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.name.startswith(log.name):
            return True
        return getattr(record, "singleton_event", None) in ("expired", "lost")


def _configure_logging(verbose: bool) -> None:
    root = logging.getLogger("singleton_integrations")
    for old in [h for h in root.handlers if getattr(h, "singleton_cli", False)]:
        root.removeHandler(old)  # main() called again in one process: one handler, not two
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("singleton: %(message)s"))
    handler.addFilter(_EventFilter(verbose))
    handler.singleton_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


# -- run -----------------------------------------------------------------------------------


@final
class _SignalRelay:
    """Forwards SIGTERM, SIGINT and SIGHUP to CMD; before CMD starts, a signal cancels the wait."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.cancelled = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalRelay:
        for signum in _FORWARDED:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue  # ignored when we started (e.g. a background job): CMD inherits that, as from a shell
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def attach(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        if self.received is not None:  # arrived between the lock and the spawn
            self._forward(self.received)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self.cancelled.set()
        if self.child is not None:
            self._forward(signum)

    def _forward(self, signum: int) -> None:
        child = self.child
        if child is None or child.returncode is not None:
            return
        if signum == signal.SIGINT and _terminal_signals_our_group():
            return  # Ctrl-C already reached CMD: the terminal signals the whole foreground group
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)


def _terminal_signals_our_group() -> bool:
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def _cmd_run(args: argparse.Namespace, store: _Store) -> int:
    command: list[str] = args.command
    if not command:
        raise UsageError("singleton run: no command given; write: singleton run NAME [options] -- CMD [ARGS...]")
    metadata = {"command": os.path.basename(command[0])[:200]}
    metadata.update(dict(args.metadata))
    try:
        hold: dict[str, Any] = {} if args.min_hold is None else {"min_hold_seconds": args.min_hold}
        lock = Singleton(store.stored(args.name), store.persister, lock_expire_seconds=args.ttl,
                         auto_renew=args.renew, metadata=metadata, release_on_sigterm=False, limit=args.limit,
                         **hold)  # the relay owns SIGTERM
    except (ValueError, TypeError) as error:
        raise UsageError(f"singleton run: {error}") from None
    with _SignalRelay() as relay:
        acquired = lock.lock(wait=args.wait, cancel=relay.cancelled)
        if relay.received is not None:
            if acquired:
                lock.release()
            return 128 + relay.received
        if not acquired:
            _say(_refusal(args.name, lock, store))
            return int(args.conflict_exit_code)
        try:
            return _supervise(lock, command, relay, args.kill_after, store)
        finally:
            _release_quietly(lock, store)


def _supervise(lock: Singleton, command: list[str], relay: _SignalRelay, kill_after: float, store: _Store) -> int:
    wake, exited, lost = threading.Event(), threading.Event(), threading.Event()

    def on_lost(message: object) -> None:
        lost.set()
        wake.set()

    lock.on("lost", on_lost)
    lock.on("error", lambda error: _say(f"renewing lock {lock.name!r} failed: {store.scrub(str(error))}; "
                                        "retrying until the lease ends"))
    try:
        # CMD can hand the fencing token to the resource it writes, which then refuses older tokens.
        env = dict(os.environ, SINGLETON_NAME=lock.name, SINGLETON_FENCING_TOKEN=str(lock.fencing_token))
        child = subprocess.Popen(command, env=env)
    except FileNotFoundError:
        _say(f"{command[0]}: command not found")
        return EXIT_NOT_FOUND
    except OSError as error:
        _say(f"{command[0]}: cannot run: {error.strerror or error}")
        return EXIT_NOT_EXECUTABLE
    relay.attach(child)

    def reap() -> None:
        child.wait()
        exited.set()
        wake.set()

    threading.Thread(target=reap, name="singleton-cmd-waiter", daemon=True).start()
    while not wake.wait(1.0):
        pass
    if lost.is_set() and not exited.is_set():
        _say(f"terminating {command[0]} (pid {child.pid}): it may no longer run exclusively")
        child.terminate()
        if not exited.wait(kill_after):
            _say(f"{command[0]} (pid {child.pid}) outlived SIGTERM by {kill_after:g} s; sending SIGKILL")
            child.kill()
            exited.wait()
        return EXIT_LOCK_LOST
    code = child.returncode
    return 128 - code if code < 0 else code


def _release_quietly(lock: Singleton, store: _Store) -> None:
    try:
        lock.release()  # a lock found lost here is reported by the ``lost`` event's log line
    except SingletonError as error:
        _say(f"could not release lock {lock.name!r} ({store.scrub(str(error))}); it expires when its lease ends")


def _refusal(name: str, lock: Singleton, store: _Store) -> str:
    """Why ``run`` did not start CMD: the holder, or under ``--limit`` every hold, one line each."""
    holds = [store.shown(record) for record in lock.last_holders]
    if lock.limit > 1 and holds:
        lines = [f"lock {name!r} is at its limit: {len(holds)} of {lock.limit} held"]
        return "\n".join(lines + [f"  {_holder_line(record)}" for record in holds])
    holder = lock.last_holder
    return _holder_line(store.shown(holder)) if holder else f"lock {name!r} is held by another process"


# -- status, list, release -------------------------------------------------------------


def _cmd_status(args: argparse.Namespace, store: _Store) -> int:
    name = _name(args.name)
    found: list[LockRecord] = store.call(store.persister.holders, store.stored(name))
    records = [store.shown(record) for record in found]
    if args.json:  # "holder": the first hold, as before limits; "holders": every one
        print(json.dumps({"name": name, "held": bool(records), "holder": records[0].to_dict() if records else None,
                          "holders": [record.to_dict() for record in records]}))
    elif not records:
        print(f"lock {name!r} is free")
    else:
        print("\n".join(_holder_line(record) for record in records))
    return 0 if records else EXIT_FREE


def _cmd_list(args: argparse.Namespace, store: _Store) -> int:
    found: list[LockRecord] = store.call(store.persister.list, store.name_prefix + args.prefix)
    records = [store.shown(record) for record in found]
    if args.json:  # the operator's row, as Prefect's and Airflow's admin views show it
        print(json.dumps([LockRow.from_record(record).to_json() for record in records], indent=2))
        return 0
    if not records:
        print("no live locks" + (f" starting with {args.prefix!r}" if args.prefix else ""), file=sys.stderr)
        return 0
    rows = [("NAME", "HOLDER", "SINCE", "EXPIRES", "FENCE", "METADATA")]
    rows += [(r.name, f"{r.host}:{r.pid}" + (" (ran)" if r.released else ""), _iso(r.created_at),
              _relative(r.expires_at), str(r.fencing_token), _metadata_text(r)) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_release(args: argparse.Namespace, store: _Store) -> int:
    name = _name(args.name)
    if args.fencing_token is not None:
        return _release_hold(name, args.fencing_token, store)
    if not args.force:
        raise UsageError("singleton release: this breaks another owner's lock; add --force to confirm, "
                         "or --fencing-token N to release only the hold you looked at")
    record: LockRecord | None = store.call(store.persister.force_release, store.stored(name))
    if record is None:
        _say(f"lock {name!r} is not held; nothing released")
        return EXIT_FREE
    _log_released(record)
    return 0


def _release_hold(name: str, fencing_token: int, store: _Store) -> int:
    """``release --fencing-token``: only while that hold has the lock, through the owner-checked release."""
    try:
        record: LockRecord = store.call(admin.force_release, store.persister, store.stored(name), fencing_token)
    except NotHeld as error:
        if error.record is None:
            _say(f"lock {name!r} is not held; nothing released")
        else:
            _say(f"{_ran_line(store.shown(error.record))}; its holder already released it, so nothing was released "
                 "(release --force without --fencing-token ends the minimum hold)")
        return EXIT_FREE
    except TokenChanged as error:
        now = f"; {_holder_line(store.shown(error.holder))}" if error.holder is not None else ""
        _say(f"fencing token {fencing_token} no longer holds lock {name!r}, so nothing was released{now}")
        return EXIT_CONFLICT
    _log_released(record)
    if record.hold_until is not None and record.hold_until.timestamp() > time.time():
        _say(f"lock {name!r} stays taken for its minimum hold, until {_iso(record.hold_until)} "
             f"({_relative(record.hold_until)}), as after its holder's own release")
    return 0


def _log_released(record: LockRecord) -> None:
    log.warning("force-released lock %r held by %s pid %d since %s (fencing token %d), requested by %s on %s pid %d",
                record.name, record.host, record.pid, _iso(record.created_at), record.fencing_token, _user(),
                os.uname().nodename, os.getpid())


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except (ValueError, TypeError) as error:
        raise UsageError(f"singleton: {error}") from None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no $USER: still log the action
        return f"uid {os.getuid()}"


# -- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to ``sys.exit``)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    store: _Store | None = None
    url = os.environ.get("SINGLETON_URL") or None
    urls: list[str | None] = [url]  # what to scrub from any message: also the URL a source resolves to
    try:
        args = _parse(arguments)
        _configure_logging(args.verbose)
        source = _source(args)
        url = source.url if source else args.url or url
        urls = [url]
        store = _Store(url, source)
        urls = store.urls
        return int(args.handler(args, store))
    except UsageError as error:
        print(f"{_scrub(_first_line(error), *urls)} (see: singleton --help)", file=sys.stderr)
        return EXIT_USAGE
    except stores.StoreSourceError as error:
        _say(_scrub(_source_line(error), *urls))
        return EXIT_UNAVAILABLE if isinstance(error, stores.SourceUnavailable) else EXIT_USAGE
    except PersisterError as error:
        where = store.where() if store is not None else ""
        _say(f"store unavailable{where}: {_scrub(_first_line(error), *urls)}")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        _say("interrupted")
        return 128 + signal.SIGINT
    except Exception as error:  # a bug: one line, and the traceback only on request
        if os.environ.get("SINGLETON_DEBUG"):
            raise
        detail = _scrub(_first_line(error), *urls)
        _say(f"internal error: {type(error).__name__}: {detail} (set SINGLETON_DEBUG=1 for details)")
        return EXIT_SOFTWARE
    finally:
        if store is not None:
            store.close()


def _source(args: argparse.Namespace) -> stores.StoreLocation | None:
    """Where ``--airflow-conn`` or ``--prefect-block`` points, if one was given (argparse allows one)."""
    for kind in _SOURCES:
        name = getattr(args, kind.replace("-", "_"))
        if name is not None:
            with _orchestrator_quiet():
                return stores.resolve(kind, name)
    return None


@contextlib.contextmanager
def _orchestrator_quiet() -> Iterator[None]:
    """The orchestrator's own log lines and warnings off while it is asked, as its CLI has them.

    Airflow logs to stdout, which ``--json`` owns; what went wrong comes back as the resolver's error.
    """
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


def _source_line(error: stores.StoreSourceError) -> str:
    if isinstance(error, stores.SourceNotInstalled):  # not about the name: the option needs an extra
        return f"--{error.kind} {_first_line(error.reason)}"
    return f"--{error.kind} {error.name!r}: {_first_line(error.reason)}"


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
