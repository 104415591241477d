-- A worker starts running a delivery: if its token is still in the ledger, push the token's
-- deadline out to cover the run and say yes; otherwise the message is stale (its job was
-- settled, or re-published under a new token after this message was presumed lost): say no.
-- The claimer is noted as the delivery's holder, and the claim is a sign of its life: if it
-- falls silent, recover_workers.lua hands the delivery back long before its deadline.
--
-- KEYS[1]: the ledger hash, KEYS[2]: the deadlines zset, KEYS[3]: the holders hash,
-- KEYS[4]: the workers zset; ARGV[1]: token, ARGV[2]: new deadline, ARGV[3]: the claiming
-- process, ARGV[4]: now
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
return 1
