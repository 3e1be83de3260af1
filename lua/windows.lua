-- windows.lua: checks and counts ALL of one API key's fixed windows atomically,
-- all or nothing. Called with EVALSHA by src/limits/redis.rs (see
-- src/limits/script.rs for the key names and the reply parser).
--
-- KEYS[i]   one hash per window, named by the caller: a4f:{<key_id>}:<kind>:<period>,
--           e.g. a4f:{Zx81kQ2mP0aB}:rq:1m. Every key of a call shares the hash tag
--           {<key_id>}, so the script works on Redis Cluster (one slot per API key).
--           No key name is built here.
-- ARGV[1]   deadline, Unix microseconds in Redis time; 0 = none. A call that runs
--           after it was given up by its caller: nothing is counted.
-- ARGV[2..] three per window i, in KEYS order:
--           ARGV[3i-1] period in ms (windows are aligned to the Unix epoch),
--           ARGV[3i]   limit,
--           ARGV[3i+1] cost: 1 for a request; a token or micro-USD amount later.
--
-- Each hash holds  s = start of the window it counts (Unix ms), n = amount counted.
-- A hash whose s is not the current window's start counts as empty. Every write
-- sets PEXPIRE to the window's end, so nothing throttles beyond its window.
--
-- Reply: {status, now_us, start_1, n_1, ..., start_k, n_k}
--   status  1  admitted: every n_i includes this cost
--           0  refused:  nothing counted; n_i is the amount already used, and a
--                        window with n_i + cost_i > limit_i is one that refused
--          -1  deadline passed: nothing counted, no windows in the reply
--   start_i lets a later settle or refund script adjust exactly the window a
--   reservation was counted in: it must change n only while s still equals start_i.
--
-- Time comes from Redis (TIME), never from the calling node.

if #ARGV ~= 1 + 3 * #KEYS then
  return redis.error_reply('ERR windows.lua: expected 1 + 3 arguments per key')
end

-- Redis < 5 replicates scripts verbatim and refuses writes after TIME unless told
-- to replicate effects; later versions always do.
if redis.replicate_commands then
  redis.replicate_commands()
end

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)

local deadline = tonumber(ARGV[1])
if deadline > 0 and now_us > deadline then
  return {-1, now_us}
end

local reply = {1, now_us}
local fresh = {}
for i = 1, #KEYS do
  local period = tonumber(ARGV[3 * i - 1])
  local limit = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local start = now - (now % period)
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

if reply[1] == 1 then
  for i = 1, #KEYS do
    local period = tonumber(ARGV[3 * i - 1])
    local start = reply[2 * i + 1]
    if fresh[i] then
      redis.call('HSET', KEYS[i], 's', string.format('%d', start), 'n', 0)
    end
    reply[2 * i + 2] = redis.call('HINCRBY', KEYS[i], 'n', ARGV[3 * i + 1])
    redis.call('PEXPIRE', KEYS[i], math.max(1, start + period - now))
  end
end

return reply
