"""The MySQL/MariaDB persister's statements: named templates, ``{table}`` the backquoted table.

Every statement here is accepted by MySQL 8.0 and by MariaDB 10.5+ alike (see
docs/persisters.md for the list and the features each relies on). Times are
``UTC_TIMESTAMP(6)``: the server's clock in UTC whatever the session's time
zone, with microseconds, and fixed for the length of one statement.

Row states (one row per name, kept after release so the fencing counter survives):

* held: ``owner_token`` set; live while ``expires_at`` is NULL (no expiry) or
  later than the server's clock. With a minimum hold, ``expires_at >= hold_until``.
* released into its minimum hold: ``owner_token`` NULL, ``released_at`` set,
  ``expires_at = hold_until`` still ahead. Nobody may take it yet.
* free: ``owner_token`` NULL and no hold ahead; ``released_at`` says since when.
  ``expires_at`` = ``MARK``: holds taken with ``limit=N`` may be live (see ``MARK``).

A name's row is also its one fencing counter. Holds taken with ``limit=N`` (N > 1) live
in ``<table>_holds``, one row per slot of the name (kept after release, like the name's
row), with the same columns and states; every write that makes a slot live holds the
name's row lock first, so the name's row serializes every attempt on the name.

``name`` is ``VARBINARY``: the UTF-8 bytes of the name. Binary strings compare
byte for byte with no trailing-space padding (``utf8mb4_bin`` is PAD SPACE on
MySQL 8, so 'a' and 'a ' would be one key there), and sort by byte, which for
UTF-8 is code point order, as Python sorts names. Names are sent as hex text
(``UNHEX(%(name)s)``): no driver's bytes quoting is involved (aiomysql's is
broken with PyMySQL 1.2).
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE_SOME",
    "ACQUIRE_SOME_QUEUED",
    "CREATE_HOLDS",
    "CREATE_TABLE",
    "CREATE_WAITERS",
    "DELETE_ENDED_PLACES",
    "DELETE_IDLE",
    "DELETE_IDLE_HOLDS",
    "DROP_PLACE",
    "FORCE_FREE",
    "FORCE_FREE_HOLDS",
    "HEAD",
    "HOLDERS",
    "INSERT",
    "LIST",
    "LOCK_ALL_LIVE",
    "LOCK_LIVE",
    "LOCK_NAME",
    "LOCK_NAME_AND_HOLDS",
    "LOCK_OWNED",
    "NOW",
    "PLACE",
    "PROBE_HOLDS",
    "PROBE_TABLE",
    "PROBE_WAITERS",
    "READ",
    "RELEASE_HOLD",
    "RELEASE_OWNED",
    "RENEW",
    "RENEW_HOLD",
    "TAKE",
    "TAKE_FREE",
    "session_setup",
]

#: The table. InnoDB for row locks and crash-safe commits; the primary key on the
#: name's bytes (at most 255 characters of 4 bytes: 1020 bytes, under InnoDB's 3072).
CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    name VARBINARY(1020) NOT NULL,
    owner_token VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    fencing_token BIGINT NOT NULL,
    host VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    pid BIGINT NOT NULL,
    created_at DATETIME(6) NOT NULL,
    expires_at DATETIME(6) NULL,
    metadata TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    hold_until DATETIME(6) NULL,
    released_at DATETIME(6) NULL,
    PRIMARY KEY (name)
) ENGINE=InnoDB
"""
#: The waiters' queue (``fair``): one place per waiting owner token and name, in arrival
#: order (``place``). Every change to a name's places is made in a transaction that holds
#: the name's row lock, so the queue of one name is never raced.
CREATE_WAITERS = """
CREATE TABLE IF NOT EXISTS {waiters} (
    place BIGINT NOT NULL AUTO_INCREMENT,
    name VARBINARY(1020) NOT NULL,
    owner_token VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    ends_at DATETIME(6) NOT NULL,
    PRIMARY KEY (place),
    UNIQUE KEY name_owner (name, owner_token),
    KEY name_place (name, place)
) ENGINE=InnoDB
"""
#: The extra holds of names taken with ``limit=N`` (N > 1): slot 1, 2, ... of a name, each
#: row a hold with the name's row's columns and states. A slot is reused once its hold is
#: over, so a name has at most as many rows as it ever had holds at once.
CREATE_HOLDS = """
CREATE TABLE IF NOT EXISTS {holds} (
    name VARBINARY(1020) NOT NULL,
    slot INT NOT NULL,
    owner_token VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    fencing_token BIGINT NOT NULL,
    host VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    pid BIGINT NOT NULL,
    created_at DATETIME(6) NOT NULL,
    expires_at DATETIME(6) NULL,
    metadata TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    hold_until DATETIME(6) NULL,
    released_at DATETIME(6) NULL,
    PRIMARY KEY (name, slot)
) ENGINE=InnoDB
"""
#: Whether the table is there and readable, when CREATE was refused.
PROBE_TABLE = "SELECT 1 FROM {table} LIMIT 0"
PROBE_WAITERS = "SELECT 1 FROM {waiters} LIMIT 0"
PROBE_HOLDS = "SELECT 1 FROM {holds} LIMIT 0"

