-- Apply one call's merged state changes atomically, at most once per input position.
--
-- KEYS[1]   : the position hash ("pos:<topic>/<partition>" -> last applied offset); KEYS[2..] named by index.
-- ARGV[1]   : JSON {
--   "src": [[name, lo, hi], ...]   input partitions this call covers, with the offsets of its events
--   "u":   1 when the call also carries unpositioned changes (always applied)
--   "t":   [[hash, ttl, incr, set, log, entries, floor], ...]
--            one key's merged changes: HINCRBYFLOAT the flat [field, delta, ...] pairs in incr, HSET the flat
--            pairs in set, EXPIRE; then ZADD the flat [score, member, ...] entries to the log, trim it below floor
--            (floor "": not this time)
--   "q":   [[key, ttl, cap, entries], ...]   history entries: ZADD, keep the newest cap, EXPIRE
-- }
-- Numbers travel as strings: Lua would print a double with 14 digits when passing it to Redis.
--
-- Returns {1}: applied. {0, i...}: every input partition had been applied before (a replay): nothing done.
-- {-2, i...}: the listed partitions had been applied before but others not: nothing done, resend without them.
-- {-1, i, recorded}: partition i's range straddles its recorded offset: nothing done, resend only its events
-- after the recorded offset. (Increments are merged across partitions, so a call applies all or nothing.)
local a = cjson.decode(ARGV[1])
local src = a.src
local skipped, fresh = {}, a.u
if #src > 0 then
  local fields = {}
  for i, s in ipairs(src) do fields[i] = 'pos:' .. s[1] end
  local marks = redis.call('HMGET', KEYS[1], unpack(fields))
  for i, s in ipairs(src) do
    local m = tonumber(marks[i])
    if m and m >= tonumber(s[3]) then
      skipped[#skipped + 1] = i
    elseif m and m >= tonumber(s[2]) then
      return {-1, i, marks[i]}
    else
      fresh = fresh + 1
    end
  end
end
if #skipped > 0 then
  if fresh > 0 then return {-2, unpack(skipped)} end
  return {0, unpack(skipped)}
end
for _, t in ipairs(a.t) do
  local h, ttl, inc = KEYS[t[1]], tonumber(t[2]), t[3]
  for j = 1, #inc, 2 do redis.call('HINCRBYFLOAT', h, inc[j], inc[j + 1]) end
  if #t[4] > 0 then redis.call('HSET', h, unpack(t[4])) end
  if ttl > 0 then redis.call('EXPIRE', h, ttl) end
  if t[5] > 0 and #t[6] > 0 then
    local log = KEYS[t[5]]
    redis.call('ZADD', log, unpack(t[6]))
    if t[7] ~= '' then redis.call('ZREMRANGEBYSCORE', log, '-inf', '(' .. t[7]) end
    if ttl > 0 then redis.call('EXPIRE', log, ttl) end
  end
end
for _, q in ipairs(a.q) do
  local k = KEYS[q[1]]
  redis.call('ZADD', k, unpack(q[4]))
  redis.call('ZREMRANGEBYRANK', k, 0, -(tonumber(q[3]) + 1))
  redis.call('EXPIRE', k, q[2])
end
if #src > 0 then
  local marks = {}
  for _, s in ipairs(src) do
    marks[#marks + 1] = 'pos:' .. s[1]
    marks[#marks + 1] = s[3]
  end
  redis.call('HSET', KEYS[1], unpack(marks))
end
return {1}
