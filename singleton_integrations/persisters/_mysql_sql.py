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

``name`` is ``VARBINARY``: the UTF-8 bytes of the name. Binary strings compare
byte for byte with no trailing-space padding (``utf8mb4_bin`` is PAD SPACE on
MySQL 8, so 'a' and 'a ' would be one key there), and sort by byte, which for
UTF-8 is code point order, as Python sorts names. Names are sent as hex text
(``UNHEX(%(name)s)``): no driver's bytes quoting is involved (aiomysql's is
broken with PyMySQL 1.2).
"""

from __future__ import annotations

__all__ = [
    "CREATE_TABLE",
    "CREATE_WAITERS",
    "DELETE_ENDED_PLACES",
    "DELETE_IDLE",
    "DROP_PLACE",
    "FORCE_FREE",
    "HEAD",
    "INSERT",
    "LIST",
    "LOCK_LIVE",
    "LOCK_NAME",
    "LOCK_OWNED",
    "NOW",
    "PLACE",
    "PROBE_TABLE",
    "PROBE_WAITERS",
    "READ",
    "RELEASE_OWNED",
    "RENEW",
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
#: Whether the table is there and readable, when CREATE was refused.
PROBE_TABLE = "SELECT 1 FROM {table} LIMIT 0"
PROBE_WAITERS = "SELECT 1 FROM {waiters} LIMIT 0"

_COLUMNS = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, released_at, hold_until"
_NOW = "UTC_TIMESTAMP(6)"
#: Held: an owner and a lease not over by the server's clock.
_HELD = f"(owner_token IS NOT NULL AND (expires_at IS NULL OR expires_at > {_NOW}))"
#: Live: held, or released but still inside its minimum hold, so nobody else may take it.
_LIVE = f"({_HELD} OR (owner_token IS NULL AND hold_until IS NOT NULL AND hold_until > {_NOW}))"
#: What the steps read with a row: its columns (0-9), live (10), held (11), the server's clock (12).
_ROW = f"{_COLUMNS}, {_LIVE} AS live, {_HELD} AS held, {_NOW} AS now"

NOW = f"SELECT {_NOW}"
#: The row of a name, locked for the rest of the transaction. A locking read sees the
#: newest committed version whatever the isolation level; under READ COMMITTED a missing
#: row takes no gap lock, so first-time inserters of one name meet at the primary key
#: (a duplicate-key error, retried) rather than in a gap-lock deadlock.
LOCK_NAME = f"SELECT {_ROW} FROM {{table}} WHERE name = UNHEX(%(name)s) FOR UPDATE"
#: The row only if ``owner_token`` owns it (release, renew).
LOCK_OWNED = f"SELECT {_ROW} FROM {{table}} WHERE name = UNHEX(%(name)s) AND owner_token = %(owner_token)s FOR UPDATE"
#: The row only if it is live (force release).
LOCK_LIVE = f"SELECT {_ROW} FROM {{table}} WHERE name = UNHEX(%(name)s) AND {_LIVE} FOR UPDATE"
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
#: Release in one round trip, without reading first: three UPDATEs sent together (with the
#: COMMIT), each for the token's row in one state, so the affected-row counts say which it was:
#: held into its minimum hold, held and now free, or already expired. The first that matches
#: frees the owner token, so the later ones match nothing; each judges by its own clock reading,
#: later than the one before, so a hold or lease ending between them falls to the next.
_OWNED = "name = UNHEX(%(name)s) AND owner_token = %(owner_token)s"
RELEASE_OWNED = f"""
UPDATE {{table}} SET owner_token = NULL, released_at = {_NOW}, expires_at = hold_until
WHERE {_OWNED} AND (expires_at IS NULL OR expires_at > {_NOW}) AND hold_until IS NOT NULL AND hold_until > {_NOW};
UPDATE {{table}} SET owner_token = NULL, released_at = {_NOW}, expires_at = NULL
WHERE {_OWNED} AND (expires_at IS NULL OR expires_at > {_NOW});
UPDATE {{table}} SET owner_token = NULL, released_at = {_NOW}, expires_at = NULL WHERE {_OWNED}
"""
#: The usual acquire in one round trip (sent with its COMMIT): take the name's row if it is
#: free (no owner, no minimum hold ahead), then read back the clock reading and fencing token
#: it wrote (a transaction sees its own change). ``UTC_TIMESTAMP(6)`` is read once per
#: statement, so every use in the UPDATE is the same instant. Only two columns come back:
#: parsing a wide row's column descriptions was a third of the client's time per cycle. A
#: name that is held, expired or has no row matches nothing and is left to the steps.
TAKE_FREE = f"""
UPDATE {{table}} SET owner_token = %(owner_token)s,
    fencing_token = GREATEST(fencing_token + 1, TIMESTAMPDIFF(MICROSECOND, '1970-01-01', {_NOW}) DIV 1000),
    host = %(host)s, pid = %(pid)s, created_at = {_NOW}, expires_at = {_NOW} + INTERVAL %(lease_us)s MICROSECOND,
    metadata = %(metadata)s, hold_until = {_NOW} + INTERVAL %(hold_us)s MICROSECOND, released_at = NULL
WHERE name = UNHEX(%(name)s) AND owner_token IS NULL AND (hold_until IS NULL OR hold_until <= {_NOW});
SELECT created_at, fencing_token FROM {{table}} WHERE name = UNHEX(%(name)s)
"""
RENEW = "UPDATE {table} SET expires_at = %(expires_at)s WHERE name = UNHEX(%(name)s)"
#: Administrative: free a held name, or end a minimum hold early.
FORCE_FREE = """
UPDATE {table} SET owner_token = NULL, expires_at = NULL, hold_until = NULL, released_at = %(now)s
WHERE name = UNHEX(%(name)s)
"""
READ = f"SELECT {_ROW} FROM {{table}} WHERE name = UNHEX(%(name)s) AND {_LIVE}"
#: LEFT() on bytes compares the prefix literally: '%', '_' and '\\' are plain text (no LIKE).
LIST = f"""
SELECT {_ROW} FROM {{table}}
WHERE LEFT(name, LENGTH(UNHEX(%(prefix)s))) = UNHEX(%(prefix)s) AND {_LIVE}
ORDER BY name
"""
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
DELETE_IDLE = f"""
DELETE FROM {{table}}
WHERE (owner_token IS NULL AND COALESCE(released_at, created_at) < {_CUTOFF}
       AND (hold_until IS NULL OR hold_until < {_CUTOFF}))
   OR (owner_token IS NOT NULL AND expires_at < {_CUTOFF})
ORDER BY name LIMIT %(limit)s
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
