-- The broker's Redis restarted (its run_id is new): make due now every unclaimed delivery
-- published before the restart, so a bridge publishes it again at once.
--
-- Why: kombu's fetch (BRPOP) is not atomic with the reply. A Redis that exits right after it
-- ran a BRPOP (its AOF has the pop) never sends the message to any worker, so it is in no
-- queue and in no `unacked` record; only the ledger knows the job, and would publish it again
-- only at its deadline (delivery_timeout). The ledger cannot tell that message from one still
-- waiting in the broker, so every unclaimed delivery of before the restart goes out again; a
-- copy still in the broker is stale (its token is gone once the overdue path re-tokens it)
-- and skipped by the claim, so nothing runs twice. Claimed deliveries are left alone: a live
-- worker runs them (a dead one's are recover_workers.lua's).
--
-- The run_id last seen is kept in KEYS[1], so with many bridges, or a bridge started after the
-- restart, the restart is handled once: the first to see the new run_id records it and makes
-- the deliveries due. A run_id seen for the first time (no record) is only recorded.
--
-- An unclaimed delivery was published when its deadline says: deadline - delivery_timeout
-- (one handed over but not yet published has an earlier deadline still, and is included).
--
-- KEYS[1]: the broker run_id record, KEYS[2]: the deadlines zset, KEYS[3]: the holders hash
-- ARGV[1]: the broker's run_id, ARGV[2]: now, ARGV[3]: the restart (published at or before it:
-- due), ARGV[4]: delivery_timeout
-- Returns the number of deliveries made due, or -1 when the run_id is not news.
local seen = redis.call('GET', KEYS[1])
if seen == ARGV[1] then
  return -1
end
redis.call('SET', KEYS[1], ARGV[1])
if not seen then
  return -1
end
local latest = tonumber(ARGV[3]) + tonumber(ARGV[4]) -- the last deadline of one published by then
local made_due = 0
for _, token in ipairs(redis.call('ZRANGE', KEYS[2], '(' .. ARGV[2], latest, 'BYSCORE')) do
  if redis.call('HEXISTS', KEYS[3], token) == 0 then
    redis.call('ZADD', KEYS[2], ARGV[2], token)
    made_due = made_due + 1
  end
end
return made_due
