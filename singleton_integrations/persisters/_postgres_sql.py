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

* shared (``limit=N``, more than one hold live): ``owner_token`` is ``''``, and
  ``metadata`` keeps the holds themselves, ``{"singleton:holds": [hold, ...]}``
  (each with the columns of a held or released row, without the name).
  ``fencing_token`` is the name's counter, every hold's token at most it;
  ``expires_at`` is when the last hold ends (NULL while one has no end), so to
  every N = 1 statement, ours or an older client's, the row is simply held
  until its last hold ends. A lone hold is kept as an ordinary held row: only a
  second live hold turns the row shared, and its last release frees the row.

Every statement on a name locks its one row, so the row is the whole state of
the name and each statement judges its newest version: N racing attempts cannot
both see N - 1 live holds, and the tokens of all the holds come from one counter.

``waiters_until`` is a hint that some process LISTENs for this name: a release
sends a NOTIFY only then, because a committing NOTIFY serializes commits across
the whole cluster. A waiter's failed attempt refreshes it in the same
transaction that locked the row, so a release that commits afterwards sees it.

The waiter queue (``fair``): a second table, ``{queue}`` (``QUEUE_TABLE``), keeps one
row per waiting owner token: its ``place`` (arrival order, from an identity
sequence) and when it ``ends`` unless the waiter's next attempt renews it. It only
orders waiters; the lock's exclusivity never depends on it. A caller without
``queue_for`` never reads it (the uncontended cycle is unchanged); a queued
caller takes a free name only when no earlier live place is queued. A release
that frees a name reads its head (an index probe, nothing when nobody queues)
and NOTIFYs ``QUEUED_WAKE`` + head + ``QUEUED_WAKE`` + name, so only that waiter's
process wakes it. Older clients never read the table: their waiters keep the hint
and are woken by the plain NOTIFY as before, and the new payload wakes nobody there.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "ACQUIRE",
    "ACQUIRE_FREE",
    "ACQUIRE_FREE_QUEUED",
    "ACQUIRE_LIMITED",
    "CREATE_TABLE",
    "DEQUEUE",
    "FORCE_RELEASE",
    "GET",
    "HINT",
    "HOLDERS",
    "HOLDS_KEY",
    "INSPECT",
    "LEAVE_QUEUE",
    "LIST",
    "MIGRATE",
    "NEW_COLUMNS",
    "PEEK",
    "PREPARED",
    "PURGE",
    "QUEUE",
    "QUEUED_WAKE",
    "QUEUE_TABLE",
    "RELEASE",
    "RELEASE_SHARED",
    "RENEW",
    "RENEW_SHARED",
    "SHARED",
    "message",
    "statements",
]

#: Columns this version added; tables created before it gain them once, on first use.
NEW_COLUMNS = ("hold_until", "released_at", "waiters_until")
#: How long after its end the retention sweep removes a waiter's place that was never renewed or left.
STALE_PLACE_SECONDS = 60
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
# The waiter queue (see the module docstring): a table of its own, so the lock table and
# every older client's statements on it stay as they were.
QUEUE_TABLE = """
CREATE TABLE IF NOT EXISTS {queue} (
    name text NOT NULL,
    owner_token text NOT NULL,
    place bigint GENERATED BY DEFAULT AS IDENTITY,
    ends timestamptz NOT NULL,
    PRIMARY KEY (name, owner_token)
)
"""
#: Starts (and splits) a NOTIFY payload that names the queue's head: ``QUEUED_WAKE`` head
#: ``QUEUED_WAKE`` name. No lock name holds a control character, so an older listener
#: takes the payload for a name nobody waits for.
QUEUED_WAKE = "\x1f"
# Whether the table exists, how many of the new columns it lacks, and its canonical
# name (the NOTIFY channel is named from it, so 'public.t' and 't' agree).
INSPECT = """
SELECT n.nspname, c.relname,
       (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        AND a.attname = ANY(%(columns)s::text[]))::int,
       to_regclass(%(queue)s) IS NOT NULL
FROM (VALUES (1)) AS one LEFT JOIN pg_class c ON c.oid = to_regclass(%(table)s)
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
"""

_COLUMNS = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, released_at, hold_until"
# Every column in the table's own order (``excluded.*``'s), as CREATE_TABLE and MIGRATE leave it.
_ROW = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, hold_until, released_at, waiters_until"


