"""The PostgreSQL persister's statements; ``_postgres_steps`` reads their answers, ``postgres`` sends them.

Behind a pooler each call is one message that starts with ``SET LOCAL
statement_timeout``: several statements in one simple-protocol message run as
one implicit transaction, so the timeout lives exactly as long as the call and
no session state is left behind for a pooler (PgBouncer) to hand to someone
else; nothing is prepared on the server, for the same reason. On a direct
connection the hot single statements (``PREPARED``) are sent as they are, to be
prepared there, under the connection's own ``statement_timeout``.

Row states (one row per name, kept after release so the fencing counter survives):

* held: ``owner_token`` set; live while ``expires_at`` is NULL (no expiry) or
  in the future. With a minimum hold, ``expires_at >= hold_until`` always, so a
  crashed holder frees the name at the later of its lease and its hold.
* released into its minimum hold: ``owner_token`` NULL, ``released_at`` set,
  ``expires_at = hold_until`` still in the future. Nobody may take it yet.
* free: ``owner_token`` NULL and no hold in the future; ``released_at`` says
  since when (what the retention sweep judges).

``waiters_until`` is a hint that some process LISTENs for this name: a release
sends a NOTIFY only then, because a committing NOTIFY serializes commits across
the whole cluster. A waiter's failed attempt refreshes it in the same
transaction that locked the row, so a release that commits afterwards sees it.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "ACQUIRE",
    "ACQUIRE_FREE",
    "CREATE_TABLE",
    "FORCE_RELEASE",
    "GET",
    "HINT",
    "INSPECT",
    "LIST",
    "MIGRATE",
    "NEW_COLUMNS",
    "PEEK",
    "PREPARED",
    "PURGE",
    "RELEASE",
    "RENEW",
    "message",
    "statements",
]

#: Columns this version added; tables created before it gain them once, on first use.
NEW_COLUMNS = ("hold_until", "released_at", "waiters_until")
#: How long a waiter's hint stays good, and when a failed attempt refreshes it.
HINT_SECONDS, HINT_REFRESH_SECONDS = 60, 30

# Each statement is a template: {table} is the quoted, possibly schema-qualified table.
CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    name text PRIMARY KEY,
    owner_token text,
    fencing_token bigint NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    metadata jsonb NOT NULL,
    hold_until timestamptz,
    released_at timestamptz,
    waiters_until timestamptz
)
"""
# Adding nullable columns without a default only touches the catalog. It still
# takes an ACCESS EXCLUSIVE lock, so it runs only when INSPECT found one missing.
MIGRATE = "ALTER TABLE {table} " + ", ".join(f"ADD COLUMN IF NOT EXISTS {column} timestamptz" for column in NEW_COLUMNS)
# Whether the table exists, how many of the new columns it lacks, and its canonical
# name (the NOTIFY channel is named from it, so 'public.t' and 't' agree).
INSPECT = """
SELECT n.nspname, c.relname,
       (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        AND a.attname = ANY(%(columns)s::text[]))::int
FROM (VALUES (1)) AS one LEFT JOIN pg_class c ON c.oid = to_regclass(%(table)s)
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
"""

_COLUMNS = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, released_at, hold_until"


def _held(row: str = "") -> str:
    return f"({row}owner_token IS NOT NULL AND ({row}expires_at IS NULL OR {row}expires_at > clock_timestamp()))"


def _live(row: str = "") -> str:
    """Held, or released but still inside its minimum hold: nobody else may take it."""
    return f"({_held(row)} OR ({row}owner_token IS NULL AND {row}hold_until > clock_timestamp()))"


# A new holder's lease: no expiry, or ttl from now but never ending before the hold.
# Both are computed from one reading of the clock (``clock.now``), so the lease's
# end is never a microsecond before the hold's.
_CLOCK = "(SELECT clock_timestamp() AS now) AS clock"
_EXPIRES = ("CASE WHEN %(ttl)s::float8 IS NULL THEN NULL ELSE clock.now + "
            "greatest(%(ttl)s::float8, coalesce(%(min_hold)s::float8, 0)) * interval '1 second' END")
_HOLD_UNTIL = "clock.now + %(min_hold)s::float8 * interval '1 second'"
_CLOCK_MS = "(extract(epoch FROM clock.now) * 1000)::bigint"