_COLUMNS = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, released_at, hold_until"
_NOW = "UTC_TIMESTAMP(6)"
#: The one clock reading of a ``limit=N`` acquire (``SET @now``), which every statement of it judges by.
_AT = "CAST(@now AS DATETIME(6))"


def _held(now: str, of: str = "") -> str:
    """Held at ``now``: an owner and a lease not over (``of``: the table's alias and a dot)."""
    return f"({of}owner_token IS NOT NULL AND ({of}expires_at IS NULL OR {of}expires_at > {now}))"


def _live(now: str, of: str = "") -> str:
    """Live at ``now``: held, or released but still inside its minimum hold, so nobody else may take it."""
    return (f"({_held(now, of)} OR ({of}owner_token IS NULL AND {of}hold_until IS NOT NULL "
            f"AND {of}hold_until > {now}))")


def _row(now: str) -> str:
    """What the steps read with a row: its columns (0-9), live (10), held (11), the clock (12)."""
    return f"{_COLUMNS}, {_live(now)} AS live, {_held(now)} AS held, {now} AS now"


_HELD, _LIVE, _ROW = _held(_NOW), _live(_NOW), _row(_NOW)

NOW = f"SELECT {_NOW}"
#: The row of a name, locked for the rest of the transaction. A locking read sees the
#: newest committed version whatever the isolation level; under READ COMMITTED a missing
#: row takes no gap lock, so first-time inserters of one name meet at the primary key
#: (a duplicate-key error, retried) rather than in a gap-lock deadlock.
LOCK_NAME = f"SELECT {_ROW} FROM {{table}} WHERE name = UNHEX(%(name)s) FOR UPDATE"
#: The row only if ``owner_token`` owns it (release, renew).
LOCK_OWNED = f"SELECT {_ROW} FROM {{table}} WHERE name = UNHEX(%(name)s) AND owner_token = %(owner_token)s FOR UPDATE"
#: The row only if it is live.
LOCK_LIVE = f"SELECT {_ROW} FROM {{table}} WHERE name = UNHEX(%(name)s) AND {_LIVE} FOR UPDATE"
#: The name's row locked, then (a second statement, so read after the lock is granted) every
#: slot of the name: whoever makes a slot live holds that lock, so the slots read stay true.
_HOLDS_OF = f"SELECT {_ROW} FROM {{holds}} WHERE name = UNHEX(%(name)s) ORDER BY fencing_token"
LOCK_NAME_AND_HOLDS = f"{LOCK_NAME};\n{_HOLDS_OF}"
#: Every live hold of a name, by fencing token, with the name's row locked (force release).
_LIVE_HOLDS = f"""
SELECT {_ROW}, 0 AS slot FROM {{table}} WHERE name = UNHEX(%(name)s) AND {_LIVE}
UNION ALL
SELECT {_ROW}, 1 AS slot FROM {{holds}} WHERE name = UNHEX(%(name)s) AND {_LIVE}
ORDER BY fencing_token
"""
LOCK_ALL_LIVE = f"SELECT 1 FROM {{table}} WHERE name = UNHEX(%(name)s) FOR UPDATE;\n{_LIVE_HOLDS}"
#: A first holder: the name has no row (never seen, or purged).
INSERT = """
INSERT INTO {table} (name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, hold_until,
                     released_at)
VALUES (UNHEX(%(name)s), %(owner_token)s, %(fencing_token)s, %(host)s, %(pid)s, %(created_at)s, %(expires_at)s,
        %(metadata)s, %(hold_until)s, NULL)
"""
#: A new holder of a row the transaction has locked and found not live.
TAKE = """
UPDATE {table} SET owner_token = %(owner_token)s, fencing_token = %(fencing_token)s, host = %(host)s,
    pid = %(pid)s, created_at = %(created_at)s, expires_at = %(expires_at)s, metadata = %(metadata)s,
    hold_until = %(hold_until)s, released_at = NULL
WHERE name = UNHEX(%(name)s)
"""
#: The mark of a name whose row is free (or released into its minimum hold) while holds taken
#: with ``limit=N`` may be live: ``expires_at``, which such a row does not otherwise use, set
#: this far ahead. The one-round-trip N = 1 acquire leaves a marked row to the steps, which
#: read every hold under the row lock and clear the mark when they take the row. Rows and
#: readers of older clients never see it: they judge a free row by ``hold_until`` alone.
MARK = "'9999-12-31 00:00:00'"
#: Release in one round trip, without reading first: three UPDATEs sent together (with the
#: COMMIT), each for the token's row in one state, so the affected-row counts say which it was:
#: held into its minimum hold, held and now free, or already expired. The first that matches
#: frees the owner token, so the later ones match nothing; each judges by its own clock reading,
#: later than the one before, so a hold or lease ending between them falls to the next.
#:
#: ``released_at`` set while held is the mark a ``limit=N`` hold leaves on an N = 1 hold it
#: joined (see ``MARK``): the release turns it into the free row's mark. Each SET reads it
#: first, so the order of assignments (MariaDB's SIMULTANEOUS_ASSIGNMENT or not) is moot.
_OWNED = "name = UNHEX(%(name)s) AND owner_token = %(owner_token)s"
_MARKED = "released_at IS NOT NULL"
RELEASE_OWNED = f"""
UPDATE {{table}} SET expires_at = IF({_MARKED}, {MARK}, hold_until), owner_token = NULL, released_at = {_NOW}
WHERE {_OWNED} AND (expires_at IS NULL OR expires_at > {_NOW}) AND hold_until IS NOT NULL AND hold_until > {_NOW};
UPDATE {{table}} SET expires_at = IF({_MARKED}, {MARK}, NULL), owner_token = NULL, released_at = {_NOW}
WHERE {_OWNED} AND (expires_at IS NULL OR expires_at > {_NOW});
UPDATE {{table}} SET expires_at = IF({_MARKED}, {MARK}, NULL), owner_token = NULL, released_at = {_NOW}
WHERE {_OWNED}
"""
#: The usual acquire in one round trip (sent with its COMMIT): take the name's row if it is
#: free (no owner, no minimum hold ahead), then read back the clock reading and fencing token
#: it wrote (a transaction sees its own change). ``UTC_TIMESTAMP(6)`` is read once per
#: statement, so every use in the UPDATE is the same instant. Only two columns come back:
#: parsing a wide row's column descriptions was a third of the client's time per cycle. A
#: name that is held, expired or has no row matches nothing and is left to the steps.
#:
#: A name whose row is free but MARKed (``limit=N`` holds may be live) matches nothing
#: either: the steps judge it with every hold read under the row lock. The mark is in the
#: row itself, so the UPDATE, which re-reads the row once any lock wait is over, sees it.
TAKE_FREE = f"""
UPDATE {{table}} SET owner_token = %(owner_token)s,
    fencing_token = GREATEST(fencing_token + 1, TIMESTAMPDIFF(MICROSECOND, '1970-01-01', {_NOW}) DIV 1000),
    host = %(host)s, pid = %(pid)s, created_at = {_NOW}, expires_at = {_NOW} + INTERVAL %(lease_us)s MICROSECOND,
    metadata = %(metadata)s, hold_until = {_NOW} + INTERVAL %(hold_us)s MICROSECOND, released_at = NULL
WHERE name = UNHEX(%(name)s) AND owner_token IS NULL AND (hold_until IS NULL OR hold_until <= {_NOW})
    AND (expires_at IS NULL OR expires_at <= {_NOW});
SELECT created_at, fencing_token FROM {{table}} WHERE name = UNHEX(%(name)s)
"""
RENEW = "UPDATE {table} SET expires_at = %(expires_at)s WHERE name = UNHEX(%(name)s)"
#: Administrative: free a held name, or end a minimum hold early (the mark goes too: every
#: live slot of the name is freed in the same transaction).
FORCE_FREE = f"""
UPDATE {{table}} SET owner_token = NULL, expires_at = NULL, hold_until = NULL, released_at = %(now)s
WHERE name = UNHEX(%(name)s) AND {_LIVE}
"""
#: Every live hold of a name, the name's row's and its slots', by fencing token.
HOLDERS = f"""
SELECT {_ROW} FROM {{table}} WHERE name = UNHEX(%(name)s) AND {_LIVE}
UNION ALL
SELECT {_ROW} FROM {{holds}} WHERE name = UNHEX(%(name)s) AND {_LIVE}
ORDER BY fencing_token
"""
#: One live hold of a name: the lowest fencing token.
READ = HOLDERS.rstrip() + " LIMIT 1"
#: LEFT() on bytes compares the prefix literally: '%', '_' and '\\' are plain text (no LIKE).
_PREFIXED = "LEFT(name, LENGTH(UNHEX(%(prefix)s))) = UNHEX(%(prefix)s)"
LIST = f"""
SELECT {_ROW} FROM {{table}} WHERE {_PREFIXED} AND {_LIVE}
UNION ALL
SELECT {_ROW} FROM {{holds}} WHERE {_PREFIXED} AND {_LIVE}
ORDER BY name, fencing_token
"""
#: A slot's release, as ``RELEASE_OWNED``'s for the name's row.
RELEASE_HOLD = RELEASE_OWNED.replace("{table}", "{holds}")
#: A slot's renewal, never before its minimum hold's end, in one statement; the name's row is
#: locked first (the batch's first statement) so that no attempt judging that slot over, or
#: taking it, is between its reading and its commit.
RENEW_HOLD = f"""
SELECT 1 FROM {{table}} WHERE name = UNHEX(%(name)s) FOR UPDATE;
UPDATE {{holds}} SET expires_at = IF(%(lease_us)s IS NULL, NULL,
    GREATEST({_NOW} + INTERVAL %(lease_us)s MICROSECOND, COALESCE(hold_until, {_NOW})))
WHERE {_OWNED} AND {_HELD};
SELECT {_ROW} FROM {{holds}} WHERE {_OWNED}
"""
#: Administrative: every live slot of a name (its row locked by ``LOCK_ALL_LIVE``).
FORCE_FREE_HOLDS = f"""
UPDATE {{holds}} SET owner_token = NULL, expires_at = NULL, hold_until = NULL, released_at = %(now)s
WHERE name = UNHEX(%(name)s) AND {_LIVE}
"""
#: An acquire with ``limit=N`` (N > 1) in one round trip (sent with its COMMIT), whatever it
#: finds. The first statement locks the name's row (inserting a free one for a new name; on
#: a duplicate, even an update that changes nothing keeps the row's exclusive lock), so
#: concurrent attempts on the name run one after another from there. The next reads, in one
#: pass over the name's row joined with its slots, the server's clock once (``@now``, which
#: every later statement judges by), the live holds, the caller's own, a slot to reuse (one
#: whose hold is over) or the next number, and the next fencing token (above the row's and
#: every slot's, as the N = 1 acquire mints them), and decides (``@take``): the caller holds
#: none and fewer than N are live (with the places queued before the caller's). Then, only
#: if so, the slot is written, and the name's row is MARKed (``@row``): a row with no live
#: hold takes the free row's mark (an expired holder there is cleared; a row marked already
#: is not written again); a row released into its minimum hold takes the mark; a held row
#: gets ``released_at``, which its release turns into the mark (a held row's ``released_at``
#: is read by nobody). The row's counter is not moved: every acquire mints above the row's
#: token and every slot's. The last statement reads back every live hold at ``@now``: the
#: caller's among them means acquired.
_THE_NAME = "name = UNHEX(%(name)s)"
_IS_MINE = "owner_token = %(owner_token)s"
_AHEAD = f"""{{waiters}} WHERE {_THE_NAME} AND ends_at > {_NOW} AND owner_token <> %(owner_token)s
        AND place < COALESCE((SELECT place FROM {{waiters}} WHERE {_THE_NAME} AND {_IS_MINE}),
                             9223372036854775807)"""
