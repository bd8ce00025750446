"""No password in any text: redaction of every URL and DSN shape, property-tested."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from singleton_integrations import persisters
from singleton_integrations._urls import redact_url, scheme_of, scrub, secrets_of

# What a user may paste unencoded into a URL's userinfo: anything but whitespace.
URL_PASSWORD = st.text(string.ascii_letters + string.digits + string.punctuation, min_size=3, max_size=24)
# A query value ends at '&' or '#', so those are percent-encoded there.
QUERY_VALUE = st.text(string.ascii_letters + string.digits + "-._~%!$'()*+,;=:@/?", min_size=3, max_size=24)
# An unquoted libpq value ends at whitespace; a quoted one may hold anything, escaped.
DSN_BARE = st.text(string.ascii_letters + string.digits + "-._~%!$()*+,;:@/?&#[]{}", min_size=3, max_size=24)
DSN_QUOTED = st.text(string.ascii_letters + string.digits + string.punctuation + " ", min_size=3, max_size=24)
USER = st.text(string.ascii_letters + string.digits + "-._", max_size=10)
HOST = st.sampled_from(["127.0.0.1", "db.example.com", "[::1]", "h-1"])
SCHEME = st.sampled_from(["redis", "rediss", "postgresql", "mongodb", "mongodb+srv", "redis+sentinel", "bogus"])


def _leaks(secret: str, skeleton: str, text: str) -> bool:
    """True when ``secret`` is in ``text`` other than where the URL's non-secret parts (or the mask) hold it."""
    return secret in text and secret not in skeleton + " ***"


@given(scheme=SCHEME, slashes=st.sampled_from(["//", "/", ""]), user=USER, password=URL_PASSWORD, host=HOST,
       tail=st.sampled_from(["", ":6379/0", "/db?sslmode=require", "/?replicaSet=rs0"]))
@example(scheme="redis", slashes="/", user="user", password="PW-one-slash", host="host", tail="")
@example(scheme="redis", slashes="//", user="", password="p@ss/w?rd#1", host="h", tail="/0")
def test_userinfo_password_is_masked_in_every_scheme_shape(scheme: str, slashes: str, user: str, password: str,
                                                           host: str, tail: str) -> None:
    url = f"{scheme}:{slashes}{user}:{password}@{host}{tail}"
    skeleton = f"{scheme}:{slashes}{user}:@{host}{tail}"
    assume(password not in skeleton)
    for text in (url, f"cannot connect to {url}: Connection refused", f"bad URL {url!r}", f"({url})"):
        redacted = redact_url(text)
        assert not _leaks(password, skeleton, redacted), redacted
        assert host in redacted, "the host stays: it is what the reader needs"
    assert any(password in secret for secret in secrets_of(url)), "scrub() can find it bare"


@given(user=USER, password=URL_PASSWORD, host=HOST)
def test_no_scheme_userinfo_is_masked(user: str, password: str, host: str) -> None:
    url = f"{user}:{password}@{host}:5432/db"
    skeleton = f"{user}:@{host}:5432/db"
    assume(password not in skeleton)
    assume(not password.startswith("//"))  # ``u://PW@host`` is a URL whose user is PW, by the RFC's reading
    for text in (url, f"needs a scheme, got {url!r}"):
        assert not _leaks(password, skeleton, redact_url(text))


@given(password=URL_PASSWORD, hosts=st.lists(st.sampled_from(["h1:26379", "h2:26380", "10.0.0.3:1"]), min_size=2,
                                             max_size=3))
@example(password="red", hosts=["h1:26379", "h1:26379"])
def test_multi_host_urls_are_masked(password: str, hosts: list[str]) -> None:
    url = f"redis+sentinel://:{password}@{','.join(hosts)}/mymaster"
    skeleton = f"redis+sentinel://:@{','.join(hosts)}/mymaster"  # not replace(): "red" is also in "redis"
    assume(password not in skeleton)
    redacted = redact_url(url)
    assert not _leaks(password, skeleton, redacted) and ",".join(hosts) in redacted


@given(key=st.sampled_from(["password", "PASSWORD", "tlsCertificateKeyFilePassword", "sslpassword", "secret",
                            "sentinel_password", "pwd", "api_key", "owner_token"]),
       value=QUERY_VALUE, first=st.booleans())
def test_query_secrets_are_masked(key: str, value: str, first: bool) -> None:
    query = f"{key}={value}&w=1" if first else f"w=1&{key}={value}"
    url = f"mongodb://127.0.0.1:27017/db?{query}"
    skeleton = url.replace(f"{key}={value}", f"{key}=")  # only the value: it may also spell a key or "mongodb"
    assume(value not in skeleton)
    redacted = redact_url(url)
    assert not _leaks(value, skeleton, redacted) and "w=1" in redacted
    assert value in secrets_of(url)


