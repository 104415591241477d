-- A Celery countdown retry fires: the retry waits in Sidekiq's `retry` set (the one record of
-- it), and whoever removes its exact member first runs it: this timer, the bridge's poller
-- (take_due.lua), or the Web UI (Retry Now, Delete, Kill). If the member is still there, it
-- leaves the set and the message's token enters the delivery ledger with this worker as its
-- holder (as claim_delivery.lua does), atomically; otherwise the message is stale.
-- A token already held by this worker is an earlier try of this same call (its reply was lost).
--
-- KEYS[1]: the retry set, KEYS[2]: the ledger hash, KEYS[3]: the deadlines zset,
-- KEYS[4]: the holders hash, KEYS[5]: the workers zset
-- ARGV[1]: the member (the job's exact bytes), ARGV[2]: token, ARGV[3]: the Sidekiq queue,
-- ARGV[4]: the deadline, ARGV[5]: the claiming process, ARGV[6]: now
if redis.call('HGET', KEYS[4], ARGV[2]) == ARGV[5] then
  return 1
end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
-- The ledger's entry form: "<byte length of queue>:<queue><job>" (ledger._entry).
redis.call('HSET', KEYS[2], ARGV[2], string.len(ARGV[3]) .. ':' .. ARGV[3] .. ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
return 1
