-- windows.lua: checks and reserves ALL of one API key's limits atomically, all or
-- nothing: request, token and spend windows, and a concurrency lease. Called with
-- EVALSHA by src/limits/redis.rs (see src/limits/script.rs for the key names and
-- the reply parser; lua/settle.lua later adjusts what this reserved).
--
-- KEYS[i]   one hash per window, named by the caller: a4f:{<key_id>}:<kind>:<period>,
--           e.g. a4f:{Zx81kQ2mP0aB}:tk:1m; then, when a lease is asked for, the
--           key's lease ZSET a4f:{<key_id>}:cc last. Every key of a call shares the
--           hash tag {<key_id>}, so the script works on Redis Cluster (one slot per
--           API key). No key name is built here.
-- ARGV[1]   deadline, Unix microseconds in Redis time; 0 = none. A call that runs
--           after it was given up by its caller: nothing is counted.
-- ARGV[2]   the lease's member (the request id); '' when no lease is asked for.
-- ARGV[3..] three per key i, in KEYS order:
--           ARGV[3i]   span: a window length in ms (aligned to the Unix epoch),
--                      'month' (the calendar month in UTC), or 'lease',
--           ARGV[3i+1] limit (for 'lease': max_concurrent),
--           ARGV[3i+2] cost: 1 for a request window, tokens, or nano-USD (integers,
--                      exact in Lua's doubles); for 'lease': the lease TTL in ms.
--
-- Each window hash holds  s = start of the window it counts (Unix ms), n = amount
-- counted. A hash whose s is not the current window's start counts as empty. Every
-- write sets PEXPIRE to the window's end, so nothing throttles beyond its window.
-- A lease is a ZSET member scored with its expiry (Redis ms); expired members are
-- removed before counting, so a dead node's leases free themselves.
--
-- Reply: {status, now_us, start_1, n_1, ..., start_k, n_k}
--   status  1  admitted: every n_i includes this cost (for the lease: live leases,
--                        this one included)
--           0  refused:  nothing counted; n_i is the amount already used, and a
--                        window with n_i + cost_i > limit_i (a lease set with
--                        n_i + 1 > limit_i) is one that refused
--          -1  deadline passed: nothing counted, no windows in the reply
--   start_i lets settle.lua adjust exactly the window a reservation was counted
--   in: it changes n only while s still equals start_i. 0 for the lease.
--
-- Time comes from Redis (TIME), never from the calling node.

if #ARGV ~= 2 + 3 * #KEYS then
  return redis.error_reply('ERR windows.lua: expected 2 + 3 arguments per key')
end

-- Redis < 5 replicates scripts verbatim and refuses writes after TIME unless told
-- to replicate effects; later versions always do.
if redis.replicate_commands then
  redis.replicate_commands()
end

local DAY = 86400000

-- First day (days since 1970-01-01) of the month containing day `days`: Howard
-- Hinnant's civil_from_days, as in src/limits/policy.rs.
local function month_first(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  return days - (d - 1)
end

-- Start and end (Unix ms) of the window of `span` containing `now`.
local function bounds(span, now)
  if span == 'month' then
    local first = month_first(math.floor(now / DAY))
    -- Every month has at most 31 days: first + 31 lies in the next month.
    return first * DAY, month_first(first + 31) * DAY
  end
  local period = tonumber(span)
  local start = now - (now % period)
  return start, start + period
end

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)

local deadline = tonumber(ARGV[1])
if deadline > 0 and now_us > deadline then
  return {-1, now_us}
end

local member = ARGV[2]
local reply = {1, now_us}
local fresh = {}
local ends = {}
for i = 1, #KEYS do
  local span = ARGV[3 * i]
  local limit = tonumber(ARGV[3 * i + 1])
  local cost = tonumber(ARGV[3 * i + 2])
  if span == 'lease' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local live = redis.call('ZCARD', KEYS[i])
    if live + 1 > limit then
      reply[1] = 0
    end
    reply[2 * i + 1] = 0
    reply[2 * i + 2] = live
  else
    local start, finish = bounds(span, now)
    ends[i] = finish
    local held = redis.call('HMGET', KEYS[i], 's', 'n')
    local used = 0
    if tonumber(held[1]) == start then
      used = tonumber(held[2]) or 0
    else
      fresh[i] = true
    end
    if used + cost > limit then
      reply[1] = 0
    end
    reply[2 * i + 1] = start
    reply[2 * i + 2] = used
  end
end

if reply[1] == 1 then
  for i = 1, #KEYS do
    if ARGV[3 * i] == 'lease' then
      local ttl = tonumber(ARGV[3 * i + 2])
      redis.call('ZADD', KEYS[i], now + ttl, member)
      redis.call('PEXPIRE', KEYS[i], ttl)
      reply[2 * i + 2] = reply[2 * i + 2] + 1
    else
      local start = reply[2 * i + 1]
      if fresh[i] then
        redis.call('HSET', KEYS[i], 's', string.format('%d', start), 'n', 0)
      end
      reply[2 * i + 2] = redis.call('HINCRBY', KEYS[i], 'n', ARGV[3 * i + 2])
      redis.call('PEXPIRE', KEYS[i], math.max(1, ends[i] - now))
    end
  end
end

return reply