# The common case in one plain UPDATE: a name whose row is free (released before,
# hold over). Of racing callers the first to update the row wins; the others
# re-check the WHERE on the new, held version, update nothing and take ACQUIRE.
# Fencing tokens are max(previous + 1, the server's clock in ms): they rise even
# after the retention sweep deleted a row, since a new row starts at the clock.
ACQUIRE_FREE = f"""
UPDATE {{table}} SET owner_token = %(owner_token)s, fencing_token = greatest(fencing_token + 1, {_CLOCK_MS}),
    host = %(host)s, pid = %(pid)s::integer, created_at = clock.now, expires_at = {_EXPIRES},
    hold_until = {_HOLD_UNTIL}, released_at = NULL, metadata = %(metadata)s::jsonb
FROM {_CLOCK}
WHERE name = %(name)s AND owner_token IS NULL AND (hold_until IS NULL OR hold_until <= clock.now)
RETURNING fencing_token, created_at, expires_at, hold_until
"""
# One statement that takes a free or expired name, or reports the live holder.
# ``previous`` locks the current row version first (FOR UPDATE re-reads the newest
# committed version under READ COMMITTED), so the row the upsert judges is the
# row we report: the expired holder we replaced, or the live one that kept it.
# The ON CONFLICT ... WHERE is the atomic guard itself. A held row reports its
# lease's end; a row released into its minimum hold reports the hold's end.
ACQUIRE = f"""
WITH previous AS MATERIALIZED (
    SELECT {_COLUMNS}, {_live()} AS live FROM {{table}} WHERE name = %(name)s FOR UPDATE
), taken AS (
    INSERT INTO {{table}} AS held (name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata,
                                   hold_until, released_at)
    SELECT %(name)s, %(owner_token)s, {_CLOCK_MS}, %(host)s, %(pid)s::integer, clock.now, {_EXPIRES},
           %(metadata)s::jsonb, {_HOLD_UNTIL}, NULL
    FROM (VALUES (1)) AS one LEFT JOIN previous ON true CROSS JOIN {_CLOCK}
    ON CONFLICT (name) DO UPDATE SET
        owner_token = excluded.owner_token,
        fencing_token = greatest(held.fencing_token + 1, excluded.fencing_token),
        host = excluded.host, pid = excluded.pid, created_at = excluded.created_at,
        expires_at = excluded.expires_at, metadata = excluded.metadata,
        hold_until = excluded.hold_until, released_at = NULL
    WHERE NOT {_live("held.")}
    RETURNING fencing_token, created_at, expires_at, hold_until
)
SELECT taken.*, previous.*,
       extract(epoch FROM CASE WHEN previous.owner_token IS NULL THEN previous.hold_until
                               ELSE previous.expires_at END - clock_timestamp())::float8
FROM (VALUES (1)) AS one LEFT JOIN taken ON true LEFT JOIN previous ON true
"""
# A read without locks, after ACQUIRE_FREE found the name taken: the common answer to a
# waiter whose name is held. Row locks give a transaction an id, and its commit then
# waits for the WAL flush: with 16 waiters that was 15 flushes per hand-over, and the
# release queued behind them. ``hinted``: the waiters' hint is good for a while yet, so
# this read may answer a listening process too (else ACQUIRE runs, with HINT).
PEEK = f"""
SELECT {_COLUMNS}, {_live()} AS live,
       extract(epoch FROM CASE WHEN owner_token IS NULL THEN hold_until ELSE expires_at END - clock_timestamp())::float8,
       coalesce(waiters_until > clock_timestamp() + interval '{HINT_REFRESH_SECONDS} seconds', false)
FROM {{table}} WHERE name = %(name)s
"""
# Sent after a failed ACQUIRE by a process that listens for this name (see the module docstring).
HINT = f"""
UPDATE {{table}} SET waiters_until = clock_timestamp() + interval '{HINT_SECONDS} seconds'
WHERE name = %(name)s AND owner_token IS DISTINCT FROM %(owner_token)s
  AND (waiters_until IS NULL OR waiters_until < clock_timestamp() + interval '{HINT_REFRESH_SECONDS} seconds')
"""
# Frees the name if the token still owns it and says whether the lease was still
# live (a lock that expired untaken is cleared too, but the caller lost it).
# Before hold_until the row stays as the name's holder, marked released, and no
# NOTIFY goes out: the name is not free yet. RETURNING reads the newest row
# version, so a waiter's hint committed while we waited for the row is seen.
RELEASE = f"""
WITH old AS (
    SELECT name, {_held()} AS live, coalesce(hold_until > clock_timestamp(), false) AS holding FROM {{table}}
    WHERE name = %(name)s AND owner_token = %(owner_token)s FOR UPDATE
), released AS (
    UPDATE {{table}} AS freed SET owner_token = NULL, released_at = clock_timestamp(),
        expires_at = CASE WHEN old.holding THEN freed.hold_until END
    FROM old WHERE freed.name = old.name
    RETURNING old.live, old.holding, freed.name, coalesce(freed.waiters_until > clock_timestamp(), false) AS waited
)
SELECT live, holding, CASE WHEN waited AND NOT holding THEN (SELECT true FROM pg_notify(%(channel)s, name)) ELSE false END
FROM released
"""
RENEW = f"""
UPDATE {{table}} SET expires_at = CASE WHEN %(ttl)s::float8 IS NULL THEN NULL
    ELSE greatest(clock_timestamp() + %(ttl)s::float8 * interval '1 second', hold_until) END
WHERE name = %(name)s AND owner_token = %(owner_token)s AND {_held()}
RETURNING {_COLUMNS}
"""
GET = f"SELECT {_COLUMNS} FROM {{table}} WHERE name = %(name)s AND {_live()}"
# left() compares characters literally, so '%', '_' and '\\' in a prefix are plain text;
# COLLATE "C" sorts by code point, as Python sorts the other stores' names.
LIST = f"""
SELECT {_COLUMNS} FROM {{table}}
WHERE left(name, char_length(%(prefix)s)) = %(prefix)s AND {_live()}
ORDER BY name COLLATE "C"
"""
# Administrative: frees a held name, or ends a minimum hold early. The subquery locks
# and reads the row before the update, so RETURNING shows what was removed.
FORCE_RELEASE = f"""
UPDATE {{table}} AS freed SET owner_token = NULL, expires_at = NULL, hold_until = NULL, released_at = clock_timestamp()
FROM (SELECT {_COLUMNS} FROM {{table}} WHERE name = %(name)s AND {_live()} FOR UPDATE) AS holder
WHERE freed.name = holder.name
RETURNING {", ".join(f"holder.{column.strip()}" for column in _COLUMNS.split(","))}, pg_notify(%(channel)s, holder.name)
"""
# The retention sweep: at most ``limit`` rows of names free (or expired untaken) for
# longer than the retention period. Rows another transaction has locked are skipped,
# and the condition is checked again on the version being deleted. A free row
# written before this version has no released_at; its acquisition time stands in.
_IDLE = ("((owner_token IS NULL AND coalesce(greatest(released_at, hold_until), created_at) < {cutoff})"
         " OR (owner_token IS NOT NULL AND expires_at < {cutoff}))")
