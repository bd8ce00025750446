"""The Redis lock scripts and key names (no I/O); ``_redis_steps`` reads their replies.

The sync and the async persister send these same scripts; only the sending is
written twice. Layout for a lock ``NAME`` under the key prefix (default
``singleton:``); the braces are a hash tag, so both keys of a name share one
cluster slot::

    singleton:{NAME}            string: the holder's owner token with a PX lease (none for ttl=None);
                                RELEASED_MARKER while a released lock serves its minimum hold
    singleton:{NAME}:state      hash: ``fence`` (the fencing counter), ``holder`` (the latest holder
                                as JSON, removed once the name is free) and ``released`` (SHA-1 of
                                the last cleanly released owner token, so a retried release is
                                recognised); it expires ``purge_after`` after the name became free
    singleton:{NAME}:released   pub/sub channel told of every release that frees the name; the
                                message is the owner token first in the waiter queue ('' for none)
    singleton:{NAME}:queue      sorted set: waiting owner tokens, scored in arrival order
    singleton:{NAME}:queue:ends hash: each queued token's place: "END WAKE", its end (server ms) and
                                the wake channel of the waiter's process; both queue keys expire
                                once the last place would have ended
    singleton:wake:HUB          pub/sub channel of one process's listener: "TOKEN\nLOCK KEY" when a
                                release frees a name whose queue's head waits there

The holder JSON always starts ``{"expires_at":E,`` (then ``"released_at":R,`` once
released into a minimum hold), then ``"created_at":C`` and, with a minimum hold,
``"hold_until":H``: the scripts read and rewrite those members with anchored
patterns, never by parsing JSON. Times are the server's ``TIME`` in milliseconds.

Fencing tokens are ``max(previous + 1, server now in ms)``: they keep rising when
the state hash is gone (purged, evicted, a restart without persistence, a
failover to a replica that had not received the last writes), as long as the
server clocks do not go back.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "RELEASED_MARKER",
    "SCRIPTS",
    "SHAS",
    "channel_pattern",
    "glob_escape",
    "lock_key",
    "name_from_channel",
    "script_keys",
    "wake_channel",
    "wake_message",
]

#: The lock key's value while a released lock serves its minimum hold: no owner token
#: can equal it (it starts with a NUL), so the old token can neither renew nor release.
RELEASED_MARKER = "\x00released"

# A Lua pattern prefix shared by the scripts: the lease's end and, when set, the hold's.
_LUA_HEAD = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function hold_of(holder)
  if not holder then return nil end
  return tonumber(string.match(holder, '^{"expires_at":[^,]*,"created_at":%d+,"hold_until":(%d+)'))
end
-- The waiter queue (KEYS[3], KEYS[4]): it orders waiters; exclusivity never depends on it.
-- ``now`` may be nil: the clock is read only when a place is queued.
local function queue_head(now)
  for _ = 1, 64 do
    local first = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    if not first then return nil end
    now = now or now_ms()
    local place = redis.call('HGET', KEYS[4], first)
    local ends, wake = string.match(place or '', '^(%d+) (.*)$')
    ends = tonumber(ends)
    if ends and ends > now then return first, ends, wake end
    redis.call('ZREM', KEYS[3], first)
    redis.call('HDEL', KEYS[4], first)
  end
  return nil
end
local function enqueue(token, now, span, wake)
  if not redis.call('ZSCORE', KEYS[3], token) then
    local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')[2]
    redis.call('ZADD', KEYS[3], (tonumber(last) or 0) + 1, token)
  end
  redis.call('HSET', KEYS[4], token, (now + span) .. ' ' .. wake)
  for i = 3, 4 do
    if redis.call('PTTL', KEYS[i]) < span then redis.call('PEXPIRE', KEYS[i], span) end
  end
end
local function dequeue(token)
  if redis.call('ZREM', KEYS[3], token) == 1 then redis.call('HDEL', KEYS[4], token) end
end
-- The head's process hears its own channel; every release is also told to the name's channel,
-- which only processes with an unqueued watcher (or older clients) subscribe to.
local function announce_free(now)
  local head, _, wake = queue_head(now)
  if head and wake ~= '' then
    redis.call('PUBLISH', wake, head .. '\n' .. KEYS[1])
  end
  redis.call('PUBLISH', KEYS[1] .. ':released', head or '')
  return head
end
local function keep_state(ms)
  if ms > 0 then
    redis.call('PEXPIRE', KEYS[2], ms)
  else
    redis.call('PERSIST', KEYS[2])
  end
end
"""

