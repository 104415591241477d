-- Drop jobs the broker has accepted from a bridge's in-flight list: one LREM of each job's
-- exact bytes, count 1 (a duplicate payload elsewhere in the list stays). One script call
-- instead of a pipeline of LREMs halves the bridge's Redis commands per job.
--
-- KEYS[1]: the in-flight list; ARGV: the jobs. Returns how many were removed.
local removed = 0
for i = 1, #ARGV do
  removed = removed + redis.call('LREM', KEYS[1], 1, ARGV[i])
end
return removed
