"""Secrets stay secret: passwords never shown, owner tokens unguessable, releases owner-checked."""

from __future__ import annotations

import logging
import pickle
import re
import secrets
import socket
import traceback
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from singleton_integrations import LockConflict, Owner, PersisterError, Singleton, persisters
from tests.conftest import store_url_for

PASSWORD = "Pa55-w0rd-never-shown"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_password(url: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    user = parts.username or "user"
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{PASSWORD}@{host}:{port or parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


QUICK_FAIL = {"redis": "socket_connect_timeout=1&socket_timeout=1", "postgres": "connect_timeout=1&pool_timeout=2",
              "mongodb": "timeoutMS=1500&serverSelectionTimeoutMS=1500&connectTimeoutMS=1000"}


def everything_shown(error: BaseException | None, store: Any, job: Any, caplog: pytest.LogCaptureFixture) -> str:
    parts = [repr(store), str(store), repr(job), caplog.text]
    parts += [record.getMessage() for record in caplog.records]
    if error is not None:
        parts += [str(error), repr(error), "".join(traceback.format_exception(error))]
        parts.append(repr(pickle.loads(pickle.dumps(error))))
    return "\n".join(parts)


@pytest.mark.parametrize("reachable", [False, True], ids=["unreachable", "live-server"])
def test_password_never_shown(networked_kind: str, reachable: bool, tmp_path: Any,
                              caplog: pytest.LogCaptureFixture) -> None:
    """A URL with a password, on a dead port and on the live server: no message, repr, traceback or log shows it."""
    caplog.set_level(logging.DEBUG)
    base = store_url_for(networked_kind, tmp_path)
    url = with_password(base, None if reachable else _free_port())
    url += ("&" if "?" in url else "?") + QUICK_FAIL[networked_kind]
    store = persisters.from_url(url)
    job = Singleton(f"reliability-secret-{uuid.uuid4().hex[:8]}", store, lock_expire_seconds=30)
    error: BaseException | None = None
    try:
        if job.lock():
            job.release()
    except PersisterError as caught:
        error = caught
    finally:
        store.close()
    if not reachable:
        assert error is not None, "a dead port must give a PersisterError"
    shown = everything_shown(error, store, job, caplog)
    assert PASSWORD not in shown
    assert "Pa55" not in shown


def test_owner_tokens_come_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every owner token is drawn from ``secrets`` with at least 128 bits."""
    asked: list[int] = []
    real = secrets.token_hex

    def spy(nbytes: int | None = None) -> str:
        asked.append(nbytes or 32)
        return real(nbytes)

    monkeypatch.setattr(secrets, "token_hex", spy)
    store = persisters.Memory()
    job = Singleton("reliability-token-source", store)
    assert job.lock()
    record = job.record
    job.release()
    assert asked and min(asked) >= 16
    assert record is not None and re.fullmatch(r"[0-9a-f]{32,}", record.owner_token)


def test_owner_tokens_are_unique_and_wide() -> None:
    tokens = {Owner().owner_token for _ in range(5000)}
    assert len(tokens) == 5000
    assert all(len(token) >= 32 for token in tokens)
    # No structure to guess from: every hex digit appears in every position across the sample.
    for position in range(32):
        assert len({token[position] for token in tokens}) == 16


def test_owner_token_not_shown(kind: str, url: str) -> None:
    """The token is a capability: no repr, description, conflict message or dict view carries it."""
    store = persisters.from_url(url)
    holder = Singleton(f"reliability-token-{uuid.uuid4().hex[:8]}", store, lock_expire_seconds=30)
    rival = Singleton(holder.name, persisters.from_url(url), lock_expire_seconds=30)
    assert holder.lock()
    try:
        token = holder.record.owner_token
        assert not rival.lock()
        conflict = LockConflict(holder.name, rival.last_holder)
        shown = [repr(holder), repr(holder.record), holder.record.describe(), str(holder.record.to_dict()),
                 repr(rival.last_holder), str(conflict), repr(store), repr(Owner())]
        assert all(token not in text for text in shown)
    finally:
        holder.release()


def test_non_owner_release_refused(kind: str, url: str) -> None:
    """Releases are owner-checked at the store: a wrong token or another instance cannot free the lock."""
    store = persisters.from_url(url)
    holder = Singleton(f"reliability-owner-{uuid.uuid4().hex[:8]}", store, lock_expire_seconds=30)
    stranger = Singleton(holder.name, persisters.from_url(url), lock_expire_seconds=30)
    assert holder.lock()
    try:
        assert store.release(holder.name, secrets.token_hex(16)) is False
        assert store.release(holder.name, "") is False
        assert stranger.release() is False
        assert store.renew(holder.name, secrets.token_hex(16), 30) is None
        current = store.get(holder.name)
        assert current is not None and current.owner_token == holder.record.owner_token
    finally:
        assert holder.release() is True


def test_force_release_is_logged(kind: str, url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The one way to free another owner's lock, force_release, leaves a warning naming the lock and its holder."""
    caplog.set_level(logging.INFO, logger="singleton_integrations")
    store = persisters.from_url(url)
    holder = Singleton(f"reliability-force-{uuid.uuid4().hex[:8]}", store, lock_expire_seconds=30)
    assert holder.lock()
    removed = persisters.from_url(url).force_release(holder.name)
    assert removed is not None and removed.fencing_token == holder.fencing_token
    assert store.get(holder.name) is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and holder.name in r.getMessage()]
    assert warnings, "force_release left no warning in the log"


#: Malformed store URLs and DSNs that carry a password: one slash, no scheme, bad ports, bad options, libpq key=value.
BAD_URLS = (
    "redis:/user:{pw}@127.0.0.1:1/0",
    "redis:user:{pw}@127.0.0.1:1/0",
    "user:{pw}@127.0.0.1:1",
    "//user:{pw}@127.0.0.1:1/0",
    "redis://user:{pw}@127.0.0.1:notaport/0",
    "redis://user:{pw}@127.0.0.1:1/notadb",
    "redis://user:{pw}@127.0.0.1:1/0?socket_timeout=soon",
    "rediss://user:{pw}@127.0.0.1:1/0?ssl_cert_reqs=bogus",
    "redis://:{pw}%2Fenc@127.0.0.1:1/0",
    "postgres:/user:{pw}@127.0.0.1:1/test",
    "postgresql://user:{pw}@127.0.0.1:1/test?sslmode=bogus",
    "postgresql://user:{pw}@[::1/test",
    "postgresql://127.0.0.1:1/test?password={pw}&connect_timeout=1",
    "host=127.0.0.1 port=1 user=postgres password={pw} dbname=test connect_timeout=1",
    "password={pw} host=127.0.0.1 port=1",
    "mongodb:/user:{pw}@127.0.0.1:1/",
    "mongodb://user:{pw}@127.0.0.1:1/?bogusOption=1",
    "mongodb://user:{pw}@127.0.0.1:notaport/",
    "mongodb://user:{pw}@127.0.0.1:1/?serverSelectionTimeoutMS=soon",
)


def public_view(store: Any) -> str:
    """Every public attribute of a persister, as text (``url`` included when it is a property)."""
    attributes = {key: value for key, value in vars(store).items() if not key.startswith("_")}
    for key in ("url", "dsn", "conninfo"):
        if hasattr(type(store), key):
            attributes[key] = getattr(store, key, None)
    return "\n".join(f"{key}={value!s} {value!r}" for key, value in attributes.items())


def _error_text(error: BaseException) -> str:
    return "\n".join([str(error), repr(error), "".join(traceback.format_exception(error))])


@pytest.mark.parametrize("template", BAD_URLS)
def test_bad_url_never_shows_the_password(template: str, caplog: pytest.LogCaptureFixture) -> None:
    """A malformed URL or DSN with a password: from_url, Singleton() and a lock attempt never show it."""
    caplog.set_level(logging.DEBUG)
    url = template.format(pw=PASSWORD)
    shown: list[str] = []
    for build in (persisters.from_url, lambda u: Singleton("reliability-bad-url", u, lock_expire_seconds=30)):
        try:
            made = build(url)
        except Exception as error:
            shown.append(_error_text(error))
            continue
        store = made if isinstance(made, persisters.Persister) else made.persister
        shown += [repr(made), str(made), repr(store), public_view(store)]
        job = made if isinstance(made, Singleton) else Singleton("reliability-bad-url", store, lock_expire_seconds=30)
        try:
            if job.lock():
                job.release()
        except Exception as error:
            shown.append(_error_text(error))
        finally:
            store.close()
    shown.append(caplog.text)
    shown += [record.getMessage() for record in caplog.records]
    text = "\n".join(shown)
    assert PASSWORD not in text and "Pa55" not in text


def test_url_attributes_hide_the_password(networked_kind: str, tmp_path: Any) -> None:
    """The public ``url`` (and every other public attribute) of a persister built from a URL with a password."""
    url = with_password(store_url_for(networked_kind, tmp_path))
    for store in (persisters.from_url(url), persisters.from_url(url)):
        try:
            shown = "\n".join([public_view(store), repr(store), str(store)])
        finally:
            store.close()
        assert PASSWORD not in shown and "Pa55" not in shown


def test_owner_token_never_in_messages_or_logs(kind: str, url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Lock, conflict, renew, release, force-release and loss: no event payload, error or DEBUG log line has the token."""
    caplog.set_level(logging.DEBUG)
    store = persisters.from_url(url)
    name = f"reliability-token-log-{uuid.uuid4().hex[:8]}"
    holder = Singleton(name, store, lock_expire_seconds=30)
    rival = Singleton(name, persisters.from_url(url), lock_expire_seconds=30)
    payloads: list[str] = []
    for job in (holder, rival):
        for event in ("locking", "locked", "conflict", "expired", "releasing", "released", "error", "renewed", "lost"):
            job.on(event, lambda payload: payloads.append(f"{payload!s} {payload!r}"))
    tokens = []
    try:
        assert holder.lock()
        tokens.append(holder.record.owner_token)
        assert not rival.lock()
        assert holder.renew()
        assert holder.release()
        assert holder.lock()
        tokens.append(holder.record.owner_token)
        removed = persisters.from_url(url).force_release(name)
        assert removed is not None
        assert holder.renew() is False and holder.lost
        try:
            holder.ensure_held()
        except Exception as error:
            payloads.append(_error_text(error))
    finally:
        holder.release()
        store.close()
    # pymongo's command monitor (logger pymongo.command, DEBUG) prints every document it sends, as a
    # database's own query log would; it is the driver's switch, not a message of ours.
    ours = [record for record in caplog.records if not record.name.startswith("pymongo")]
    shown = "\n".join([*payloads, *(logging.Formatter().format(record) for record in ours)])
    for token in tokens:
        assert token not in shown
