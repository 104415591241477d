-- Scheduler: take up to N due members out of a sorted set (`schedule` or `retry`) and keep
-- them in this bridge's durable "moving" list until Python has pushed them onto their queue.
--
-- KEYS[1]: the sorted set, KEYS[2]: this bridge's moving list for that set
-- ARGV[1]: now (float epoch seconds), ARGV[2]: N
-- Returns the members taken, bytes unchanged.
--
-- The payload is never decoded here: Lua's cjson would re-encode floats such as created_at with
-- 14 significant digits. ZREM returning 1 is what makes several bridges safe together: only the
-- one whose ZREM removed the member takes it.
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
local taken = {}
for _, member in ipairs(due) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    redis.call('LPUSH', KEYS[2], member)
    taken[#taken + 1] = member
  end
end
return taken