#: Over the name's row joined with its slots (a row with no slot: one row of NULL slot columns).
_LIVE_COUNT = f"(MAX({_live(_NOW, 'named.')}) + COALESCE(SUM({_live(_NOW, 'slot.')}), 0))"
_MINE_COUNT = (f"(MAX(named.{_IS_MINE} AND {_held(_NOW, 'named.')}) "
               f"+ COALESCE(SUM(slot.{_IS_MINE} AND {_held(_NOW, 'slot.')}), 0))")
_ACQUIRE_SOME = f"""
INSERT INTO {{table}} (name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, hold_until,
                       released_at)
VALUES (UNHEX(%(name)s), NULL, 0, %(host)s, %(pid)s, {_NOW}, NULL, '', NULL, {_NOW})
ON DUPLICATE KEY UPDATE fencing_token = fencing_token;
SELECT {_NOW}, {_LIVE_COUNT}, {_MINE_COUNT},
       COALESCE(MIN(IF({_live(_NOW, "slot.")}, NULL, slot.slot)), MAX(slot.slot) + 1, 1),
       GREATEST(MAX(named.fencing_token) + 1, COALESCE(MAX(slot.fencing_token), 0) + 1,
                TIMESTAMPDIFF(MICROSECOND, '1970-01-01', {_NOW}) DIV 1000),
       MAX(IF({_held(_NOW, "named.")}, 1, IF({_live(_NOW, "named.")}, 2, 0))),
       {_MINE_COUNT} = 0 AND {_LIVE_COUNT} + {{ahead}} < %(limit)s{{queue_reads}}
FROM {{table}} AS named LEFT JOIN {{holds}} AS slot ON slot.name = named.name
WHERE named.{_THE_NAME} INTO @now, @live, @mine, @slot, @fence, @row, @take{{queue_vars}};
INSERT INTO {{holds}} (name, slot, owner_token, fencing_token, host, pid, created_at, expires_at, metadata,
                       hold_until, released_at)
SELECT UNHEX(%(name)s), @slot, %(owner_token)s, @fence, %(host)s, %(pid)s, {_AT},
       {_AT} + INTERVAL %(lease_us)s MICROSECOND, %(metadata)s, {_AT} + INTERVAL %(hold_us)s MICROSECOND, NULL
FROM DUAL WHERE @take
ON DUPLICATE KEY UPDATE owner_token = %(owner_token)s, fencing_token = @fence, host = %(host)s, pid = %(pid)s,
    created_at = {_AT}, expires_at = {_AT} + INTERVAL %(lease_us)s MICROSECOND, metadata = %(metadata)s,
    hold_until = {_AT} + INTERVAL %(hold_us)s MICROSECOND, released_at = NULL;
UPDATE {{table}} SET owner_token = IF(@row = 0, NULL, owner_token), hold_until = IF(@row = 0, NULL, hold_until),
    released_at = IF(@row = 2 OR (@row = 0 AND expires_at <=> {MARK}), released_at, {_AT}),
    expires_at = IF(@row = 1, expires_at, {MARK})
WHERE {_THE_NAME} AND @take;{{queue_writes}}
SELECT {_row(_AT)} FROM {{table}} WHERE {_THE_NAME} AND {_live(_AT)}
UNION ALL
SELECT {_row(_AT)} FROM {{holds}} WHERE {_THE_NAME} AND {_live(_AT)}"""
ACQUIRE_SOME = _ACQUIRE_SOME.replace("{ahead}", "0").replace("{queue_reads}", "").replace(
    "{queue_vars}", "").replace("{queue_writes}", "")
