"""TLS for the MySQL/MariaDB persister: the URL's ``ssl*`` options, one ``ssl.SSLContext`` for both drivers.

The option names are PyMySQL's own connect arguments (``ssl_ca``, ``ssl_cert``,
``ssl_key``, ``ssl_verify_cert``, ``ssl_verify_identity``), which SQLAlchemy's
``mysql+pymysql://`` URLs also take, plus ``ssl`` to ask for TLS with the
defaults. The policy is decided here once and handed to PyMySQL and to aiomysql
as the same kind of ``SSLContext``, so the sync and async faces cannot differ:

* TLS is required once any of them is set: no fall back to a plain connection.
* The server's certificate and its host name are checked by default (against
  ``ssl_ca``, else the system's CAs). PyMySQL's own defaults do not check the
  certificate when only ``ssl_ca`` is given; this persister does.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

__all__ = ["TLS_OPTIONS", "Tls", "flag", "tls_connection_class"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
#: MySQL's client error for "SSL connection error" (CR_SSL_CONNECTION_ERROR), which PyMySQL raises too.
SSL_CONNECTION_ERROR = 2026


def flag(value: object, what: str) -> bool | None:
    """A yes/no option from a keyword (bool) or the URL (text); None when not given."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError(f"{what} must be true or false, not {value!r}")
    raise TypeError(f"{what} must be a bool, not {type(value).__name__}")


def _path(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a file path, not {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what} must name a file, not {value!r}")
    return path


@dataclass(frozen=True)
class Tls:
    """What the URL asked for; ``required`` when TLS must be used, ``refused`` when ``ssl=false``."""

    enabled: bool | None = None  # the ``ssl`` option
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify_cert: bool | None = None
    verify_identity: bool | None = None

    @classmethod
    def of(cls, ssl: object = None, ssl_ca: object = None, ssl_cert: object = None, ssl_key: object = None,
           ssl_verify_cert: object = None, ssl_verify_identity: object = None) -> Tls:
        """Checked settings: contradictions are refused here, before any connection."""
        settings = cls(flag(ssl, "ssl"), _path(ssl_ca, "ssl_ca"), _path(ssl_cert, "ssl_cert"),
                       _path(ssl_key, "ssl_key"), flag(ssl_verify_cert, "ssl_verify_cert"),
                       flag(ssl_verify_identity, "ssl_verify_identity"))  # fmt: skip
        named = [name for name, value in (("ssl_ca", settings.ca), ("ssl_cert", settings.cert),
                                          ("ssl_key", settings.key), ("ssl_verify_cert", settings.verify_cert),
                                          ("ssl_verify_identity", settings.verify_identity)) if value is not None]  # fmt: skip
        if settings.enabled is False and named:
            raise ValueError(f"ssl=false contradicts {', '.join(named)}: drop one")
        if settings.key is not None and settings.cert is None:
            raise ValueError("ssl_key needs ssl_cert (the client certificate it belongs to)")
        if settings.verify_identity and settings.verify_cert is False:
            raise ValueError("ssl_verify_identity=true needs the certificate checked: drop ssl_verify_cert=false")
        return settings

    @property
    def required(self) -> bool:
        return bool(self.enabled) or any(value is not None for value in
                                     (self.ca, self.cert, self.key, self.verify_cert, self.verify_identity))  # fmt: skip

    @property
    def refused(self) -> bool:
        return self.enabled is False

    def context(self) -> ssl.SSLContext | None:
        """The context both drivers use, or None without TLS; unreadable files raise ValueError now."""
        if not self.required:
            return None
        verify_cert = self.verify_cert is not False
        try:
            context = ssl.create_default_context(cafile=self.ca)
            if self.cert is not None:
                context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as error:
            which = "ssl_ca" if self.ca is not None and not _readable(self.ca) else "ssl_cert/ssl_key"
            raise ValueError(f"{which}: the TLS files cannot be used: {error}") from error
        # MySQL 8 makes its own CA at first start, without the extensions Python 3.13's strict
        # check wants; the chain and the host name are still checked.
        context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
        context.check_hostname = verify_cert and self.verify_identity is not False
        context.verify_mode = ssl.CERT_REQUIRED if verify_cert else ssl.CERT_NONE
        return context

    def describe(self) -> str:
        """For messages: what is checked (paths only, never a key's content)."""
        if not self.required:
            return "TLS off" if self.refused else "TLS as the driver chooses"
        checks = "certificate not checked" if self.verify_cert is False else (
            "certificate checked, host name not" if self.verify_identity is False else "certificate and host name checked")
        return f"TLS required, {checks}"


def _readable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.R_OK)


#: The URL and keyword options this module reads, with their checks.
TLS_OPTIONS = ("ssl", "ssl_ca", "ssl_cert", "ssl_key", "ssl_verify_cert", "ssl_verify_identity")

_classes: dict[int, Any] = {}


def tls_connection_class(aiomysql: Any, errors: Any, client_ssl: int) -> Any:
    """aiomysql's connection, refusing a server that does not offer TLS before it authenticates.

    aiomysql given an ``ssl`` context still goes on in plain text when the server
    does not offer TLS, and a server (or a man in the middle) may then ask for the
    password in clear; PyMySQL refuses that case itself.
    """
    found = _classes.get(id(aiomysql))
    if found is None:

        class TlsRequired(aiomysql.Connection):  # type: ignore[misc]
            async def _request_authentication(self) -> None:
                if not self.server_capabilities & client_ssl:
                    raise errors.OperationalError(SSL_CONNECTION_ERROR,
                                                  "TLS is required (ssl) but the server does not offer it")
                await super()._request_authentication()

        found = _classes[id(aiomysql)] = TlsRequired
    return found
