-- Writes submitted jobs as Sidekiq's client does, and remembers the reply under the
-- request's Idempotency-Key, in one step: a retried request finds the reply, never a second
-- copy of its jobs (submissions.py).
-- KEYS[1]: the idempotency key (unused when ARGV[1] is 0), KEYS[2]: `queues`,
-- KEYS[3]: `schedule`, KEYS[4..]: the `queue:<name>` lists written.
-- ARGV[1]: TTL of the idempotency key in ms (0: no key), ARGV[2]: the reply to remember,
-- then one triple per job: KEYS index of its queue list (0: the schedule set), its queue name
-- (or its score), its payload.
-- Returns the remembered reply when the key was already there (nothing written), else false.
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  local previous = redis.call('GET', KEYS[1])
  if previous then
    return previous
  end
end
for i = 3, #ARGV, 3 do
  local target = tonumber(ARGV[i])
  if target == 0 then
    redis.call('ZADD', KEYS[3], ARGV[i + 1], ARGV[i + 2])
  else
    redis.call('SADD', KEYS[2], ARGV[i + 1])
    redis.call('LPUSH', KEYS[target], ARGV[i + 2])
  end
end
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
end
return false
