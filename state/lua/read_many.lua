-- Many entities' state in one call: for each (hash, log) key pair, the hash's fields and the log entries
-- scored at or after ARGV[1]. Read-only. Replaces two pipelined commands per entity, whose per-command
-- cost in the Python client was ten times Redis's (the scorer re-reads every live room each second).
local out = {}
for i = 1, #KEYS, 2 do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('ZRANGEBYSCORE', KEYS[i + 1], ARGV[1], '+inf', 'WITHSCORES')
end
return out
