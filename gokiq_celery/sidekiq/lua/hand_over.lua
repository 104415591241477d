-- The bridge hands a fetched batch over to the delivery ledger: each job it still holds gets
-- its token entry and deadline and leaves the bridge's in-flight list (its exact bytes, once),
-- atomically. A job no longer in the list was given back to its queue by another bridge (this
-- one stalled past its heartbeat): it is not entered, so it is not published twice. A token
-- already in the ledger was entered by an earlier try of this same call (its reply was lost).
--
-- KEYS[1]: the ledger hash, KEYS[2]: the deadlines zset, KEYS[3]: the in-flight list
-- ARGV[1]: the deadline, ARGV[2]: the Sidekiq queue, ARGV[3..]: pairs of (token, job bytes) in
-- the order fetched. An entry is "<byte length of queue>:<queue><job>" (ledger._entry).
-- Returns the positions (1-based) of the pairs that were not entered.
local n = (#ARGV - 2) / 2
local function job(i) return ARGV[2 * i + 2] end

-- The usual case: the list holds exactly this batch (fetch_jobs pushed it, so it reads back
-- in reverse), and one DEL replaces n scans of LREM.
local held = redis.call('LRANGE', KEYS[3], 0, -1)
local whole = #held == n
for i = 1, whole and n or 0 do
  if held[n + 1 - i] ~= job(i) then
    whole = false
    break
  end
end

local prefix = string.len(ARGV[2]) .. ':' .. ARGV[2]
local entries, deadlines, missing = {}, {}, {}
for i = 1, n do
  local token = ARGV[2 * i + 1]
  if whole or redis.call('LREM', KEYS[3], 1, job(i)) == 1 then
    entries[#entries + 1] = token
    entries[#entries + 1] = prefix .. job(i)
    deadlines[#deadlines + 1] = ARGV[1]
    deadlines[#deadlines + 1] = token
  elseif redis.call('HEXISTS', KEYS[1], token) == 0 then
    missing[#missing + 1] = i
  end
end
if whole then
  redis.call('DEL', KEYS[3])
end
if #entries > 0 then
  redis.call('HSET', KEYS[1], unpack(entries))
  redis.call('ZADD', KEYS[2], unpack(deadlines))
end
return missing
