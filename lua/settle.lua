-- settle.lua: adjusts one request's reservations (made by windows.lua) to what it
-- really used, and releases its concurrency lease. Called with EVALSHA by
-- src/limits/redis.rs after the response ended, off the request path.
--
-- KEYS[i]   the window hashes to adjust (a4f:{<key_id>}:<kind>:<period>), then,
--           when ARGV[2] is not '', the key's lease ZSET a4f:{<key_id>}:cc last.
-- ARGV[1]   deadline, Unix microseconds in Redis time; 0 = none. A call that runs
--           after its caller gave up changes nothing (the caller counted it failed).
-- ARGV[2]   the lease member to release, or ''.
-- ARGV[3..] two per window i: ARGV[2i+1] the start (Unix ms) the reservation was
--           counted in, ARGV[2i+2] the delta, actual - reserved (negative refunds).
--
-- A window that rolled over since (its s differs, or it expired) is left alone: the
-- reservation went away with its window. A count never goes below 0.
--
-- Reply: {status, now_us, adjusted}: status 1 done, -1 deadline passed.

local windows = (#ARGV - 2) / 2
local lease = ARGV[2] ~= ''
if windows ~= math.floor(windows) or #KEYS ~= windows + (lease and 1 or 0) then
  return redis.error_reply('ERR settle.lua: expected 2 + 2 arguments per window key')
end

if redis.replicate_commands then
  redis.replicate_commands()
end

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

local deadline = tonumber(ARGV[1])
if deadline > 0 and now_us > deadline then
  return {-1, now_us, 0}
end

local adjusted = 0
for i = 1, windows do
  local held = redis.call('HMGET', KEYS[i], 's', 'n')
  if held[1] and tonumber(held[1]) == tonumber(ARGV[2 * i + 1]) then
    local n = tonumber(held[2]) or 0
    local delta = tonumber(ARGV[2 * i + 2])
    if n + delta < 0 then
      delta = -n
    end
    if delta ~= 0 then
      redis.call('HINCRBY', KEYS[i], 'n', string.format('%d', delta))
    end
    adjusted = adjusted + 1
  end
end

if lease then
  redis.call('ZREM', KEYS[#KEYS], ARGV[2])
end

return {1, now_us, adjusted}