#: ``owner_token`` of a shared row (see the module docstring); no owner token is empty.
SHARED = ""
#: The key of a shared row's ``metadata`` that keeps its holds.
HOLDS_KEY = "singleton:holds"
# A shared row's holds read back as rows of the table's own type (its list leaves out the name).
_LISTED_COLUMNS = ", ".join(f"hold.{column.strip()}" for column in _COLUMNS.split(",")[1:])


def _held(row: str = "", now: str = "clock_timestamp()") -> str:
    return f"({row}owner_token IS NOT NULL AND ({row}expires_at IS NULL OR {row}expires_at > {now}))"


def _live(row: str = "", now: str = "clock_timestamp()") -> str:
    """Held, or released but still inside its minimum hold: nobody else may take it."""
    return f"({_held(row, now)} OR ({row}owner_token IS NULL AND {row}hold_until > {now}))"


def _alive(row: str = "", now: str = "clock_timestamp()") -> str:
    """``_live`` written shorter, for the long statements: a hold lives until its end, or for ever without one."""
    return f"coalesce({_end(row)} > {now}, {row}owner_token IS NOT NULL)"


def _end(row: str = "") -> str:
    """When a hold ends if nobody renews it: its lease, or its minimum hold once released (NULL: never)."""
    return f"CASE WHEN {row}owner_token IS NULL THEN {row}hold_until ELSE {row}expires_at END"


def _holds_of(rows: str) -> str:
    """Every hold the rows of ``rows`` keep, live or not: an ordinary row is one, a shared row has its list."""
    return f"""
    SELECT {_COLUMNS} FROM {rows} WHERE owner_token IS DISTINCT FROM '{SHARED}'
    UNION ALL
    SELECT kept.name, {_LISTED_COLUMNS} FROM {rows} AS kept
    CROSS JOIN LATERAL {_listed_holds("kept")} WHERE kept.owner_token = '{SHARED}'"""


def _listed_holds(row: str) -> str:
    return f"jsonb_populate_recordset(NULL::{{table}}, {row}.metadata -> '{HOLDS_KEY}') AS hold"


def _last_end(holds: str) -> str:
    """A shared row's ``expires_at``: when the last of ``holds`` ends, NULL if one never does."""
    return f"(SELECT CASE WHEN bool_and(ends IS NOT NULL) THEN max(ends) END FROM (SELECT {_end()} AS ends FROM {holds}) AS e)"


def _listed(holds: str) -> str:
    """A shared row's ``metadata``: ``holds`` (a relation with ``_COLUMNS``), by fencing token."""
    return (f"jsonb_build_object('{HOLDS_KEY}', (SELECT jsonb_agg(to_jsonb(listed) - 'name' ORDER BY listed.fencing_token) "
            f"FROM {holds} AS listed))")


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
# This transaction's commit does not wait for its WAL flush (a later synchronous commit, such
# as the next acquire, flushes it first). For writes whose loss in a server crash breaks no
# rule: a queue place (it only orders waiters), and the release of a lease with an end (a
# lost release keeps the name held until that end, as a holder that crashed would).
_NO_FLUSH = "set_config('synchronous_commit', 'off', true)"
# The first live place in the name's queue (NULL when nobody queues: one index probe).
_HEAD = ("(SELECT w.owner_token FROM {{queue}} AS w WHERE w.name = {name} AND w.ends > {now} "
         "ORDER BY w.place LIMIT 1)")
