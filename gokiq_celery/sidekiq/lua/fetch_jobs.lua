-- Reliable fetch: move up to N jobs from the first non-empty queue into its in-flight list.
--
-- KEYS: queue:<q1>, in-flight list of q1, queue:<q2>, in-flight list of q2, ... (in fetch order)
-- ARGV[1]: N, the most jobs to take
-- Returns {index of the queue (1-based pair number), job, job, ...}, or {} when all are empty.
--
-- RPOP takes from the tail, which is what Sidekiq's BRPOP runs next; LPUSH into the in-flight
-- list keeps the bytes exactly as read. Both happen in one script, so a job is always in one
-- of the two lists.
local limit = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  local jobs = redis.call('RPOP', KEYS[i], limit)
  if jobs then
    redis.call('LPUSH', KEYS[i + 1], unpack(jobs))
    local result = {(i + 1) / 2}
    for _, job in ipairs(jobs) do
      result[#result + 1] = job
    end
    return result
  end
end
return {}
