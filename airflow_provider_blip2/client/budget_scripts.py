"""
The Lua scripts of the shared budget (:mod:`~.shared_budget`), run atomically in Redis.

Redis's own clock (``TIME``) orders every window, so the machines' clocks need not agree.
"""

# KEYS: the request windows (one per scope), then the buckets' theoretical arrival times (one per
# scope), the probe's lock, the rate-limit-shape note, the account's send times. ARGV: token,
# window, open_ttl, mode (auto, window, bucket), then one limit per scope. '0' when the windows have
# room; past a full window what the shape allows (see rate_shape): the wait, or '-1' (the probe,
# only while the requests sent within the window and answered fill it) or '-2' (the bucket admits
# it). A granted token counts in every window as an open request, and its send time is kept.
RESERVE_REQUEST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, open_ttl, mode = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local n = #ARGV - 4
local sent = KEYS[2 * n + 3]
redis.call('ZREMRANGEBYSCORE', sent, '-inf', now - window)
local wait, bucket, open_1 = 0, 0, 0
for i = 1, n do
  local key, limit = KEYS[i], tonumber(ARGV[4 + i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local surplus = redis.call('ZCARD', key) - limit
  if surplus >= 0 then
    local entry = redis.call('ZRANGE', key, surplus, surplus, 'WITHSCORES')
    local until_free = tonumber(entry[2]) + window - now
    if until_free > open_ttl then until_free = 0.05 end
    if until_free > wait then wait = until_free end
  end
  local open = redis.call('ZCOUNT', key, '(' .. now, '+inf')
  if i == 1 then open_1 = open end
  local tat = math.max(tonumber(redis.call('GET', KEYS[n + i]) or '0'), now)
  local until_admitted = tat + (open + 2 - limit) * window / limit - now
  if until_admitted > bucket then bucket = until_admitted end
end
local granted = '0'
if wait > 0 then
  if mode == 'auto' then mode = redis.call('GET', KEYS[2 * n + 2]) or 'auto' end
  if mode ~= 'auto' and mode ~= 'bucket' then return tostring(wait) end
  if bucket > 0 then return tostring(math.max(0.001, math.min(wait, bucket))) end
  granted = '-2'
  if mode == 'auto' then
    if redis.call('ZCARD', sent) - open_1 < tonumber(ARGV[5]) then return tostring(math.min(wait, 1)) end
    if not redis.call('SET', KEYS[2 * n + 1], ARGV[1], 'NX', 'PX', math.ceil(open_ttl * 1000)) then
      return tostring(math.min(wait, 1))
    end
    granted = '-1'
  end
end
for i = 1, n do
  redis.call('ZADD', KEYS[i], now + open_ttl, ARGV[1])
  redis.call('EXPIRE', KEYS[i], math.ceil(window + open_ttl) + 1)
end
redis.call('ZADD', sent, now, ARGV[1])
redis.call('EXPIRE', sent, math.ceil(window) + 1)
return granted
"""

# KEYS: the request windows, then the buckets' theoretical arrival times, the probe's lock, the
# rate-limit-shape note. ARGV: token, window, '1' to free the probe's lock, the lesson ('' for
# none), its ttl in ms, then one limit per scope. The request counts for a window from now, and in
# each bucket from now; the lesson is noted before the probe's lock is freed, so no second probe
# can start between the two.
REQUEST_DONE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[2])
local n = #ARGV - 5
for i = 1, n do
  redis.call('ZADD', KEYS[i], 'XX', now, ARGV[1])
  local tat = math.max(tonumber(redis.call('GET', KEYS[n + i]) or '0'), now) + window / tonumber(ARGV[5 + i])
  redis.call('SET', KEYS[n + i], tostring(tat), 'PX', math.ceil(window * 2000))
end
if ARGV[4] ~= '' then redis.call('SET', KEYS[2 * n + 2], ARGV[4], 'PX', tonumber(ARGV[5])) end
if ARGV[3] == '1' then redis.call('DEL', KEYS[2 * n + 1]) end
return 1
"""

# KEYS: the in-flight sets. ARGV: token, ttl, then one limit per key. 1 when granted, else 0.
RESERVE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[2 + i]) then return 0 end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[2]), ARGV[1])
  redis.call('EXPIRE', key, math.ceil(tonumber(ARGV[2])) + 1)
end
return 1
"""

# KEYS: the in-flight sets. ARGV: token, prediction id ('' when the create failed), ttl.
SLOT_CREATED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[1])
  if ARGV[2] ~= '' then redis.call('ZADD', key, now + tonumber(ARGV[3]), ARGV[2]) end
end
return 1
"""

# KEYS: the in-flight sets. ARGV: prediction id.
SLOT_FREED = """
for _, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[1]) end
return 1
"""

# KEYS: the in-flight sets (the first counts). Predictions counted now.
IN_FLIGHT = """
local t = redis.call('TIME')
return redis.call('ZCOUNT', KEYS[1], '(' .. (tonumber(t[1]) + tonumber(t[2]) / 1000000), '+inf')
"""

# KEYS: the notes' prefix. ARGV: name. The note's value, or nil.
RECALL_NOTE = """
return redis.call('GET', KEYS[1] .. ARGV[1])
"""

# KEYS: the notes' prefix. ARGV: name, value, ttl in ms, '1' to write only when absent, '1' to delete.
# 1 when written (or deleted), 0 when a note was already there.
REMEMBER_NOTE = """
local key = KEYS[1] .. ARGV[1]
if ARGV[5] == '1' then redis.call('DEL', key) return 1 end
if ARGV[4] == '1' then
  if redis.call('SET', key, ARGV[2], 'PX', tonumber(ARGV[3]), 'NX') then return 1 end
  return 0
end
redis.call('SET', key, ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
"""
