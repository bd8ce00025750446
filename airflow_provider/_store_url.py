"""The store URL of an Airflow connection written as its URI, with no Airflow import.

``store_url_from_uri(uri)`` reads the fields from the URI Airflow writes for a
connection (``Connection.get_uri()``, an ``AIRFLOW_CONN_`` variable) exactly as
Airflow's ``Connection.from_uri`` does, then maps them as the hook's ``store_url``
does. A URI holds every field of a connection, so the ``singleton`` command takes
``--url singletonredis://...`` where Airflow is not installed.

The mapping lives here, with no Airflow import, and the hook
(``airflow_provider.hooks.singleton``) uses it for a ``Connection`` object, so the
command line and the provider always read a connection the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

if TYPE_CHECKING:
    from airflow.sdk import Connection

__all__ = ["ConnectionFields", "connection_from_uri", "store_url", "store_url_from_uri"]

#: Connection type -> the store it points at (None: the connection carries a whole URL).
_STORE_OF_CONN_TYPE: dict[str, str | None] = {
    "singleton": None,
    "singletonredis": "redis",
    "singleton_redis": "redis",  # the earlier name, still read
    "redis": "redis",
    "singletonmongodb": "mongodb",
    "singleton_mongodb": "mongodb",
    "mongo": "mongodb",
    "mongodb": "mongodb",
    "singletonpostgres": "postgresql",
    "singleton_postgres": "postgresql",
    "postgres": "postgresql",
    "postgresql": "postgresql",
    "mysql": "mysql",  # Airflow's own MySQL connection (apache-airflow-providers-mysql)
    "singletonsqlite": "sqlite",
    "singleton_sqlite": "sqlite",
    "sqlite": "sqlite",
}
#: Extras of the standard (foreign) connection types that mean the same to our stores.
_FOREIGN_OPTIONS = {
    "redis": frozenset(),
    "mongodb": frozenset({"authSource", "authMechanism", "replicaSet", "tls", "directConnection", "tlsCAFile"}),
    "postgresql": frozenset({"sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name"}),
    "sqlite": frozenset(),
    "mysql": frozenset({"connect_timeout"}),
}
#: Extras our own form fields use; everything else on our types is passed on as a URL option.
_FORM_EXTRAS = frozenset({"url", "ssl", "srv", "options", "path", "db"})
#: The key under which Airflow's URI carries extras that are not flat strings, as JSON.
_EXTRA_KEY = "__extra__"


@dataclass(frozen=True)
class ConnectionFields:
    """The fields of an Airflow connection, read from its URI without Airflow (the password is in clear)."""

    conn_id: str | None
    conn_type: str | None
    host: str | None = None
    schema: str | None = None
    login: str | None = None
    password: str | None = None
    port: int | None = None
    extra: str | None = None

    @property
    def extra_dejson(self) -> dict[str, Any]:
        """The extras as a dict; ``{}`` for extras that are not JSON, as Airflow reads them."""
        try:
            found = json.loads(self.extra) if self.extra else {}
        except json.JSONDecodeError:
            return {}
        return found if isinstance(found, dict) else {}

    def __repr__(self) -> str:
        return f"ConnectionFields(conn_id={self.conn_id!r}, conn_type={self.conn_type!r}, host={self.host!r})"


def connection_from_uri(uri: str, conn_id: str | None = None) -> ConnectionFields:
    """The connection Airflow reads from ``uri`` (Airflow 3's ``Connection.from_uri``, step by step).

    Errors never quote the URI: it holds the password.
    """
    if uri.count("://") > 2:
        raise ValueError("an Airflow connection URI has at most two '://' (type://protocol://host)")
    host_with_protocol = uri.count("://") == 2
    try:
        conn_type = urlsplit(uri).scheme
        rest = uri.replace(f"{conn_type}://", "" if host_with_protocol else "//")
        if host_with_protocol:
            before = rest.split("://", 1)[0]
            if "@" in before or ":" in before:
                raise ValueError("an Airflow connection URI's host protocol must come before the user and password")
        parts = urlsplit(rest)
        port = parts.port
    except ValueError as error:  # urlsplit's messages quote no more than a port or a bracket
        raise ValueError(f"malformed Airflow connection URI: {error}") from None
    host = _hostname(parts.hostname, parts.netloc)
    if host and host_with_protocol:
        host = f"{parts.scheme}://{host}"
    extra = None
    if parts.query:
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        extra = query[_EXTRA_KEY] if _EXTRA_KEY in query else json.dumps(query)
    return ConnectionFields(
        conn_id=conn_id,
        conn_type="postgres" if conn_type == "postgresql" else conn_type.replace("-", "_"),
        host=host,
        schema=unquote(parts.path[1:]) if parts.path[1:] else parts.path[1:],
        login=unquote(parts.username) if parts.username else parts.username,
        password=unquote(parts.password) if parts.password else parts.password,
        port=port,
        extra=extra,
    )


def _hostname(hostname: str | None, netloc: str) -> str:
    """The host as Airflow reads it: a quoted path (a SQLite file) keeps its case."""
    host = unquote(hostname or "")
    if "/" in host:
        host = netloc.rsplit("@", 1)[-1].split(":", 1)[0]
        host = unquote(host)
    return host


def store_url_from_uri(uri: str) -> str:
    """The store URL of the Airflow connection written as ``uri`` (``singletonredis://:pw@host:6379/0``)."""
    return store_url(connection_from_uri(uri), label="this Airflow connection URI")


#: What ``store_url`` reads of a connection: Airflow's own ``Connection``, or ``ConnectionFields`` without Airflow.
_Connection: TypeAlias = "ConnectionFields | Connection"


def _truthy(value: object) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


def _userinfo(conn: _Connection) -> str:
    if not conn.login and not conn.password:
        return ""
    user = quote(conn.login or "", safe="")
    return f"{user}:{quote(conn.password, safe='')}@" if conn.password else f"{user}@"


def _hostport(conn: _Connection, default_host: str) -> str:
    host = conn.host or default_host
    if conn.port and ":" not in host and "," not in host:
        return f"{host}:{conn.port}"
    return host


#: Airflow's MySQL connection keeps TLS as the driver's ``ssl`` dict; the MySQL store reads URL options.
_MYSQL_SSL_KEYS = {"ca": "ssl_ca", "cert": "ssl_cert", "key": "ssl_key"}


def _mysql_tls(ssl: object) -> dict[str, object]:
    """The MySQL store's TLS options for the ``ssl`` extra of Airflow's own MySQL connection."""
    if isinstance(ssl, str) and ssl.strip().startswith("{"):
        try:
            ssl = json.loads(ssl)
        except ValueError:
            raise ValueError("the connection's ssl extra is not valid JSON") from None
    if isinstance(ssl, dict):
        options: dict[str, object] = {"ssl": True}
        options.update({ours: ssl[theirs] for theirs, ours in _MYSQL_SSL_KEYS.items() if ssl.get(theirs)})
        if "check_hostname" in ssl:
            options["ssl_verify_identity"] = _truthy(ssl["check_hostname"])
        return options
    return {"ssl": True} if ssl not in (None, "", False) and _truthy(ssl) else {}


def _query(conn: _Connection, store: str, own_type: bool) -> str:
    extra = conn.extra_dejson
    if own_type:
        pairs = {k: v for k, v in extra.items() if k not in _FORM_EXTRAS and v not in (None, "")}
    else:
        pairs = {k: v for k, v in extra.items() if k in _FOREIGN_OPTIONS[store] and v not in (None, "")}
    if store == "mysql" and not own_type:
        pairs.update(_mysql_tls(extra.get("ssl")))
    pairs = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in pairs.items()}
    parts = [urlencode(pairs)] if pairs else []
    if own_type and extra.get("options"):
        parts.append(str(extra["options"]).lstrip("?&"))
    return "?" + "&".join(parts) if parts else ""


def store_url(conn: _Connection, label: str | None = None) -> str:
    """The lock-store URL a connection describes (it may hold a password: redact before showing).

    :param label: how errors name the connection (default: ``connection '<conn_id>'``).
    """
    label = label or f"connection {conn.conn_id!r}"
    conn_type = (conn.conn_type or "").replace("-", "_").lower()
    extra = conn.extra_dejson
    if conn_type == "singleton" and conn.password and "://" in conn.password:
        return str(conn.password)
    if extra.get("url"):
        return str(extra["url"])
    if conn_type not in _STORE_OF_CONN_TYPE:
        known = ", ".join(sorted(_STORE_OF_CONN_TYPE))
        raise ValueError(f"{label} has type {conn.conn_type!r}; a lock store needs one of: {known}")
    store = _STORE_OF_CONN_TYPE[conn_type]
    own_type = conn_type.startswith("singleton")
    if store is None:
        if conn.host and "://" in conn.host:
            return conn.host
        raise ValueError(f"{label} of type 'singleton' needs its Store URL, e.g. redis://:password@host:6379/0")
    if store == "sqlite":
        path = conn.host or extra.get("path") or conn.schema
        if not path:
            raise ValueError(f"{label} needs the SQLite database file, an absolute path")
        return f"sqlite:///{path}"
    query = _query(conn, store, own_type)
    if store == "redis":
        scheme = "rediss" if _truthy(extra.get("ssl")) else "redis"
        db = conn.schema or extra.get("db") or ""
        return f"{scheme}://{_userinfo(conn)}{_hostport(conn, '127.0.0.1')}/{db}{query}"
    if store == "mongodb":
        if _truthy(extra.get("srv")):
            return f"mongodb+srv://{_userinfo(conn)}{conn.host or ''}/{conn.schema or ''}{query}"
        return f"mongodb://{_userinfo(conn)}{_hostport(conn, '127.0.0.1')}/{conn.schema or ''}{query}"
    if store == "mysql":
        return f"mysql://{_userinfo(conn)}{_hostport(conn, '127.0.0.1')}/{conn.schema or ''}{query}"
    return f"postgresql://{_userinfo(conn)}{_hostport(conn, '127.0.0.1')}/{conn.schema or ''}{query}"