#: The same for a waiting caller (``queue_for``): it takes a hold only while the live holds and
#: the live places queued before its own (all of them, if it has none) are fewer than N; it
#: then leaves the queue, and otherwise keeps (or takes) its place. The last statement says
#: whether it took one, and when the first place ahead of it ends.
ACQUIRE_SOME_QUEUED = _ACQUIRE_SOME.replace("{ahead}", f"(SELECT COUNT(*) FROM {_AHEAD})").replace(
    "{queue_reads}", f", (SELECT MIN(ends_at) FROM {_AHEAD})").replace(
    "{queue_vars}", ", @ahead_end").replace("{queue_writes}", f"""
DELETE FROM {{waiters}} WHERE {_THE_NAME} AND {_IS_MINE} AND (@take OR @mine > 0);
INSERT INTO {{waiters}} (name, owner_token, ends_at)
SELECT UNHEX(%(name)s), %(owner_token)s, {_AT} + INTERVAL %(queue_us)s MICROSECOND FROM DUAL WHERE NOT @take AND @mine = 0
ON DUPLICATE KEY UPDATE ends_at = {_AT} + INTERVAL %(queue_us)s MICROSECOND;""") + f""";
SELECT @take, CAST(@ahead_end AS DATETIME(6)), {_AT}"""
#: Keep (or first take) a waiter's place: a place already held keeps its order, and ends later.
PLACE = """
INSERT INTO {waiters} (name, owner_token, ends_at) VALUES (UNHEX(%(name)s), %(owner_token)s, %(ends_at)s)
ON DUPLICATE KEY UPDATE ends_at = %(ends_at)s
"""
#: The first place that has not ended.
HEAD = f"""
SELECT owner_token, ends_at FROM {{waiters}} WHERE name = UNHEX(%(name)s) AND ends_at > {_NOW}
ORDER BY place LIMIT 1
"""
DROP_PLACE = "DELETE FROM {waiters} WHERE name = UNHEX(%(name)s) AND owner_token = %(owner_token)s"
#: Places that ended over a minute ago and were never left (their waiters died).
DELETE_ENDED_PLACES = f"DELETE FROM {{waiters}} WHERE ends_at < {_NOW} - INTERVAL 60 SECOND ORDER BY place LIMIT %(limit)s"
#: The retention sweep: at most ``limit`` rows of names free (or expired untaken) for longer
#: than the retention period. A row in its minimum hold or held is never idle. ORDER BY makes
#: the LIMIT deterministic, which statement-based replication asks of a DELETE ... LIMIT.
_CUTOFF = f"({_NOW} - INTERVAL %(after_us)s MICROSECOND)"
_IDLE = f"""
    ((owner_token IS NULL AND COALESCE(released_at, created_at) < {_CUTOFF}
      AND (hold_until IS NULL OR hold_until < {_CUTOFF}))
     OR (owner_token IS NOT NULL AND expires_at < {_CUTOFF}))"""
