-- Hand back the deliveries of worker processes that stopped giving signs of life (SIGKILL,
-- OOM, a lost host): their deadline becomes now, so a bridge publishes them again at once
-- instead of when the deadline set for a live worker passes (delivery_timeout, run_window).
--
-- A process's sign of life is its score in the workers zset: every claim and a beat every few
-- seconds set it to now. A process silent for longer than the TTL is dead. Handed back:
--   - every delivery it claimed (the holders hash names the claimer), and
--   - every unclaimed delivery published before it died: it may be in the dead process's
--     prefetch (the broker holds those unacked for its visibility timeout). One that was only
--     waiting in the broker is published again too; the copy still in the broker is stale
--     (its token is gone) and is skipped, so nothing runs twice.
--
-- KEYS[1]: the workers zset, KEYS[2]: the deadlines zset, KEYS[3]: the holders hash
-- ARGV[1]: now, ARGV[2]: the TTL, ARGV[3]: delivery_timeout
-- Returns {number of deliveries handed back, dead process, dead process, ...}.
local now, ttl, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local dead = redis.call('ZRANGE', KEYS[1], '-inf', now - ttl, 'BYSCORE', 'WITHSCORES')
if #dead == 0 then
  return {0}
end
local alive = {}
for _, holder in ipairs(redis.call('ZRANGE', KEYS[1], '(' .. (now - ttl), '+inf', 'BYSCORE')) do
  alive[holder] = true
end
local died_by = 0 -- the last moment any of the dead could still have taken a message
local result = {0}
for i = 1, #dead, 2 do
  died_by = math.max(died_by, tonumber(dead[i + 1]) + ttl)
  result[#result + 1] = dead[i]
  redis.call('ZREM', KEYS[1], dead[i])
end
local entries = redis.call('ZRANGE', KEYS[2], '(' .. now, '+inf', 'BYSCORE', 'WITHSCORES')
for i = 1, #entries, 2 do
  local token, deadline = entries[i], tonumber(entries[i + 1])
  local holder = redis.call('HGET', KEYS[3], token)
  local orphan
  if holder then
    orphan = not alive[holder]
  else
    orphan = deadline - window <= died_by
  end
  if orphan then
    redis.call('ZADD', KEYS[2], now, token)
    result[1] = result[1] + 1
  end
end
return result