# Wakes the queue's head (see the module docstring) and answers it.
_WAKE_HEAD = "(SELECT {head} FROM pg_notify(%(channel)s, chr(31) || {head} || chr(31) || {name}))"
# Frees the name if the token still owns it and says whether the lease was still
# live (a lock that expired untaken is cleared too, but the caller lost it): one
# UPDATE, no row lock before it. ``released_at`` is when the name became free, so a
# lease that had ended is marked at its end (a microsecond before now at the latest),
# and ``released_at = now`` is the answer "live". Before hold_until the row stays as
# the name's holder, marked released, and no NOTIFY goes out: the name is not free
# yet. A lease with an end is released without waiting for the WAL flush (``_NO_FLUSH``,
# judged on the row version being updated; a CASE, so a lock without an end never runs it)
# unless ``durable``. RETURNING reads the newest row version, so a waiter's hint committed while we
# waited for the row is seen; the queue's head is read as the row is freed.
RELEASE = f"""
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
released AS (
    UPDATE {{table}} AS freed SET owner_token = NULL,
        released_at = CASE WHEN freed.expires_at IS NULL OR freed.expires_at > clock.now THEN clock.now
                           ELSE least(freed.expires_at, clock.now - interval '1 microsecond') END,
        expires_at = CASE WHEN freed.hold_until > clock.now THEN freed.hold_until END
    FROM clock WHERE freed.name = %(name)s AND freed.owner_token = %(owner_token)s
        AND CASE WHEN freed.expires_at IS NULL OR %(durable)s::boolean THEN true ELSE {_NO_FLUSH} IS NOT NULL END
    RETURNING freed.name, freed.released_at = clock.now AS live, coalesce(freed.hold_until > clock.now, false) AS holding,
        coalesce(freed.waiters_until > clock.now, false) AS waited,
        CASE WHEN NOT coalesce(freed.hold_until > clock.now, false)
             THEN {_HEAD.format(name="freed.name", now="clock.now")} END AS head
)
SELECT live, holding, CASE WHEN waited AND NOT holding THEN (SELECT true FROM pg_notify(%(channel)s, name)) ELSE false END,
       CASE WHEN head IS NOT NULL THEN {_WAKE_HEAD.format(head="head", name="name")} END
FROM released
"""
RENEW = f"""
UPDATE {{table}} SET expires_at = CASE WHEN %(ttl)s::float8 IS NULL THEN NULL
    ELSE greatest(clock_timestamp() + %(ttl)s::float8 * interval '1 second', hold_until) END
WHERE name = %(name)s AND owner_token = %(owner_token)s AND {_held()}
RETURNING {_COLUMNS}
"""
# The live holds of a name, by fencing token; GET the first of them.
HOLDERS = f"""
WITH kept AS (SELECT * FROM {{table}} WHERE name = %(name)s)
SELECT hold.* FROM ({_holds_of("kept")}) AS hold WHERE {_live("hold.")} ORDER BY hold.fencing_token
"""
GET = HOLDERS.rstrip() + " LIMIT 1\n"
# left() compares characters literally, so '%', '_' and '\\' in a prefix are plain text;
# COLLATE "C" sorts by code point, as Python sorts the other stores' names.
LIST = f"""
WITH kept AS (SELECT * FROM {{table}} WHERE left(name, char_length(%(prefix)s)) = %(prefix)s AND {_live()})
SELECT hold.* FROM ({_holds_of("kept")}) AS hold WHERE {_live("hold.")}
ORDER BY hold.name COLLATE "C", hold.fencing_token
"""
# Administrative: frees a held name (every hold of a shared one), or ends a minimum hold
# early. ``holder`` locks and reads the row before the update, so the answer shows what
# was removed: its live hold with the lowest fencing token.
FORCE_RELEASE = f"""
WITH holder AS MATERIALIZED (SELECT * FROM {{table}} WHERE name = %(name)s AND {_live()} FOR UPDATE),
freed AS (
    UPDATE {{table}} AS freed SET owner_token = NULL, expires_at = NULL, hold_until = NULL,
        released_at = clock_timestamp(),
        metadata = CASE WHEN holder.owner_token = '{SHARED}' THEN jsonb_build_object() ELSE freed.metadata END
    FROM holder WHERE freed.name = holder.name
    RETURNING freed.name
)
SELECT hold.*, pg_notify(%(channel)s, hold.name),
       (SELECT {_WAKE_HEAD.format(head="head", name="hold.name")}
        FROM (SELECT {_HEAD.format(name="hold.name", now="clock_timestamp()")} AS head) AS first WHERE head IS NOT NULL)
FROM ({_holds_of("holder")}) AS hold
WHERE {_live("hold.")} AND EXISTS (SELECT FROM freed) ORDER BY hold.fencing_token LIMIT 1
"""
# ``limit=N``: one statement that adds a hold while fewer than N are live, or reports
# every live hold. ``full_set`` judges the row read without a lock: when its N holds
# are live (and no waiter's hint is to be left, as with PEEK) that is the answer, and
# the refusal commits no row lock, whose commit would wait for a WAL flush. Otherwise
# ``previous`` locks the row, so every later part judges its newest version. The first
# hold of a name is an ordinary held row; a second turns the row shared, the first
# hold moving into its list; expired holds are dropped. The new token is the name's
# counter + 1 (or the clock in ms, as ACQUIRE's). Answer rows: ('taken', the new
# hold), or ('live', a live hold, seconds until it ends) for each; none when the
# name's row appeared after the statement's snapshot (look again). Kept under 4 kB
# (``_compact``), the size up to which psycopg caches a statement's placeholders.
ACQUIRE_LIMITED = f"""
WITH clock AS (SELECT clock_timestamp() AS now),
seen AS (SELECT * FROM {{table}} WHERE name = %(name)s),
full_set AS (
    SELECT coalesce((
        SELECT CASE WHEN owner_token = '{SHARED}' THEN (SELECT count(*) FROM {_listed_holds("seen")}
                                                      WHERE {_alive("hold.", "clock.now")})
                    ELSE {_alive("", "clock.now")}::int END >= %(limit)s::integer
               AND owner_token IS DISTINCT FROM %(owner_token)s
               AND NOT coalesce(metadata -> '{HOLDS_KEY}' @> jsonb_build_array(jsonb_build_object(
                   'owner_token', %(owner_token)s::text)), false)
               AND (NOT %(hinting)s::boolean OR coalesce(waiters_until > now + interval '{HINT_REFRESH_SECONDS} seconds', false))
        FROM seen, clock), false) AS refused
),
previous AS (
    SELECT * FROM {{table}} WHERE name = %(name)s AND NOT (SELECT refused FROM full_set) FOR UPDATE
),
judged AS (SELECT * FROM previous UNION ALL SELECT * FROM seen WHERE (SELECT refused FROM full_set)),
live AS (
    SELECT hold.* FROM ({_holds_of("judged")}) AS hold, clock WHERE {_alive("hold.", "clock.now")}
),
verdict AS (
    SELECT count(*) AS holds, coalesce(bool_or(owner_token = %(owner_token)s), false) AS mine FROM live
),
fresh AS (
    SELECT %(name)s::text AS name, %(owner_token)s::text AS owner_token,
           greatest(coalesce((SELECT fencing_token FROM previous) + 1, 0), {_CLOCK_MS}) AS fencing_token,
           %(host)s::text AS host, %(pid)s::integer AS pid, clock.now AS created_at, {_EXPIRES} AS expires_at,
           %(metadata)s::jsonb AS metadata, NULL::timestamptz AS released_at, {_HOLD_UNTIL} AS hold_until
    FROM verdict, clock WHERE NOT verdict.mine AND verdict.holds + %(ahead)s::integer < %(limit)s::integer
),
after AS (SELECT * FROM live UNION ALL SELECT * FROM fresh),
taken AS (
    INSERT INTO {{table}} AS held ({_ROW})
    SELECT fresh.name, CASE WHEN verdict.holds = 0 THEN fresh.owner_token ELSE '{SHARED}' END,
           fresh.fencing_token, fresh.host, fresh.pid, fresh.created_at,
           CASE WHEN verdict.holds = 0 THEN fresh.expires_at ELSE {_last_end("after")} END,
           CASE WHEN verdict.holds = 0 THEN fresh.metadata ELSE {_listed("after")} END,
           CASE WHEN verdict.holds = 0 THEN fresh.hold_until END, NULL, (SELECT waiters_until FROM previous)
    FROM fresh, verdict
    ON CONFLICT (name) DO UPDATE SET ({_ROW}) = ROW(excluded.*) WHERE EXISTS (SELECT FROM previous)
    RETURNING 1
)
SELECT 'taken', fresh.*, NULL::float8 FROM fresh WHERE EXISTS (SELECT FROM taken)
UNION ALL
SELECT 'live', live.*, extract(epoch FROM {_end("live.")} - clock.now)::float8
FROM live, clock WHERE NOT EXISTS (SELECT FROM fresh)
ORDER BY 4
"""
# A shared row's hold: RELEASE's rules on one entry of its list (RELEASE found no row
# with the token). A release before the hold's minimum hold ends keeps it listed,
# released; else it leaves the list, and the last one to leave frees the row. Any hold
# that leaves wakes the waiters (a hold is free for a caller with limit=N).
RELEASE_SHARED = f"""
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
shared AS MATERIALIZED (SELECT * FROM {{table}} WHERE name = %(name)s AND owner_token = '{SHARED}' FOR UPDATE),
holds AS MATERIALIZED (SELECT hold.* FROM ({_holds_of("shared")}) AS hold),
mine AS MATERIALIZED (
    SELECT {_held("", "clock.now")} AS live, coalesce(hold_until > clock.now, false) AS holding
    FROM holds, clock WHERE owner_token = %(owner_token)s
),
kept AS MATERIALIZED (
    SELECT after_release.* FROM (
        SELECT name, CASE WHEN ours THEN NULL ELSE owner_token END AS owner_token, fencing_token, host, pid, created_at,
               CASE WHEN ours THEN hold_until ELSE expires_at END AS expires_at, metadata,
               CASE WHEN ours THEN clock.now ELSE released_at END AS released_at, hold_until
        FROM (SELECT holds.*, owner_token IS NOT DISTINCT FROM %(owner_token)s AS ours FROM holds) AS judged, clock
    ) AS after_release, clock WHERE {_live("after_release.", "clock.now")}
),
released AS (
    UPDATE {{table}} AS named SET
        owner_token = CASE WHEN EXISTS (SELECT FROM kept) THEN '{SHARED}' END,
        metadata = CASE WHEN EXISTS (SELECT FROM kept) THEN {_listed("kept")} ELSE jsonb_build_object() END,
        expires_at = {_last_end("kept")}, hold_until = NULL,
        released_at = CASE WHEN EXISTS (SELECT FROM kept) THEN NULL ELSE clock.now END
    FROM shared, clock WHERE named.name = shared.name AND EXISTS (SELECT FROM mine)
    RETURNING named.name, coalesce(named.waiters_until > clock.now, false) AS waited
)
SELECT live, holding, CASE WHEN waited AND NOT holding THEN (SELECT true FROM pg_notify(%(channel)s, name)) ELSE false END,
       (SELECT {_WAKE_HEAD.format(head="head", name="first.name")}
        FROM (SELECT name, {_HEAD.format(name="name", now="clock.now")} AS head FROM released, clock) AS first
        WHERE head IS NOT NULL AND NOT holding)
FROM mine, released
"""
# A shared row's hold: RENEW's rules on one entry of its list; the row's end follows.
RENEW_SHARED = f"""
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
shared AS MATERIALIZED (SELECT * FROM {{table}} WHERE name = %(name)s AND owner_token = '{SHARED}' FOR UPDATE),
holds AS MATERIALIZED (SELECT hold.* FROM ({_holds_of("shared")}) AS hold),
renewed AS MATERIALIZED (
    SELECT name, owner_token, fencing_token, host, pid, created_at,
           CASE WHEN %(ttl)s::float8 IS NULL THEN NULL
                ELSE greatest(clock.now + %(ttl)s::float8 * interval '1 second', hold_until) END AS expires_at,
           metadata, released_at, hold_until
    FROM holds, clock WHERE owner_token = %(owner_token)s AND {_held("", "clock.now")}
),
kept AS (
    SELECT * FROM renewed
    UNION ALL
    SELECT holds.* FROM holds, clock
    WHERE owner_token IS DISTINCT FROM %(owner_token)s AND {_live("holds.", "clock.now")}
),
stored AS (
    UPDATE {{table}} AS named SET metadata = {_listed("kept")}, expires_at = {_last_end("kept")}
    FROM shared WHERE named.name = shared.name AND EXISTS (SELECT FROM renewed)
    RETURNING 1
)
SELECT renewed.* FROM renewed WHERE EXISTS (SELECT FROM stored)
"""
# A queued caller's ACQUIRE_FREE: the name goes to it only when no earlier live place is
# queued (its own place, if live, is where it stands; without one, every live place is
# earlier), and taking the name drops its place.
_AHEAD = ("SELECT 1 FROM {queue} AS w WHERE w.name = %(name)s AND w.ends > clock.now "
          "AND w.owner_token <> %(owner_token)s AND w.place < coalesce((SELECT m.place FROM {queue} AS m "
          "WHERE m.name = %(name)s AND m.owner_token = %(owner_token)s AND m.ends > clock.now), 9223372036854775807)")
