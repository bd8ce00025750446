"""URL helpers shared by persisters and integrations: the scheme, and secrets kept out of every text.

``redact_url`` works on a URL, a DSN or any message that may quote one, in every
shape seen in the wild: ``scheme://user:PW@host``, ``scheme:/user:PW@host`` (one
slash), ``user:PW@host`` (no scheme), multi-host URLs
(``redis+sentinel://:PW@h1:1,h2:2/svc``), secret query options
(``?password=PW``), libpq ``key=value`` DSNs (``password=PW``,
``password='a b\\'c'``) and JSON (``"password": "PW"``). Where the URL is known,
``scrub(text, url)`` also replaces that URL's own secrets wherever a driver
echoed them bare, percent-decoded or not.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["redact_url", "scheme_of", "scrub", "secrets_of", "without_password"]

MASK = "***"

# Keys whose values are secrets, in query strings, libpq DSNs and JSON. ``fencing_token``
# is public (it is printed on purpose); an ``owner_token`` is a capability and is hidden.
_SECRET_KEY = r"[A-Za-z0-9_.-]*?(?:password|passwd|passphrase|secret|api_?key|token)|pass|pwd"
_PUBLIC_KEYS = frozenset({"fencing_token", "fencing-token"})
# libpq ``key=value`` (a value ends at whitespace unless quoted) and query options (a value ends at & or #).
_KV = re.compile(
    rf"""(?ix)(?<![A-Za-z0-9_.?&;-])(?P<key>{_SECRET_KEY})(?P<eq>\s*=\s*)
    (?P<value>'(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|\S*?(?=[),;]*(?:\s|$)))"""
)
_QUERY = re.compile(rf"(?i)(?<=[?&;])(?P<key>{_SECRET_KEY})(?P<eq>=)(?P<value>[^&#\s]*)")
_JSON = re.compile(
    rf"""(?ix)(?P<key>(?P<q>["'])(?:{_SECRET_KEY})(?P=q)\s*:\s*)(?P<value>"(?:[^"\\]|\\.)*"?|'(?:[^'\\]|\\.)*'?)"""
)
_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*:)(?P<slashes>/*)")
_WRAP = "'\"()<>[]{},;`"
_TOKEN = re.compile(r"\S+")


def _key_value(match: re.Match[str]) -> str:
    if match["key"].lower() in _PUBLIC_KEYS:
        return match[0]
    return f"{match['key']}{match['eq']}{MASK}"


def _userinfo(token: str) -> str:
    """One whitespace-free token with any ``user:password@`` part's password masked."""
    at = token.rfind("@")  # the last '@': a password may hold an unencoded '@', '/', '?' or '#'
    if at < 0:
        return token
    head, host = token[:at], token[at:]
    scheme = _SCHEME.match(head)
    if scheme is not None and scheme["slashes"]:
        prefix, userinfo = head[: scheme.end()], head[scheme.end():]
    else:  # ``user:PW@host``, or ``redis:user:PW@host``: everything before the '@' is userinfo
        prefix, userinfo = "", head
    user, colon, _password = userinfo.partition(":")
    if not colon and prefix and len(scheme["slashes"]) != 2:  # type: ignore[index]
        # ``u:/PW@host`` reads as a one-slash URL with user PW: mask it as ``user:PW@host`` to be safe.
        prefix, (user, colon, _password) = "", head.partition(":")
    if not colon:
        return token  # a user name alone is no secret
    return f"{prefix}{user}:{MASK}{host}"


def _token(match: re.Match[str]) -> str:
    token = match[0]
    start, end = 0, len(token)
    while start < end and token[start] in _WRAP:
        start += 1
    while end > start and token[end - 1] in _WRAP:
        end -= 1
    return token[:start] + _userinfo(token[start:end]) + token[end:]


def redact_url(url: str) -> str:
    """``url`` (or any text quoting one) with every password and secret option replaced by ``***``."""
    text = str(url)
    text = _JSON.sub(lambda m: f"{m['key']}{m['q']}{MASK}{m['q']}", text)
    text = _QUERY.sub(_key_value, text)
    text = _KV.sub(_key_value, text)
    stripped = text.strip()
    scheme = _SCHEME.match(stripped)
    if scheme is not None and scheme["slashes"] and "@" in stripped:
        # The whole text is one URL: a password may even hold a space.
        return text[: len(text) - len(text.lstrip())] + _userinfo(stripped) + text[len(text.rstrip()):]
    return _TOKEN.sub(_token, text)


def secrets_of(url: str | None) -> set[str]:
    """The secrets in ``url`` as written and percent-decoded, to scrub them from texts that echo them bare."""
    if not url:
        return set()
    found: set[str] = set()
    text = str(url)
    at = text.rfind("@")
    if at >= 0:
        head = text[:at]
        scheme = _SCHEME.match(head)
        userinfo = head[scheme.end():] if scheme is not None and scheme["slashes"] else head
        password = userinfo.partition(":")[2]
        if password:
            found.add(password)
    for pattern in (_KV, _QUERY, _JSON):
        for match in pattern.finditer(text):
            if match["key"].lower() in _PUBLIC_KEYS:
                continue
            value = match["value"]
            found.add(value)
            if pattern is not _QUERY and value[:1] in "'\"":  # quoted: the secret is the unescaped inside
                inner = value[1:-1] if len(value) > 1 and value[-1] == value[0] else value[1:]
                found.add(re.sub(r"\\(.)", r"\1", inner))
    found |= {unquote(secret) for secret in found}
    return {secret for secret in found if secret}


def scrub(text: str, *urls: str | None) -> str:
    """``text`` redacted, and without any secret of ``urls`` even where it appears bare."""
    text = redact_url(text)
    for secret in sorted(set().union(*(secrets_of(url) for url in urls)), key=len, reverse=True):
        if len(secret) >= 3:  # a one- or two-character secret, bare, would mask half the message
            text = text.replace(secret, MASK)
    return text


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
        raise ValueError(f"malformed store URL {scrub(url, url)!r}: {scrub(str(error), url)}") from None
    if not scheme or "://" not in url:
        raise ValueError(f"a store URL needs a scheme such as redis:// or sqlite:///, got {scrub(url, url)!r}")
    return scheme


def without_password(url: str) -> str:
    """``url`` with its userinfo password dropped (not masked), for a client that takes it separately."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))
