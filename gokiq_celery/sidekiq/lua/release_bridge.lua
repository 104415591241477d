-- Give back everything one bridge holds: its in-flight jobs go to the tail of their queue
-- (what runs next, as Sidekiq's shutdown requeue does, bytes and enqueued_at unchanged) and the
-- jobs it was moving out of `schedule`/`retry` go back into their set, due now. Then the bridge
-- is forgotten. Used for a bridge whose heartbeat expired and for our own clean shutdown.
--
-- KEYS[1]: the set of bridge ids, KEYS[2]: Sidekiq's `queues` set,
-- KEYS[3]: the bridge's heartbeat, KEYS[4]: the set of queues the bridge fetched from
-- ARGV[1]: the bridge id, ARGV[2]: prefix of its in-flight lists (append the queue name),
-- ARGV[3]: prefix of Sidekiq queue lists, ARGV[4]: now (score for recovered set members),
-- ARGV[5]: only_if_dead ("1": do nothing if the heartbeat still exists),
-- ARGV[6..]: pairs of (sorted set key, moving list key)
-- Returns the number of jobs given back, or -1 if the bridge is alive.
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  return -1
end

local CHUNK = 1000 -- stay far below Lua's unpack() limit
local returned = 0

for _, queue in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local inflight = ARGV[2] .. queue
  local jobs = redis.call('LRANGE', inflight, 0, -1)
  -- The in-flight list's tail is the job fetched first; pushing from the head keeps that job
  -- last on the queue's tail, so the original order comes back.
  for i = 1, #jobs, CHUNK do
    redis.call('RPUSH', ARGV[3] .. queue, unpack(jobs, i, math.min(i + CHUNK - 1, #jobs)))
  end
  if #jobs > 0 then
    redis.call('SADD', KEYS[2], queue)
  end
  redis.call('DEL', inflight)
  returned = returned + #jobs
end

for i = 6, #ARGV, 2 do
  local set, moving = ARGV[i], ARGV[i + 1]
  for _, member in ipairs(redis.call('LRANGE', moving, 0, -1)) do
    redis.call('ZADD', set, ARGV[4], member)
    returned = returned + 1
  end
  redis.call('DEL', moving)
end

redis.call('DEL', KEYS[3], KEYS[4])
redis.call('SREM', KEYS[1], ARGV[1])
return returned
