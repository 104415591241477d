-- A token bucket per API client, shared by every gokiq-api process (rate_limit.py).
-- KEYS[1]: the client's bucket, a hash {tokens, at}. ARGV: rate (tokens/s), burst, cost.
-- Returns {1, "0"} when `cost` tokens were taken, else {0, seconds until they will be there}
-- ("-1" when they never can: a cost above the burst). Redis' own clock, so the API processes'
-- clocks do not matter.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if cost > burst then
  return {0, '-1'}
end
local taken = 0
local wait = 0
if cost <= tokens then
  tokens = tokens - cost
  taken = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
-- A full bucket is the same as no bucket: let an idle client's key go.
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {taken, string.format('%.6f', wait)}