_CUTOFF = "clock_timestamp() - %(after)s::float8 * interval '1 second'"
PURGE = f"""
DELETE FROM {{table}} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {{table}} WHERE {_IDLE.format(cutoff=_CUTOFF)} LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)) AND {_IDLE.format(cutoff=_CUTOFF)}
"""


def message(statement_timeout_ms: int, *statements: str) -> str:
    """One simple-protocol message: the call's statement timeout, then ``statements``, one implicit transaction."""
    return ";\n".join((f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}", *statements))


#: The statements a direct connection prepares: a single statement each, and the hot ones.
PREPARED = ("acquire_free", "acquire", "peek", "release", "renew", "get")


def _setup_key(table: str) -> int:
    """The advisory-lock key that serializes creating or migrating one table."""
    return int.from_bytes(hashlib.sha256(f"singleton_integrations:{table}".encode()).digest()[:8], "big", signed=True)


def statements(table: str, statement_timeout_ms: int) -> tuple[dict[str, str], dict[str, str]]:
    """What to send for each step's statement key on one (quoted) table: as messages, and as prepared statements.

    ``_postgres_steps`` names a statement by its key; a message fits any
    connection, the prepared text (``PREPARED`` only) a direct one.
    """
    of_table = {key: template.format(table=table) for key, template in (
        ("acquire_free", ACQUIRE_FREE), ("acquire", ACQUIRE), ("hint", HINT), ("release", RELEASE),
        ("renew", RENEW), ("get", GET), ("list", LIST), ("force_release", FORCE_RELEASE),
        ("peek", PEEK), ("purge", PURGE), ("create", CREATE_TABLE), ("migrate", MIGRATE))}
    timeout = statement_timeout_ms
    messages = {key: message(timeout, of_table[key]) for key in
                ("acquire_free", "acquire", "peek", "release", "renew", "get", "list", "force_release", "purge")}
    messages["acquire_hint"] = message(timeout, of_table["acquire"], of_table["hint"])
    messages["inspect"] = message(timeout, INSPECT)
    messages["backend_pid"] = message(timeout, "SELECT pg_backend_pid()")
    messages["setup"] = message(timeout, f"SET LOCAL lock_timeout = {timeout}",
                                f"SELECT pg_advisory_xact_lock({_setup_key(table)})", of_table["create"], of_table["migrate"])
    return messages, {key: of_table[key] for key in PREPARED}