@given(password=DSN_BARE, spaces=st.sampled_from(["", " "]), order=st.booleans())
@example(password="nam", spaces="", order=False)
def test_libpq_dsn_bare_password_is_masked(password: str, spaces: str, order: bool) -> None:
    setting = f"password{spaces}={spaces}{password}"
    dsn = f"{setting} host=127.0.0.1 dbname=test" if order else f"host=127.0.0.1 dbname=test {setting}"
    skeleton = dsn.replace(setting, setting[: -len(password)])  # only the value goes: "nam" is also in "dbname"
    assume(password not in skeleton)
    for text in (dsn, f"connection to {dsn!r} failed"):
        redacted = redact_url(text)
        assert not _leaks(password, skeleton, redacted), redacted
        assert "host=127.0.0.1" in redacted


@given(password=DSN_QUOTED)
def test_libpq_dsn_quoted_password_is_masked(password: str) -> None:
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    dsn = f"host=127.0.0.1 password={quoted} dbname=test"
    skeleton = "host=127.0.0.1 password= dbname=test"
    assume(password not in skeleton)
    redacted = redact_url(dsn)
    assert not _leaks(password, skeleton, redacted) and "dbname=test" in redacted, redacted
    assert password in secrets_of(dsn)


@given(password=URL_PASSWORD)
def test_scrub_removes_a_known_password_even_bare(password: str) -> None:
    url = f"redis://app:{password}@127.0.0.1:6379/0"
    assume(password not in "redis://app:@127.0.0.1:6379/0 WRONGPASS invalid for user app: ***")
    echoed = f"WRONGPASS invalid password {password} for user app: {url}"
    assert password not in scrub(echoed, url)


@settings(max_examples=200)
@given(text=st.text(max_size=60))
def test_redaction_never_fails_and_is_idempotent(text: str) -> None:
    once = redact_url(text)
    assert redact_url(once) == once


def test_public_fields_stay_readable() -> None:
    line = "ran at 2026-12-01T00:00:05+00:00 on web-1 pid 42 (command=export), fencing token 17"
    assert redact_url(line) == line
    assert redact_url("LockRecord(name='x', fencing_token=17)") == "LockRecord(name='x', fencing_token=17)"
    assert redact_url("owner_token='0123abcd'") == "owner_token=***"
    assert redact_url("postgresql://app@127.0.0.1/db") == "postgresql://app@127.0.0.1/db"


@pytest.mark.parametrize("url", ["user:S3cr3t-pw@127.0.0.1:5432/db", "redis:/user:S3cr3t-pw@host",
                                 "host=127.0.0.1 password=S3cr3t-pw dbname=test",
                                 "host=h password='S3cr3t-pw x' dbname=d", "nosuch://u:S3cr3t-pw@h/x",
                                 "http://[::1:S3cr3t-pw@h/"])
def test_url_errors_never_echo_the_password(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        scheme = scheme_of(url)
        persisters.from_url(url)
        raise AssertionError(f"{scheme}: accepted")
    assert "S3cr3t-pw" not in str(raised.value)


@settings(max_examples=300)
@given(password=URL_PASSWORD.filter(lambda p: not p.startswith("//")),
       shape=st.sampled_from(["user:{pw}@127.0.0.1:5432/db", "nosuch://u:{pw}@h/x", "redis:/u:{pw}@h",
                              "host=127.0.0.1 password={pw} dbname=test", "sqlite://u:{pw}@host/x.db",
                              "http://[::1:{pw}@h/", "memory:u:{pw}@h"]))
def test_store_url_errors_never_echo_a_password(password: str, shape: str) -> None:
    def error_for(url: str) -> str:
        try:
            persisters.from_url(url)
        except (ValueError, TypeError) as error:
            return str(error)
        return ""

    url = shape.format(pw=password)
    reference = error_for(shape.format(pw="QQQQ"))  # the same message about a harmless password
    assume(password not in reference + " ***")
    assert password not in error_for(url)


@pytest.mark.parametrize("url", ["host=127.0.0.1 password=S3cr3t-pw dbname=test", "user:S3cr3t-pw@127.0.0.1/db",
                                 "redis:/user:S3cr3t-pw@127.0.0.1"])
def test_singleton_refuses_a_bad_url_without_the_password(url: str) -> None:
    from singleton_integrations import Singleton

    with pytest.raises(ValueError) as raised:
        Singleton("job", url)
    assert "S3cr3t-pw" not in str(raised.value) and "S3cr3t-pw" not in repr(raised.value)
