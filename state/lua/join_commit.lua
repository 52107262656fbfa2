-- Write one input partition's changed label-join state, fenced by an epoch.
--
-- KEYS[1]: the join hash (user -> encoded join state); KEYS[2]: its meta hash (epoch, pos:<topic>/<partition>).
-- ARGV[1]: the epoch the writer loaded or last wrote; ARGV[2]: JSON {"set": [user, value, ...], "del": [user, ...],
--          "pos": [field, offset, ...]}.
-- Returns the new epoch, or -1 when the stored epoch differs: another worker has written this partition since
-- (a rebalance moved it), so the caller must reload it before writing again.
local epoch = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
if epoch ~= tonumber(ARGV[1]) then return -1 end
local a = cjson.decode(ARGV[2])
local function chunked(cmd, key, list)  -- unpack() is bounded by Lua's stack: at most 2000 arguments a call
  for i = 1, #list, 2000 do redis.call(cmd, key, unpack(list, i, math.min(i + 1999, #list))) end
end
chunked('HSET', KEYS[1], a.set)
chunked('HDEL', KEYS[1], a.del)
redis.call('HSET', KEYS[2], 'epoch', epoch + 1, unpack(a.pos))
return epoch + 1
