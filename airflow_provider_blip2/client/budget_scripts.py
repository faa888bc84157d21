"""
The Lua scripts of the shared budget (:mod:`~.shared_budget`), run atomically in Redis.

Redis's own clock (``TIME``) orders every window, so the machines' clocks need not agree.
"""

# KEYS: the request windows (one per scope). ARGV: token, window, open_ttl, then one limit per key.
# Grants only if every window has room; then the token counts in all of them as an open request.
RESERVE_REQUEST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, open_ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local wait = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local surplus = redis.call('ZCARD', key) - tonumber(ARGV[3 + i])
  if surplus >= 0 then
    local entry = redis.call('ZRANGE', key, surplus, surplus, 'WITHSCORES')
    local until_free = tonumber(entry[2]) + window - now
    if until_free > open_ttl then until_free = 0.05 end
    if until_free > wait then wait = until_free end
  end
end
if wait > 0 then return tostring(wait) end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + open_ttl, ARGV[1])
  redis.call('EXPIRE', key, math.ceil(window + open_ttl) + 1)
end
return '0'
"""

# KEYS: the request windows. ARGV: token. The request counts for a window from now.
REQUEST_DONE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, key in ipairs(KEYS) do redis.call('ZADD', key, 'XX', now, ARGV[1]) end
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
