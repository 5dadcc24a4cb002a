-- Portcullis admission: apply reconciliation deltas to counters charged by reserve.lua.
-- KEYS[i]: the counter of item i (all of one client: one hash slot).
-- ARGV: 4 per item: kind ('s' or 'p', as in reserve.lua), window length in seconds ('s') or
-- period end in unix seconds ('p'), the bucket second the reservation charged, delta.
-- Returns {now_ms, now_s, then per item the delta actually applied}.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = { now_ms, now_s }
for i = 1, #KEYS do
  local a = 4 * (i - 1)
  local kind, p = ARGV[a + 1], tonumber(ARGV[a + 2])
  local field, b, d = ARGV[a + 3], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local applied = 0
  if kind == 's' then
    if b >= now_s - p then
      -- Still inside the window: correct the bucket itself, never below zero.
      local cur = tonumber(redis.call('HGET', KEYS[i], field) or '0') or 0
      local new = math.max(cur + d, 0)
      applied = new - cur
      if new == 0 then
        if cur ~= 0 then redis.call('HDEL', KEYS[i], field) end
      elseif applied ~= 0 then
        redis.call('HSET', KEYS[i], field, new)
        if applied > 0 then redis.call('EXPIRE', KEYS[i], p + 2) end
      end
    elseif d > 0 then
      -- Aged out: an extra charge lands in the current bucket; a refund has nothing left to undo.
      redis.call('HINCRBY', KEYS[i], now_s, ARGV[a + 4])
      redis.call('EXPIRE', KEYS[i], p + 2)
      applied = d
    end
  else
    local cur = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
    local new = math.max(cur + d, 0)
    applied = new - cur
    if applied ~= 0 then
      redis.call('INCRBY', KEYS[i], applied)
      redis.call('EXPIREAT', KEYS[i], p + 86400)
    end
  end
  out[#out + 1] = applied
end
return out
