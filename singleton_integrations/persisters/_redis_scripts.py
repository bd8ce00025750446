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
    singleton:{NAME}:holds      sorted set: the holds taken with ``limit=N`` (N > 1), each scored by
                                its end (server ms; ``inf`` for none); the member is the owner
                                token, or NUL and the fencing token once released into its minimum
                                hold (so the old token can neither renew nor release it)
    singleton:{NAME}:holders    hash: each of those members' holder JSON; both expire at the last
                                hold's end, so they exist exactly while such a hold is live
    singleton:wake:HUB          pub/sub channel of one process's listener: "TOKEN\nLOCK KEY" when a
                                release frees a name whose queue's head waits there

A lock taken without ``limit`` (N = 1) lives in the lock key alone, as it always
has; only N > 1 uses the two holds keys. The fencing counter is the state hash's
for both, so the tokens of every hold of a name rise together. A hold is live
while its end is not past (``end >= now``), as a key with that expiry would be.

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
    "HOLDS_SUFFIX",
    "KEY_SUFFIXES",
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

# Reading the holds of ``limit=N`` (KEYS[5], KEYS[6]): for the scripts that may have to name them.
_LUA_LIST = r"""
-- Every live hold of the name: {the lock key's token or '', its holder JSON or '', then each
-- hold's JSON}, and the ms until the soonest of their ends (nil when none can end).
local function every_hold(now, token)
  local reply, soonest = {token or '', ''}, nil
  if token then
    reply[2] = redis.call('HGET', KEYS[2], 'holder') or ''
    local left = redis.call('PTTL', KEYS[1])
    if left >= 0 then soonest = left end
  end
  local live = redis.call('ZRANGEBYSCORE', KEYS[5], now, '+inf', 'WITHSCORES')
  if #live == 0 then return reply, soonest end
  local members = {}
  for i = 1, #live, 2 do
    members[#members + 1] = live[i]
    local left = tonumber(live[i + 1]) - now
    if left ~= math.huge and (not soonest or left < soonest) then soonest = left end
  end
  local holders = redis.call('HMGET', KEYS[6], unpack(members))
  for i = 1, #members do reply[#reply + 1] = holders[i] or '' end
  return reply, soonest
end
-- A refusal that names every live hold: {4, ms until the soonest end or -1, every_hold's list}.
local function refusal(now, token)
  local holds, soonest = every_hold(now, token)
  return {4, soonest or -1, unpack(holds)}
end
"""

# Changing the holds of ``limit=N``: for the scripts that release, renew or take one.
_LUA_HOLDS = r"""
-- Both holds keys expire at the last hold's end (a hold without one keeps them).
local function settle_holds()
  local last = redis.call('ZRANGE', KEYS[5], -1, -1, 'WITHSCORES')[2]
  if not last then
    redis.call('DEL', KEYS[6])
  elseif last == 'inf' then
    redis.call('PERSIST', KEYS[5])
    redis.call('PERSIST', KEYS[6])
  else
    redis.call('PEXPIREAT', KEYS[5], last)
    redis.call('PEXPIREAT', KEYS[6], last)
  end
end
-- Release (KEYS[5]) the hold of ARGV[1], if it has one: nil when it has none, else as
-- RELEASE_SCRIPT answers. ``main``: the lock key's token (a live N = 1 hold keeps the state).
local function release_hold(purge, main)
  local ends = redis.call('ZSCORE', KEYS[5], ARGV[1])
  if not ends then return nil end
  local now = now_ms()
  local holder = redis.call('HGET', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('HDEL', KEYS[6], ARGV[1])
  if tonumber(ends) < now then  -- it ended untaken: not held until now
    settle_holds()
    return 0
  end
  redis.call('HSET', KEYS[2], 'released', redis.sha1hex(ARGV[1]))
  local hold = hold_of(holder)
  if hold and hold > now then
    holder = string.gsub(holder, '^{"expires_at":[^,]*', '{"expires_at":' .. hold .. ',"released_at":' .. now, 1)
    local member = '\0' .. (string.match(holder, '"fencing_token":(%d+)') or ARGV[1])
    redis.call('ZADD', KEYS[5], hold, member)
    redis.call('HSET', KEYS[6], member, holder)
    settle_holds()
    return 2
  end
  settle_holds()
  if purge > 0 and not main and redis.call('EXISTS', KEYS[5]) == 0 then keep_state(purge) end
  return announce_free(now) or 1
end
-- The state outlives a hold ending ``life`` ms from now by the retention; ``left`` is its
-- PTTL before this script wrote it (-1: kept for good, as a hold without expiry wants).
local function outlive(left, life, purge)
  if life == 0 or purge == 0 then
    keep_state(0)
  elseif left == -2 or (left >= 0 and left < life + purge) then
    keep_state(life + purge)
  end
end
"""