ACQUIRE_FREE_QUEUED = "WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now), taken AS (" + ACQUIRE_FREE.replace(
    f"FROM {_CLOCK}", "FROM clock").replace(
    "WHERE name = %(name)s AND owner_token IS NULL", f"WHERE NOT EXISTS ({_AHEAD}) AND name = %(name)s AND owner_token IS NULL") + \
    "), dropped AS (DELETE FROM {queue} WHERE name = %(name)s AND owner_token = %(owner_token)s " \
    "AND EXISTS (SELECT FROM taken)) SELECT * FROM taken"
# A queued caller's look after ACQUIRE_FREE_QUEUED took nothing: the name's row (as PEEK:
# columns, live, seconds left), how many live places are ahead of the caller's, and when
# the first of them ends. It queues the caller last, or renews its place, only when the
# place is missing or past half its span: most looks write nothing, and a place is
# written without waiting for the WAL flush (``_NO_FLUSH``). A place that ended is given
# a new place at the back.
QUEUE = f"""
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
queued AS (
    INSERT INTO {{queue}} AS w (name, owner_token, ends)
    SELECT %(name)s, %(owner_token)s, clock.now + %(queue_for)s::float8 * interval '1 second' FROM clock
    WHERE NOT EXISTS (SELECT FROM {{queue}} AS m WHERE m.name = %(name)s AND m.owner_token = %(owner_token)s
                      AND m.ends > clock.now + %(queue_for)s::float8 * interval '0.5 second')
    ON CONFLICT (name, owner_token) DO UPDATE SET ends = excluded.ends,
        place = CASE WHEN w.ends <= excluded.ends - %(queue_for)s::float8 * interval '1 second'
                     THEN excluded.place ELSE w.place END
    RETURNING 1
),
ahead AS ({_AHEAD.replace("SELECT 1 FROM", "SELECT w.ends FROM clock,")})
SELECT seen.*, (SELECT count(*) FROM ahead)::int, (SELECT extract(epoch FROM min(ends) - clock.now)::float8 FROM ahead),
       {_NO_FLUSH}
FROM clock LEFT JOIN (
    SELECT {_COLUMNS}, {_live()} AS live,
           extract(epoch FROM CASE WHEN owner_token IS NULL THEN hold_until ELSE expires_at END - clock_timestamp())::float8
    FROM {{table}} WHERE name = %(name)s
) AS seen ON true
"""
# A queued caller took the name by another statement (ACQUIRE, ACQUIRE_LIMITED): its place goes.
DEQUEUE = f"DELETE FROM {{queue}} WHERE name = %(name)s AND owner_token = %(owner_token)s AND {_NO_FLUSH} IS NOT NULL"
# A waiter gave up: its place goes, and if the name is free the next place is woken.
LEAVE_QUEUE = f"""
WITH gone AS (
    DELETE FROM {{queue}} WHERE name = %(name)s AND owner_token = %(owner_token)s AND {_NO_FLUSH} IS NOT NULL RETURNING name
),
next AS (
    SELECT w.owner_token AS head FROM {{queue}} AS w WHERE w.name = %(name)s AND w.ends > clock_timestamp()
    AND w.owner_token <> %(owner_token)s ORDER BY w.place LIMIT 1
)
SELECT {_WAKE_HEAD.format(head="next.head", name="%(name)s")} FROM next
WHERE EXISTS (SELECT FROM gone) AND NOT EXISTS (SELECT FROM {{table}} WHERE name = %(name)s AND {_live()})
"""
# The retention sweep: the places of waiters that stopped asking without leaving (killed),
# and at most ``limit`` rows of names free (or expired untaken) for
# longer than the retention period. Rows another transaction has locked are skipped,
# and the condition is checked again on the version being deleted. A free row
# written before this version has no released_at; its acquisition time stands in.
_IDLE = ("((owner_token IS NULL AND coalesce(greatest(released_at, hold_until), created_at) < {cutoff})"
         " OR (owner_token IS NOT NULL AND expires_at < {cutoff}))")