#: A name's row goes only once it has no slot left (a later sweep, after its slots'): the
#: row is the name's fencing counter and the lock every ``limit=N`` attempt takes first.
DELETE_IDLE = f"""
DELETE FROM {{table}}
WHERE {_IDLE}
  AND NOT EXISTS (SELECT 1 FROM {{holds}} AS slot WHERE slot.name = {{table}}.name)
ORDER BY name LIMIT %(limit)s
"""
#: Slots idle as long, in a statement after the names' rows (each lock taken in the order
#: every attempt takes them: a name's row, then its slots).
DELETE_IDLE_HOLDS = f"""
DELETE FROM {{holds}} WHERE {_IDLE}
ORDER BY name, slot LIMIT %(limit)s
"""


def session_setup(mariadb: bool, statement_timeout_ms: int) -> list[str]:
    """What each new connection runs once: the isolation level and the server-side statement bounds.

    ``innodb_lock_wait_timeout`` (whole seconds, both servers) bounds a wait for a row lock,
    the only way one of our statements can block for long. MariaDB's ``max_statement_time``
    (seconds) bounds every statement; MySQL's ``max_execution_time`` (ms) bounds only
    read-only SELECTs. The client's read and write timeouts bound the rest.
    """
    seconds = max(1, -(-statement_timeout_ms // 1000))  # rounded up: 0 would mean "forever" to neither, but refuse it
    bound = (f"SESSION max_statement_time = {statement_timeout_ms / 1000:.3f}" if mariadb
             else f"SESSION max_execution_time = {int(statement_timeout_ms)}")
    return [
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        f"SET SESSION innodb_lock_wait_timeout = {seconds}, SESSION sql_notes = 0, {bound}",
    ]