#: KEYS: lock, state, queue, queue ends, holds, holders. ARGV: owner_token, ttl_ms (0 = no
#: expiry), the holder's other JSON members ('"owner_token":...,"host":...,"pid":...,"metadata":{...}'),
#: min_hold_ms (0 = none), purge_ms (0 = keep the state for good), queue_ms (0 = the
#: caller does not wait; else its place in the queue lasts that long), the wake channel of
#: the caller's process ('' for none: it hears the name's channel).
#: Returns the status "FENCE CREATED_MS" when it took a free name; {1, fence, created_ms,
#: expired holder JSON} when it replaced an expired lock; {0, holder token, holder JSON,
#: pttl} on conflict; {2, holder JSON} when this token already holds it (an attempt
#: retried after its reply was lost); {3, ms until the head's place ends} when the name is
#: free but an earlier waiter is queued for it; a ``refusal`` when the lock key is free but
#: holds taken with ``limit`` are live (one EXISTS tells, on the path that finds it free).
#: The key lives max(ttl, min_hold): a crashed holder frees the name at the later of its
#: lease's end and the hold's.
#: (The holds' functions are defined only inside the branch that needs them: each function
#: defined is a closure made on every call, which the N = 1 cycle would pay for nothing.)
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
local taken = false
if redis.call('EXISTS', KEYS[5]) == 0 or redis.call('ZCOUNT', KEYS[5], now_ms(), '+inf') == 0 then
  if life > 0 then
    taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', life)
  else
    taken = redis.call('SET', KEYS[1], ARGV[1], 'NX')
  end
end
if not taken then
  local token = redis.call('GET', KEYS[1])
  if token == ARGV[1] then
    dequeue(ARGV[1])
    return {2, redis.call('HGET', KEYS[2], 'holder')}
  end
  if queue > 0 then enqueue(ARGV[1], now_ms(), queue, ARGV[7]) end
  if not token then
""" + _LUA_LIST + r"""
    return refusal(now_ms(), false)
  end
  return {0, token, redis.call('HGET', KEYS[2], 'holder'), redis.call('PTTL', KEYS[1])}
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

#: ACQUIRE_SCRIPT for the common call: no place in the queue asked for (queue_ms 0) and no
#: ``limit``. KEYS as ACQUIRE_SCRIPT's. ARGV: owner_token, the key's life in ms
#: (max(ttl, min_hold); 0 = no expiry), the holder's other JSON members, min_hold_ms (0 =
#: none), purge_ms. Returns what ACQUIRE_SCRIPT would: the status "FENCE CREATED_MS", {1,
#: fence, created_ms, expired holder JSON} or the conflict {0, holder token, holder JSON,
#: pttl}; or nil, having written nothing, when ACQUIRE_SCRIPT must decide (holds taken
#: with ``limit`` may be live, or this token holds the name already). It defines no
#: functions: each would be a closure made on every call.
ACQUIRE_FREE_SCRIPT = r"""
if redis.call('EXISTS', KEYS[5]) == 1 then return false end
local life = tonumber(ARGV[2])
local taken
if life > 0 then
  taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
else
  taken = redis.call('SET', KEYS[1], ARGV[1], 'NX')
end
if not taken then
  local token = redis.call('GET', KEYS[1])
  if token == ARGV[1] then return false end
  return {0, token, redis.call('HGET', KEYS[2], 'holder'), redis.call('PTTL', KEYS[1])}
end
local state = redis.call('HMGET', KEYS[2], 'fence', 'holder')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fence = tonumber(state[1])
if fence and fence >= now then
  fence = fence + 1
else
  fence = now
end
local expires = 'null'
if life > 0 then expires = now + life end
local held = ''
if ARGV[4] ~= '0' then held = ',"hold_until":' .. (now + tonumber(ARGV[4])) end
redis.call('HSET', KEYS[2], 'fence', fence, 'holder',
  '{"expires_at":' .. expires .. ',"created_at":' .. now .. held .. ',"fencing_token":' .. fence .. ',' .. ARGV[3] .. '}')
local purge = tonumber(ARGV[5])
if life > 0 and purge > 0 then
  redis.call('PEXPIRE', KEYS[2], life + purge)
else
  redis.call('PERSIST', KEYS[2])
end
if state[2] and not string.find(state[2], '^{"expires_at":[^,]*,"released_at":') then
  return {1, fence, now, state[2]}
end
return {ok = fence .. ' ' .. now}
"""

