-- The bridge hands a fetched batch over to the delivery ledger: each job gets its token entry
-- and deadline, and leaves the bridge's in-flight list (its exact bytes, once), atomically.
--
-- KEYS[1]: the ledger hash, KEYS[2]: the deadlines zset, KEYS[3]: the in-flight list
-- ARGV[1]: the deadline, ARGV[2]: the Sidekiq queue, ARGV[3..]: pairs of (token, job bytes)
-- An entry is "<byte length of queue>:<queue><job>" (see store._delivery_entry).
local prefix = string.len(ARGV[2]) .. ':' .. ARGV[2]
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], prefix .. ARGV[i + 1])
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[i])
  redis.call('LREM', KEYS[3], 1, ARGV[i + 1])
end
return (#ARGV - 2) / 2