_CUTOFF = "clock_timestamp() - %(after)s::float8 * interval '1 second'"
PURGE = f"""
WITH stale_places AS (
    DELETE FROM {{queue}} WHERE ends < clock_timestamp() - interval '{STALE_PLACE_SECONDS} seconds'
)
DELETE FROM {{table}} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {{table}} WHERE {_IDLE.format(cutoff=_CUTOFF)} LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)) AND {_IDLE.format(cutoff=_CUTOFF)}
"""


def _compact(statement: str) -> str:
    """``statement`` with each run of whitespace made one space (no literal here holds two)."""
    return " ".join(statement.split())


ACQUIRE_LIMITED, RELEASE_SHARED, RENEW_SHARED, QUEUE = map(_compact, (ACQUIRE_LIMITED, RELEASE_SHARED, RENEW_SHARED, QUEUE))


def message(statement_timeout_ms: int, *statements: str) -> str:
    """One simple-protocol message: the call's statement timeout, then ``statements``, one implicit transaction."""
    return ";\n".join((f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}", *statements))


#: The statements a direct connection prepares: a single statement each, and the hot ones.
PREPARED = ("acquire_free", "acquire", "peek", "release", "renew", "get", "acquire_limited", "release_shared",
            "renew_shared", "holders", "acquire_free_queued", "queue", "dequeue")


def _setup_key(table: str) -> int:
    """The advisory-lock key that serializes creating or migrating one table."""
    return int.from_bytes(hashlib.sha256(f"singleton_integrations:{table}".encode()).digest()[:8], "big", signed=True)


def _queue_of(table: str) -> str:
    """The quoted queue table beside a quoted ``table``: its last identifier + ``_waiters``."""
    return f'{table[:-1]}_waiters"'


def statements(table: str, statement_timeout_ms: int, queue: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """What to send for each step's statement key on one (quoted) table: as messages, and as prepared statements.

    ``_postgres_steps`` names a statement by its key; a message fits any
    connection, the prepared text (``PREPARED`` only) a direct one. ``queue`` is the
    quoted waiter queue table (default: the table's name + ``_waiters``).
    """
    queue = _queue_of(table) if queue is None else queue
    of_table = {key: template.format(table=table, queue=queue) for key, template in (
        ("acquire_free", ACQUIRE_FREE), ("acquire", ACQUIRE), ("hint", HINT), ("release", RELEASE),
        ("renew", RENEW), ("get", GET), ("list", LIST), ("force_release", FORCE_RELEASE),
        ("peek", PEEK), ("purge", PURGE), ("create", CREATE_TABLE), ("migrate", MIGRATE),
        ("acquire_limited", ACQUIRE_LIMITED), ("release_shared", RELEASE_SHARED), ("renew_shared", RENEW_SHARED),
        ("holders", HOLDERS), ("acquire_free_queued", ACQUIRE_FREE_QUEUED), ("queue", QUEUE),
        ("dequeue", DEQUEUE), ("leave_queue", LEAVE_QUEUE), ("create_queue", QUEUE_TABLE))}
    timeout = statement_timeout_ms
    messages = {key: message(timeout, of_table[key]) for key in
                ("acquire_free", "acquire", "peek", "release", "renew", "get", "list", "force_release", "purge",
                 "acquire_limited", "release_shared", "renew_shared", "holders", "acquire_free_queued", "queue",
                 "dequeue", "leave_queue")}
    messages["acquire_hint"] = message(timeout, of_table["acquire"], of_table["hint"])
    messages["acquire_limited_hint"] = message(timeout, of_table["acquire_limited"], of_table["hint"])
    messages["inspect"] = message(timeout, INSPECT)
    messages["backend_pid"] = message(timeout, "SELECT pg_backend_pid()")
    messages["setup"] = message(timeout, f"SET LOCAL lock_timeout = {timeout}",
                                f"SELECT pg_advisory_xact_lock({_setup_key(table)})", of_table["create"], of_table["migrate"],
                                of_table["create_queue"])
    # A table this version's predecessors made: only the queue is new, and the lock table is left alone
    # (MIGRATE's ALTER TABLE would take an ACCESS EXCLUSIVE lock on it, even with nothing to add).
    messages["setup_queue"] = message(timeout, f"SET LOCAL lock_timeout = {timeout}",
                                      f"SELECT pg_advisory_xact_lock({_setup_key(table)})", of_table["create_queue"])
    return messages, {key: of_table[key] for key in PREPARED}
