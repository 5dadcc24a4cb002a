-- Portcullis admission: check every item of one request and charge all of them only if all fit.
-- KEYS[i]: the counter of item i (all of one client: one hash slot).
-- ARGV: 4 per item: kind ('s' sliding window of 1-second buckets in a HASH, 'p' period counter),
-- window length in seconds ('s') or period end in unix seconds ('p'), limit, amount.
-- Returns {admitted (1/0), now_ms, now_s, refusing item (1-based, 0 when admitted),
-- retry_after_ms, then per item: remaining, reset_ms}. All values stay below 2^53.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local used, reset, stale = {}, {}, {}
local refused, wait = 0, -1
for i = 1, n do
  local a = 4 * (i - 1)
  local kind, p = ARGV[a + 1], tonumber(ARGV[a + 2])
  local limit, amount = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local u, w = 0, 0
  if kind == 's' then
    local oldest = now_s - p
    local fields = redis.call('HGETALL', KEYS[i])
    local live, old = {}, {}
    for j = 1, #fields, 2 do
      local b, v = tonumber(fields[j]), tonumber(fields[j + 1])
      if b == nil or v == nil or b < oldest then
        old[#old + 1] = fields[j]
      elseif v > 0 then
        -- A bucket newer than now (the Redis clock stepped back) still counts: the safe side.
        live[#live + 1] = { b, v }
        u = u + v
      end
    end
    stale[i] = old
    table.sort(live, function(x, y) return x[1] < y[1] end)
    reset[i] = 0
    if #live > 0 then reset[i] = (live[#live][1] + p + 1) * 1000 - now_ms end
    if u + amount > limit then
      -- Oldest bucket first: the first one whose ageing out makes room gives the wait.
      local left = u
      w = reset[i]
      for _, bv in ipairs(live) do
        left = left - bv[2]
        if left + amount <= limit then
          w = (bv[1] + p + 1) * 1000 - now_ms
          break
        end
      end
    end
  else
    u = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
    reset[i] = math.max(p * 1000 - now_ms, 0)
    w = reset[i]
  end
  used[i] = u
  if u + amount > limit and w > wait then
    refused, wait = i, w
  end
end
local out = { 0, now_ms, now_s, refused, wait }
if refused == 0 then
  out[1], out[5] = 1, 0
  for i = 1, n do
    local a = 4 * (i - 1)
    local kind, p, amount = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 4]
    if kind == 's' then
      if #stale[i] > 0 then redis.call('HDEL', KEYS[i], unpack(stale[i])) end
      if tonumber(amount) > 0 then
        redis.call('HINCRBY', KEYS[i], now_s, amount)
        redis.call('EXPIRE', KEYS[i], p + 2)
        reset[i] = (now_s + p + 1) * 1000 - now_ms
      end
    elseif tonumber(amount) > 0 then
      redis.call('INCRBY', KEYS[i], amount)
      redis.call('EXPIREAT', KEYS[i], p + 86400)
    end
    used[i] = used[i] + tonumber(amount)
  end
end
for i = 1, n do
  local limit = tonumber(ARGV[4 * (i - 1) + 3])
  out[#out + 1] = math.max(limit - used[i], 0)
  out[#out + 1] = reset[i]
end
return out
