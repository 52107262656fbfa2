-- Apply one group of merged state changes atomically, at most once per input position.
--
-- KEYS[1]   : the position hash ("pos:<topic>/<partition>" -> last applied offset); KEYS[2..] named by index.
-- ARGV[1]   : JSON {
--   "src": [[name, lo, hi], ...]   input partitions this call covers, with the offsets of its events
--   "t":   [[src, hash, ttl, incr, set, log, entries, floor], ...]
--            one merged target: HINCRBYFLOAT the flat [field, delta, ...] pairs in incr, HSET the flat pairs in
--            set, EXPIRE; then ZADD the flat [score, member, ...] entries to the log and trim it below floor
--   "q":   [[src, key, ttl, cap, entries], ...]   history entries: ZADD, keep the newest cap, EXPIRE
-- }
-- src index 0 means "not positioned" (always applied). Numbers travel as strings: Lua would print a double
-- with 14 digits when passing it to Redis.
--
-- Returns {1, skipped src indices...}: done; the listed input partitions had been applied before (a replay)
-- and were skipped. When a partition's range starts at or below its recorded offset but ends above it,
-- nothing is done and {-1, src, recorded} tells the caller to resend only the events after that offset.
local a = cjson.decode(ARGV[1])
local src = a.src
local skip = {}
if #src > 0 then
  local fields = {}
  for i, s in ipairs(src) do fields[i] = 'pos:' .. s[1] end
  local marks = redis.call('HMGET', KEYS[1], unpack(fields))
  for i, s in ipairs(src) do
    local m = tonumber(marks[i])
    if m then
      if m >= tonumber(s[3]) then
        skip[i] = true
      elseif m >= tonumber(s[2]) then
        return {-1, i, marks[i]}
      end
    end
  end
end
for _, t in ipairs(a.t) do
  if not skip[t[1]] then
    local h, ttl, inc = KEYS[t[2]], tonumber(t[3]), t[4]
    for j = 1, #inc, 2 do redis.call('HINCRBYFLOAT', h, inc[j], inc[j + 1]) end
    if #t[5] > 0 then redis.call('HSET', h, unpack(t[5])) end
    if ttl > 0 then redis.call('EXPIRE', h, ttl) end
    if t[6] > 0 and #t[7] > 0 then
      local log = KEYS[t[6]]
      redis.call('ZADD', log, unpack(t[7]))
      redis.call('ZREMRANGEBYSCORE', log, '-inf', '(' .. t[8])
      if ttl > 0 then redis.call('EXPIRE', log, ttl) end
    end
  end
end
for _, q in ipairs(a.q) do
  if not skip[q[1]] then
    local k = KEYS[q[2]]
    redis.call('ZADD', k, unpack(q[5]))
    redis.call('ZREMRANGEBYRANK', k, 0, -(tonumber(q[4]) + 1))
    redis.call('EXPIRE', k, q[3])
  end
end
local out, marks = {1}, {}
for i, s in ipairs(src) do
  if skip[i] then
    out[#out + 1] = i
  else
    marks[#marks + 1] = 'pos:' .. s[1]
    marks[#marks + 1] = s[3]
  end
end
if #marks > 0 then redis.call('HSET', KEYS[1], unpack(marks)) end
return out