#: ACQUIRE_SCRIPT's keys and arguments, then N (> 1): take one of the name's N holds. Every
#: live hold counts, whatever N its holder gave, the lock key's too; expired holds are
#: dropped first. A queued caller takes only from among the first (N - live) live places.
#: Returns {5, fence, created_ms, an expired hold's JSON or '', the queue head it woke or
#: ''} when it took one (waking the head when holds are still free after it); {2, holder
#: JSON} when this token holds one already; {3, ms until a place ahead ends} when the free
#: holds go to earlier waiters; a ``refusal`` naming every live hold when all N are held.
ACQUIRE_LIMIT_SCRIPT = _LUA_HEAD + _LUA_LIST + _LUA_HOLDS + r"""
local ttl = tonumber(ARGV[2])
local hold = tonumber(ARGV[4])
local purge = tonumber(ARGV[5])
local queue = tonumber(ARGV[6])
local limit = tonumber(ARGV[8])
local life = ttl
if ttl > 0 and hold > ttl then life = hold end
local now = now_ms()
local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. now)
local expired = ''
if #gone > 0 then
  local holders = redis.call('HMGET', KEYS[6], unpack(gone))
  for i = #gone, 1, -1 do
    if string.byte(gone[i], 1) ~= 0 and holders[i] then expired = holders[i] end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. now)
  redis.call('HDEL', KEYS[6], unpack(gone))
end
if redis.call('ZSCORE', KEYS[5], ARGV[1]) then
  if queue > 0 then dequeue(ARGV[1]) end
  return {2, redis.call('HGET', KEYS[6], ARGV[1])}
end
local token = redis.call('GET', KEYS[1])
if token == ARGV[1] then
  if queue > 0 then dequeue(ARGV[1]) end
  return {2, redis.call('HGET', KEYS[2], 'holder')}
end
local live = redis.call('ZCARD', KEYS[5])
if token then live = live + 1 end
if live >= limit then
  if queue > 0 then enqueue(ARGV[1], now, queue, ARGV[7]) end
  return refusal(now, token)
end
if queue > 0 then
  -- The free holds go to the first (limit - live) live places; the caller's counts, and a
  -- caller without one comes after them all. Expired places met on the way are dropped.
  local index, ahead, soonest = 0, 0, nil
  for _ = 1, 64 + limit do
    local place = redis.call('ZRANGE', KEYS[3], index, index)[1]
    if not place or place == ARGV[1] then break end
    local ends = tonumber(string.match(redis.call('HGET', KEYS[4], place) or '', '^(%d+) '))
    if ends and ends > now then
      ahead, index = ahead + 1, index + 1
      if not soonest or ends < soonest then soonest = ends end
      if ahead >= limit - live then
        enqueue(ARGV[1], now, queue, ARGV[7])
        return {3, soonest - now}
      end
    else
      redis.call('ZREM', KEYS[3], place)
      redis.call('HDEL', KEYS[4], place)
    end
  end
  dequeue(ARGV[1])
end
local fence = tonumber(redis.call('HGET', KEYS[2], 'fence'))
if fence and fence >= now then
  fence = fence + 1
else
  fence = now
end
local ends, expires = 'inf', 'null'
if life > 0 then
  ends = now + life
  expires = ends
end
local held = ''
if hold > 0 then held = ',"hold_until":' .. (now + hold) end
local kept, lasting = redis.call('PTTL', KEYS[2]), redis.call('PTTL', KEYS[5])
redis.call('HSET', KEYS[2], 'fence', fence)
redis.call('ZADD', KEYS[5], ends, ARGV[1])
redis.call('HSET', KEYS[6], ARGV[1],
  '{"expires_at":' .. expires .. ',"created_at":' .. now .. held .. ',"fencing_token":' .. fence .. ',' .. ARGV[3] .. '}')
if life == 0 then
  redis.call('PERSIST', KEYS[5])
  redis.call('PERSIST', KEYS[6])
elseif lasting == -2 or (lasting >= 0 and lasting < life) then
  redis.call('PEXPIREAT', KEYS[5], ends)
  redis.call('PEXPIREAT', KEYS[6], ends)
end
outlive(kept, life, purge)
local woke = ''
if live + 1 < limit and redis.call('EXISTS', KEYS[3]) == 1 then woke = announce_free(now) or '' end
return {5, fence, now, expired, woke}
"""

