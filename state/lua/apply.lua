-- Apply one event's state changes atomically and at most once.
--
-- KEYS[1]   : the event's dedup marker; the rest are hashes, logs and sequences named by index in ARGV.
-- ARGV[1]   : JSON {
--   "dedup_ttl": s, "ts": ms, "id": event id, "keep_ms": how long increment logs keep entries,
--   "targets": [{"h": key index, "log": key index or 0, "ttl": s, "incr": {field: delta}, "set": {field: value}}],
--   "seq": {"key": key index, "member": "...", "cap": n, "ttl": s} (optional)
-- }
-- Returns 1 when applied, 0 when the event id was seen before (a replay): replays change nothing.
--
-- Each increment is also logged in a sorted set scored by event time, so a reader can compute a counter
-- "as of" an earlier time by subtracting the logged increments at or after it (see state/store.py).
local a = cjson.decode(ARGV[1])
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', a.dedup_ttl) then
  return 0
end
local ts = a.ts
for _, t in ipairs(a.targets) do
  local h = KEYS[t.h]
  local parts = {}
  for f, d in pairs(t.incr) do
    redis.call('HINCRBYFLOAT', h, f, d)
    parts[#parts + 1] = f .. ':' .. d
  end
  for f, v in pairs(t.set) do
    redis.call('HSET', h, f, v)
  end
  if t.ttl > 0 then redis.call('EXPIRE', h, t.ttl) end
  if t.log > 0 and #parts > 0 then
    local log = KEYS[t.log]
    redis.call('ZADD', log, ts, a.id .. '|' .. table.concat(parts, ','))
    redis.call('ZREMRANGEBYSCORE', log, '-inf', '(' .. (ts - a.keep_ms))
    if t.ttl > 0 then redis.call('EXPIRE', log, t.ttl) end
  end
end
local s = a.seq
if s then
  redis.call('ZADD', KEYS[s.key], ts, s.member)
  redis.call('ZREMRANGEBYRANK', KEYS[s.key], 0, -(s.cap + 1))
  redis.call('EXPIRE', KEYS[s.key], s.ttl)
end
return 1