#: KEYS: lock, state, queue, queue ends. ARGV: owner_token, ttl_ms (0 = no expiry), the
#: holder's other JSON members ('"owner_token":...,"host":...,"pid":...,"metadata":{...}'),
#: min_hold_ms (0 = none), purge_ms (0 = keep the state for good), queue_ms (0 = the
#: caller does not wait; else its place in the queue lasts that long), the wake channel of
#: the caller's process ('' for none: it hears the name's channel).
#: Returns the status "FENCE CREATED_MS" when it took a free name; {1, fence, created_ms,
#: expired holder JSON} when it replaced an expired lock; {0, holder token, holder JSON,
#: pttl} on conflict; {2, holder JSON} when this token already holds it (an attempt
#: retried after its reply was lost); {3, ms until the head's place ends} when the name is
#: free but an earlier waiter is queued for it. The key lives max(ttl, min_hold): a crashed
#: holder frees the name at the later of its lease's end and the hold's.
ACQUIRE_SCRIPT = _LUA_HEAD + r"""
local ttl = tonumber(ARGV[2])
local hold = tonumber(ARGV[4])
local purge = tonumber(ARGV[5])
local queue = tonumber(ARGV[6])
local life = ttl
if ttl > 0 and hold > ttl then life = hold end
if queue > 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  local now = now_ms()
  local head, ends = queue_head(now)
  if head and head ~= ARGV[1] then
    enqueue(ARGV[1], now, queue, ARGV[7])
    return {3, ends - now}
  end
end
local taken
if life > 0 then
  taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', life)
else
  taken = redis.call('SET', KEYS[1], ARGV[1], 'NX')
end
if not taken then
  local token = redis.call('GET', KEYS[1])
  local holder = redis.call('HGET', KEYS[2], 'holder')
  if token == ARGV[1] then
    dequeue(ARGV[1])
    return {2, holder}
  end
  if queue > 0 then enqueue(ARGV[1], now_ms(), queue, ARGV[7]) end
  return {0, token, holder, redis.call('PTTL', KEYS[1])}
end
if queue > 0 then dequeue(ARGV[1]) end
local state = redis.call('HMGET', KEYS[2], 'fence', 'holder')
local now = now_ms()
local fence = tonumber(state[1])
if fence and fence >= now then
  fence = fence + 1
else
  fence = now
end
local expires = 'null'
if life > 0 then expires = now + life end
local held = ''
if hold > 0 then held = ',"hold_until":' .. (now + hold) end
redis.call('HSET', KEYS[2], 'fence', fence, 'holder',
  '{"expires_at":' .. expires .. ',"created_at":' .. now .. held .. ',"fencing_token":' .. fence .. ',' .. ARGV[3] .. '}')
if life > 0 and purge > 0 then keep_state(life + purge) else keep_state(0) end
if state[2] and not string.find(state[2], '^{"expires_at":[^,]*,"released_at":') then
  return {1, fence, now, state[2]}
end
return {ok = fence .. ' ' .. now}
"""

#: KEYS: lock, state, queue, queue ends. ARGV: owner_token, purge_ms. Returns 1 when the
#: token held the lock and the name is free now (the queue's head token instead, when a
#: waiter is queued: the release wakes it first), 2 when it was released into its minimum hold (the
#: name stays held until hold_until, and nobody is told yet), 0 when it was not ours.
#: A repeat of a release that succeeded (its reply was lost) answers 1 again. A lease
#: of this token that ran out untaken is cleared from the state hash (so the next
#: holder is not told it expired), but the answer is 0: it was not held until now.
RELEASE_SCRIPT = _LUA_HEAD + r"""
local token = redis.call('GET', KEYS[1])
local purge = tonumber(ARGV[2])
if token ~= ARGV[1] then
  if redis.call('HGET', KEYS[2], 'released') == redis.sha1hex(ARGV[1]) then
    return 1
  end
  if not token then
    local holder = redis.call('HGET', KEYS[2], 'holder')
    if holder and string.find(holder, '"owner_token":"' .. ARGV[1] .. '"', 1, true) then
      redis.call('HDEL', KEYS[2], 'holder')
    end
  end
  return 0
end
local holder = redis.call('HGET', KEYS[2], 'holder')
local hold = hold_of(holder)
local now = hold and now_ms()  -- the clock only matters for a minimum hold, or a queue (read there)
if hold and hold > now then
  holder = string.gsub(holder, '^{"expires_at":[^,]*', '{"expires_at":' .. hold .. ',"released_at":' .. now, 1)
  redis.call('SET', KEYS[1], '\0released', 'PX', hold - now)
  redis.call('HSET', KEYS[2], 'holder', holder, 'released', redis.sha1hex(ARGV[1]))
  if purge > 0 then keep_state(hold - now + purge) else keep_state(0) end
  return 2
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], 'holder')
redis.call('HSET', KEYS[2], 'released', redis.sha1hex(ARGV[1]))
if purge > 0 then keep_state(purge) end
return announce_free(now) or 1
"""