#: KEYS: lock, state, queue, queue ends, holds, holders. ARGV: owner_token, purge_ms. Returns
#: 1 when the token held the lock and the name is free now (the queue's head token instead,
#: when a waiter is queued: the release wakes it first), 2 when it was released into its
#: minimum hold (the name stays held until hold_until, and nobody is told yet), 0 when it
#: was not ours. The token's hold under ``limit`` is released alike, looked for only when
#: the lock key is not the token's. A repeat of a release that succeeded (its reply was
#: lost) answers 1 again. A lease of this token that ran out untaken is cleared from the
#: state hash (so the next holder is not told it expired), but the answer is 0: it was
#: not held until now.
#: The common release (ours, no minimum hold, nobody queued) runs inline; the functions
#: are defined only in the branches that need them, so that path makes no closures.
RELEASE_SCRIPT = r"""
local token = redis.call('GET', KEYS[1])
local purge = tonumber(ARGV[2])
if token ~= ARGV[1] then
""" + _LUA_HEAD + _LUA_HOLDS + r"""
  local freed = release_hold(purge, token)
  if freed then return freed end
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
local now = nil  -- the clock only matters for a minimum hold, or a queue (read there)
if holder and string.find(holder, ',"hold_until":', 1, true) then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local hold = tonumber(string.match(holder, '^{"expires_at":[^,]*,"created_at":%d+,"hold_until":(%d+)'))
  if hold and hold > now then
    holder = string.gsub(holder, '^{"expires_at":[^,]*', '{"expires_at":' .. hold .. ',"released_at":' .. now, 1)
    redis.call('SET', KEYS[1], '\0released', 'PX', hold - now)
    redis.call('HSET', KEYS[2], 'holder', holder, 'released', redis.sha1hex(ARGV[1]))
    if purge > 0 then
      redis.call('PEXPIRE', KEYS[2], hold - now + purge)
    else
      redis.call('PERSIST', KEYS[2])
    end
    return 2
  end
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], 'holder')
redis.call('HSET', KEYS[2], 'released', redis.sha1hex(ARGV[1]))
if purge > 0 then redis.call('PEXPIRE', KEYS[2], purge) end
if redis.call('EXISTS', KEYS[3]) == 1 then
""" + _LUA_HEAD + r"""
  return announce_free(now) or 1
end
redis.call('PUBLISH', KEYS[1] .. ':released', '')
return 1
"""

