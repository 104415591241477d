-- The worker's Redis broker (gokiq_celery/kombu_redis.py, its Channel): in one call,
-- write the unacked record of the message kombu's BRPOP just delivered, remove the records of
-- acked messages, and pop up to N more messages, each recorded as kombu records a delivery.
-- The keys are kombu's (its channel's `unacked_index` zset and `unacked` hash) and the broker
-- queue lists in the order kombu's BRPOP names them; Python passes them in, from kombu.
--
-- KEYS[1]: kombu's unacked index (zset tag -> delivery time), KEYS[2]: kombu's unacked hash
--          (tag -> JSON [payload, exchange, routing key]), KEYS[3..]: the queue lists
-- ARGV[1]: now (float epoch seconds), ARGV[2]: N, how many more to pop at most,
-- ARGV[3]: the delivered message's tag ('' for none), ARGV[4]: its record,
-- ARGV[5..]: tags of acked messages whose records go.
-- Returns {list, tag, payload, list, tag, payload, ...}: the messages popped, payloads unchanged
-- (the tag as read here, so the caller can give a message back without parsing it).
--
-- No message leaves its list without its record: each one is read (LINDEX), recorded, and
-- only then popped. A record Redis refuses to write stops the popping and leaves that message
-- in its list, the ones popped before still returned (pcall, not call, for their writes);
-- Redis refuses a script for memory (OOM) only before its first write, so that is the whole
-- call failing with nothing written. The lists are emptied in BRPOP's key order (priorities,
-- then the queue cycle): a batch may come from one queue where kombu would alternate, the
-- next BRPOP's cycle moves on. A payload that is not
-- a kombu message (no tag) stays where it is, and the popping stops: kombu's BRPOP gets it
-- next and handles it as it would. The payload is never re-encoded, only read for its tag
-- and delivery info: Lua's cjson would re-encode floats with 14 significant digits.
local index, unacked = KEYS[1], KEYS[2]
local now, want = ARGV[1], tonumber(ARGV[2])

for i = 5, #ARGV do
  redis.call('ZREM', index, ARGV[i])
  redis.call('HDEL', unacked, ARGV[i])
end
if ARGV[3] ~= '' then
  redis.call('ZADD', index, now, ARGV[3])
  redis.call('HSET', unacked, ARGV[3], ARGV[4])
end

local popped = {}
local k = 3
while want > 0 and k <= #KEYS do
  local payload = redis.call('LINDEX', KEYS[k], -1)
  if not payload then
    k = k + 1
  else
    local ok, message = pcall(cjson.decode, payload)
    local props = ok and type(message) == 'table' and message['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(info) ~= 'table' or type(tag) ~= 'string' then
      break
    end
    local record = '[' .. payload .. ',' .. cjson.encode(info['exchange']) .. ','
      .. cjson.encode(info['routing_key']) .. ']'
    local written = redis.pcall('ZADD', index, now, tag)
    if type(written) == 'table' and written.err then
      break
    end
    written = redis.pcall('HSET', unacked, tag, record)
    if type(written) == 'table' and written.err then
      redis.call('ZREM', index, tag)
      break
    end
    redis.call('RPOP', KEYS[k])
    popped[#popped + 1] = KEYS[k]
    popped[#popped + 1] = tag
    popped[#popped + 1] = payload
    want = want - 1
  end
end
return popped
