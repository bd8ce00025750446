"""URL helpers shared by persisters and integrations: parsing and password redaction."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url", "scheme_of"]

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@]*):(?P<password>[^@/]*)@")
_SECRET_PARAMS = re.compile(r"(?i)([?&](?:password|pass|pwd|secret|token|tlsCertificateKeyFilePassword|sslpassword)=)[^&#]*")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for messages, logs and reprs."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(url))
    return _SECRET_PARAMS.sub(r"\1***", text)


def scheme_of(url: str) -> str:
    """The lower-cased scheme, or a ValueError that does not echo a password."""
    if not isinstance(url, str):
        raise TypeError(f"a store URL must be a str, not {type(url).__name__}")
    if not url.strip():
        raise ValueError("a store URL must not be empty")
    if any(ord(c) < 32 for c in url):
        raise ValueError("a store URL must not contain control characters")
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as error:
        raise ValueError(f"malformed store URL {redact_url(url)!r}: {error}") from None
    if not scheme or "://" not in url:
        raise ValueError(f"a store URL needs a scheme such as redis:// or sqlite:///, got {redact_url(url)!r}")
    return scheme


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))
