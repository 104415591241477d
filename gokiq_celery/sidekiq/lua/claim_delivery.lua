-- A worker starts running a delivery: if its token is still in the ledger, push the token's
-- deadline out to cover the run and say yes; otherwise the message is stale (its job was
-- settled, or re-published under a new token after this message was presumed lost): say no.
--
-- KEYS[1]: the ledger hash, KEYS[2]: the deadlines zset; ARGV[1]: token, ARGV[2]: new deadline
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
