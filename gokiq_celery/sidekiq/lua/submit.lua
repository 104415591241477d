-- One submission to gokiq-api, in one step (submissions.py): the client's rate limit, then
-- the reply remembered under the request's Idempotency-Key, then the jobs written as
-- Sidekiq's client writes them. A retried request finds the reply, never a second copy of its
-- jobs; a request over the rate writes nothing.
-- KEYS[1]: the client's token bucket, a hash {tokens, at}; KEYS[2]: the idempotency key
-- (unused when ARGV[4] is 0); KEYS[3]: `queues`; KEYS[4]: `schedule`; KEYS[5..]: the
-- `queue:<name>` lists written.
-- ARGV[1..3]: the client's rate (tokens/s), burst, and the cost (the number of jobs; 0: no
-- bucket); ARGV[4]: TTL of the idempotency key in ms (0: no key); ARGV[5]: the reply to
-- remember; then one triple per job: KEYS index of its queue list (0: the schedule set), its
-- queue name (or its score), its payload.
-- Returns {'written'}; {'replay', reply} when the key was already there (nothing written);
-- {'throttled', seconds until the tokens will be there} ('-1' when they never can: a cost
-- above the burst). The bucket uses Redis' own clock, so the API processes' clocks do not
-- matter, and it refills at `rate` up to `burst`.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
if cost > 0 then
  if cost > burst then
    return {'throttled', '-1'}
  end
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  local wait = 0
  if cost <= tokens then
    tokens = tokens - cost
  else
    wait = (cost - tokens) / rate
  end
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
  -- A full bucket is the same as no bucket: let an idle client's key go.
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
  if wait > 0 then
    return {'throttled', string.format('%.6f', wait)}
  end
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  local previous = redis.call('GET', KEYS[2])
  if previous then
    return {'replay', previous}
  end
end
for i = 6, #ARGV, 3 do
  local target = tonumber(ARGV[i])
  if target == 0 then
    redis.call('ZADD', KEYS[4], ARGV[i + 1], ARGV[i + 2])
  else
    redis.call('SADD', KEYS[3], ARGV[i + 1])
    redis.call('LPUSH', KEYS[target], ARGV[i + 2])
  end
end
if ttl > 0 then
  redis.call('SET', KEYS[2], ARGV[5], 'PX', ttl)
end
return {'written'}
