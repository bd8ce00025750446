"""Stores named by something other than a store URL: an orchestrator's connection or block, or its URI.

The core knows no orchestrator; integrations plug in through two entry-point groups:

``singleton_integrations.stores``
    name: a source kind (``airflow-conn``, ``prefect-block``, which the ``singleton``
    command offers as ``--airflow-conn ID`` and ``--prefect-block NAME``); value: a
    callable ``resolve(name)`` that looks the named thing up where its orchestrator
    keeps it and returns the store URL, or a ``StoreLocation``. An entry point that
    needs an extra says so (``"pkg.module:resolve [airflow]"``), so that a missing
    orchestrator reads ``pip install 'dist[airflow]'``.

``singleton_integrations.store_urls``
    name: a URL scheme that is not a store's (``singletonredis``: an Airflow
    connection written as its URI); value: a callable ``translate(url)`` returning
    the store URL it stands for, without the orchestrator, or raising ``ValueError``.

Resolvers raise the errors below, never with a password in their message:

    SingletonError
    └── StoreSourceError         the named connection or block cannot give a store
        ├── SourceNotFound       (also LookupError) nothing by that name
        └── SourceUnavailable    its orchestrator cannot be asked (down, misconfigured)
            └── SourceNotInstalled   ... because it is not installed here
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import SingletonError
from ._urls import redact_url, scheme_of
from .persisters import _BUILTIN_SCHEMES

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = [
    "ENTRY_POINT_GROUP",
    "URL_ENTRY_POINT_GROUP",
    "SourceNotFound",
    "SourceNotInstalled",
    "SourceUnavailable",
    "StoreLocation",
    "StoreSourceError",
    "kinds",
    "resolve",
    "store_url",
]

ENTRY_POINT_GROUP = "singleton_integrations.stores"
URL_ENTRY_POINT_GROUP = "singleton_integrations.store_urls"


@dataclass(frozen=True)
class StoreLocation:
    """Where a source's locks live: its store URL (which may hold a password) and how it names locks.

    ``name_prefix`` is prepended to every lock name, as the source's own users name
    them (a Prefect block's ``name_prefix``); ``description`` names the source in
    messages (``"Airflow connection 'locks'"``).
    """

    url: str
    name_prefix: str = ""
    description: str = ""

    def __repr__(self) -> str:  # the URL may hold a password
        return (f"StoreLocation(url={redact_url(self.url)!r}, name_prefix={self.name_prefix!r}, "
                f"description={self.description!r})")


class StoreSourceError(SingletonError):
    """The source ``kind`` has no usable store under ``name``; ``reason`` says why, without a password."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        self.kind, self.name, self.reason = kind, name, reason
        super().__init__(f"{kind} {name!r}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.kind, self.name, self.reason))


class SourceNotFound(StoreSourceError, LookupError):
    """Nothing by that name: no such connection, no such block."""


class SourceUnavailable(StoreSourceError):
    """The orchestrator that keeps the source cannot be asked: not reachable, misconfigured, not installed."""


class SourceNotInstalled(SourceUnavailable):
    """The orchestrator is not installed here; ``install`` is the command that adds it, when known."""

    def __init__(self, kind: str, name: str, detail: str, extra: str = "", install: str = "") -> None:
        self.detail, self.extra, self.install = detail, extra, install
        needs = f"needs the {extra!r} extra: {install}" if install else "cannot be used here"
        super().__init__(kind, name, f"{needs} ({detail})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.kind, self.name, self.detail, self.extra, self.install))


def kinds() -> list[str]:
    """The source kinds installed here, sorted."""
    return sorted({point.name for point in _entry_points(ENTRY_POINT_GROUP)})


def resolve(kind: str, name: str) -> StoreLocation:
    """Where the source ``kind`` keeps ``name``'s store: ``resolve("airflow-conn", "locks")``.

    Raises a ``StoreSourceError``; the returned URL is not checked beyond its
    scheme (``persisters.from_url`` does that) and may hold a password.
    """
    point = _entry_point(ENTRY_POINT_GROUP, kind)
    if point is None:
        known = ", ".join(kinds()) or "none"
        raise SourceUnavailable(kind, name, f"no resolver is installed for {kind!r} (installed: {known})")
    try:
        found = point.load()(name)
    except ImportError as error:  # the orchestrator, imported by the resolver's module or on its first call
        extra = ",".join(point.extras)
        install = f"pip install '{point.dist.name}[{extra}]'" if extra and point.dist is not None else ""
        raise SourceNotInstalled(kind, name, str(error), extra, install) from None
    location = StoreLocation(found, description=f"{kind} {name!r}") if isinstance(found, str) else found
    if not isinstance(location, StoreLocation):
        raise TypeError(f"the {kind!r} resolver returned {type(found).__name__}, not a URL or StoreLocation")
    try:
        scheme_of(location.url)
    except (TypeError, ValueError) as error:
        raise StoreSourceError(kind, name, f"its store URL is not usable: {error}") from None
    return location


def store_url(url: str) -> str:
    """``url``, or the store URL it stands for when its scheme is registered in ``store_urls``.

    ``store_url("singletonredis://:pw@host:6379/0")`` is ``"redis://:pw@host:6379/0"``
    where the Airflow provider is installed (Airflow itself need not be).
    Raises ``ValueError`` (without the password) when the translation fails.
    """
    scheme = scheme_of(url)
    if scheme in _BUILTIN_SCHEMES:  # a store's own URL: no entry-point scan (20 ms where Airflow is installed)
        return url
    point = _entry_point(URL_ENTRY_POINT_GROUP, scheme)
    if point is None:
        return url
    translate: Callable[[str], str] = point.load()
    return translate(url)


def _entry_points(group: str) -> list[EntryPoint]:
    # Imported here: reading the installed packages' metadata costs tens of ms, which a
    # store's own URL never needs.
    from importlib.metadata import entry_points

    return list(entry_points(group=group))


def _entry_point(group: str, name: str) -> EntryPoint | None:
    wanted = name.lower()
    return next((point for point in _entry_points(group) if point.name.lower() == wanted), None)