#: KEYS: lock, state, queue, queue ends (unused), holds, holders. ARGV: owner_token, ttl_ms
#: (0 = no expiry), purge_ms. Returns the holder JSON or nil. The lease is never shortened
#: below the minimum hold. The token's hold under ``limit`` is renewed alike, looked for
#: only when the lock key is not the token's.
RENEW_SCRIPT = _LUA_HEAD + r"""
local ttl = tonumber(ARGV[2])
local purge = tonumber(ARGV[3])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
""" + _LUA_HOLDS + r"""
  local ends = redis.call('ZSCORE', KEYS[5], ARGV[1])
  if not ends then return false end
  local now = now_ms()
  local holder = redis.call('HGET', KEYS[6], ARGV[1])
  if tonumber(ends) < now or not holder then  -- it ended: an expired hold is never renewed
    redis.call('ZREM', KEYS[5], ARGV[1])
    redis.call('HDEL', KEYS[6], ARGV[1])
    settle_holds()
    return false
  end
  local kept = redis.call('PTTL', KEYS[2])
  local expires, life = 'null', 0
  if ttl > 0 then
    expires = now + ttl
    local hold = hold_of(holder)
    if hold and hold > expires then expires = hold end
    life = expires - now
  end
  holder = string.gsub(holder, '^{"expires_at":[^,]*', '{"expires_at":' .. expires, 1)
  if life > 0 then
    redis.call('ZADD', KEYS[5], 'XX', expires, ARGV[1])
  else
    redis.call('ZADD', KEYS[5], 'XX', 'inf', ARGV[1])
  end
  redis.call('HSET', KEYS[6], ARGV[1], holder)
  settle_holds()
  outlive(kept, life, purge)
  return holder
end
local holder = redis.call('HGET', KEYS[2], 'holder')
if not holder then
  return false
end
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

#: KEYS: lock, state, queue, queue ends (unused), holds, holders. Returns {token, holder JSON}
#: of the lock key's live holder; when the key is free, ``every_hold``'s list of the holds
#: under ``limit`` (its first member '') if one is live; else nil.
GET_SCRIPT = _LUA_HEAD + _LUA_LIST + r"""
local token = redis.call('GET', KEYS[1])
if token then
  return {token, redis.call('HGET', KEYS[2], 'holder')}
end
if redis.call('EXISTS', KEYS[5]) == 0 then
  return false
end
local holds = every_hold(now_ms(), false)
if #holds == 2 then return false end
return holds
"""

#: GET_SCRIPT's keys. Returns ``every_hold``'s list: every live hold of the name.
HOLDERS_SCRIPT = _LUA_HEAD + _LUA_LIST + r"""
return (every_hold(now_ms(), redis.call('GET', KEYS[1])))
"""

#: KEYS: lock, state, queue, queue ends, holds, holders. ARGV: purge_ms. Removes every live
#: hold of the name: the lock key's (a released one in its minimum hold included) and those
#: under ``limit``. Returns {the queue's head token or '', then ``every_hold``'s list of the
#: holds it removed}, or nil when none was live.
FORCE_RELEASE_SCRIPT = _LUA_HEAD + _LUA_LIST + r"""
local token = redis.call('GET', KEYS[1])
local holds = every_hold(now_ms(), token)
if not token and #holds == 2 then
  return false
end
if token then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], 'holder')
end
redis.call('DEL', KEYS[5], KEYS[6])
local purge = tonumber(ARGV[1])
if purge > 0 then keep_state(purge) end
return {announce_free(now_ms()) or '', unpack(holds)}
"""

#: KEYS: lock, state, queue, queue ends (and the holds', unused). ARGV: owner_token. Drops a
#: waiter's place; when it was the head and the lock key is free, the next head is woken
#: (under ``limit`` it may find a free hold). Returns that head or ''.
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
    "acquire_free": ACQUIRE_FREE_SCRIPT,
    "acquire_limit": ACQUIRE_LIMIT_SCRIPT,
    "release": RELEASE_SCRIPT,
    "renew": RENEW_SCRIPT,
    "get": GET_SCRIPT,
    "holders": HOLDERS_SCRIPT,
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


#: Every script's keys for a lock key: the key itself, then these suffixes (KEYS[2] to KEYS[6]).
KEY_SUFFIXES = ("", ":state", ":queue", ":queue:ends", ":holds", ":holders")
#: The holds key's suffix, after the closing brace of the hash tag.
HOLDS_SUFFIX = "}:holds"


def script_keys(lock: str) -> tuple[str, ...]:
    """The keys every script gets for the lock key ``lock``, in ``KEY_SUFFIXES``' order."""
    return tuple(lock + suffix for suffix in KEY_SUFFIXES)


def channel_pattern(prefix: str) -> str:
    """The PSUBSCRIBE pattern for every release channel under ``prefix``."""
    return f"{glob_escape(prefix)}\\{{*\\}}:released"


def name_from_channel(prefix: str, channel: str) -> str | None:
    """The lock name a release channel belongs to, or None for another store's channel."""
    head = prefix + "{"
    if channel.startswith(head) and channel.endswith(_CHANNEL_SUFFIX) and len(channel) >= len(head) + len(_CHANNEL_SUFFIX):
        return channel[len(head):-len(_CHANNEL_SUFFIX)]
    return None
