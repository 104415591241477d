-- Take ledger entries whose deadline has passed and give each a fresh token (and deadline),
-- so exactly one bridge publishes each again and the old message, if it ever shows up, is
-- stale.
--
-- KEYS[1]: the ledger hash, KEYS[2]: the deadlines zset, KEYS[3]: the holders hash
-- ARGV[1]: now, ARGV[2]: the new deadline, ARGV[3..]: fresh tokens (one per entry taken, at most)
-- Returns {new token, entry, new token, entry, ...}.
local due = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, #ARGV - 2)
local taken = {}
for i, old in ipairs(due) do
  local entry = redis.call('HGET', KEYS[1], old)
  redis.call('ZREM', KEYS[2], old)
  redis.call('HDEL', KEYS[1], old)
  redis.call('HDEL', KEYS[3], old)
  if entry then
    local fresh = ARGV[i + 2]
    redis.call('HSET', KEYS[1], fresh, entry)
    redis.call('ZADD', KEYS[2], ARGV[2], fresh)
    taken[#taken + 1] = fresh
    taken[#taken + 1] = entry
  end
end
return taken