#: KEYS: lock, state (and the queue's two, unused). ARGV: owner_token, ttl_ms (0 = no expiry), purge_ms. Returns the
#: holder JSON or nil. The lease is never shortened below the minimum hold.
RENEW_SCRIPT = _LUA_HEAD + r"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
local holder = redis.call('HGET', KEYS[2], 'holder')
if not holder then
  return false
end
local ttl = tonumber(ARGV[2])
local purge = tonumber(ARGV[3])
local expires = 'null'
if ttl > 0 then
  local now = now_ms()
  local ends = now + ttl
  local hold = hold_of(holder)
  if hold and hold > ends then ends = hold end
  expires = ends
  redis.call('PEXPIRE', KEYS[1], ends - now)
  if purge > 0 then keep_state(ends - now + purge) else keep_state(0) end
else
  redis.call('PERSIST', KEYS[1])
  keep_state(0)
end
holder = string.gsub(holder, '^{"expires_at":[^,]*', '{"expires_at":' .. expires, 1)
redis.call('HSET', KEYS[2], 'holder', holder)
return holder
"""

#: KEYS: lock, state (and the queue's two, unused). Returns {token, holder JSON} of the live holder, or nil.
GET_SCRIPT = r"""
local token = redis.call('GET', KEYS[1])
if not token then
  return false
end
return {token, redis.call('HGET', KEYS[2], 'holder')}
"""

#: KEYS: lock, state, queue, queue ends. ARGV: purge_ms. Returns {token, holder JSON,
#: the queue's head token or ''} of the holder it removed (a released one in its minimum
#: hold included), or nil.
FORCE_RELEASE_SCRIPT = _LUA_HEAD + r"""
local token = redis.call('GET', KEYS[1])
if not token then
  return false
end
local holder = redis.call('HGET', KEYS[2], 'holder')
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], 'holder')
local purge = tonumber(ARGV[1])
if purge > 0 then keep_state(purge) end
return {token, holder, announce_free(now_ms()) or ''}
"""

#: KEYS: lock, state, queue, queue ends. ARGV: owner_token. Drops a waiter's place; when it
#: was the head and the name is free, the next head is woken. Returns that head or ''.
LEAVE_QUEUE_SCRIPT = _LUA_HEAD + r"""
local now = now_ms()
local head = queue_head(now)
dequeue(ARGV[1])
if head == ARGV[1] and redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  return announce_free(now) or ''
end
return ''
"""

SCRIPTS: dict[str, str] = {
    "acquire": ACQUIRE_SCRIPT,
    "release": RELEASE_SCRIPT,
    "renew": RENEW_SCRIPT,
    "get": GET_SCRIPT,
    "force_release": FORCE_RELEASE_SCRIPT,
    "leave_queue": LEAVE_QUEUE_SCRIPT,
}
SHAS: dict[str, str] = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in SCRIPTS.items()}

_GLOB_SPECIAL = re.compile(r"([\\*?\[\]^\-{}])")
_CHANNEL_SUFFIX = "}:released"


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH or PSUBSCRIBE pattern."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def lock_key(prefix: str, name: str) -> str:
    return f"{prefix}{{{name}}}"


def wake_channel(prefix: str, hub_id: str) -> str:
    """The channel one process's listener hears releases naming its queued waiters on."""
    return f"{prefix}wake:{hub_id}"


def wake_message(prefix: str, data: str) -> tuple[str, str] | None:
    """(lock name, head token) from a wake channel's message, or None for a malformed one."""
    token, _, key = data.partition("\n")
    head = prefix + "{"
    if not token or not key.startswith(head) or not key.endswith("}"):
        return None
    return key[len(head):-1], token


def script_keys(lock: str) -> tuple[int, str, str, str, str]:
    """EVAL's key count and keys for the lock key ``lock``: every script gets the same four."""
    return (4, lock, lock + ":state", lock + ":queue", lock + ":queue:ends")


def channel_pattern(prefix: str) -> str:
    """The PSUBSCRIBE pattern for every release channel under ``prefix``."""
    return f"{glob_escape(prefix)}\\{{*\\}}:released"


def name_from_channel(prefix: str, channel: str) -> str | None:
    """The lock name a release channel belongs to, or None for another store's channel."""
    head = prefix + "{"
    if channel.startswith(head) and channel.endswith(_CHANNEL_SUFFIX) and len(channel) >= len(head) + len(_CHANNEL_SUFFIX):
        return channel[len(head):-len(_CHANNEL_SUFFIX)]
    return None
