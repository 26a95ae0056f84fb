"""The Lua scripts behind `JobStore`: each runs atomically inside Redis, so a check and its write cannot interleave.

Key order shared by the state-changing scripts (`STEP`, `RETRY`):
`KEYS[1]` job hash, `KEYS[2]` its timeline list (used only by a job that has one), `KEYS[3]` the due index,
`KEYS[4..10]` the state indexes in `JobState` order (queued, submitted, processing, generated, stored, failed,
canceled), `KEYS[11]` the outbox.

The outbox is how announcing a step (the consumers' stream, a job's notification) survives a crash: the step
that enters a terminal state, or a state the job's `notify_url` asked for, adds `<id>|<state>|<now>` to it in
the same script; whoever applied the step announces it and removes the entry, and the reconciler announces what
is left after a grace period (so an announcement may be made twice, never lost).

Timeline lines (`Event.to_line`) are built by Python, except the `from` state which only the script knows:
Python sends the event's time in milliseconds and the rest after the `from` code (`<to><source>[detail]`), and
the script puts `,<code of the current state>` between them (`push_event`: in the job hash's `tl` field, the time
made relative to the first line's; in the job's list when it has one). Scores and times arrive as strings and are
stored as given; the only arithmetic is on whole milliseconds (exact in Lua's doubles).

The request body (images included, up to tens of MB) is kept apart from the hash, in `<job key>:request`, so that
the HGETALL every step answers with stays small; the submit and the copy read it (`JobStore.request`), and the
step into `stored` deletes it (the manifest records it, without image payloads), and what the callbacks said
(`<job key>:heard`, `shared/heard.py`: read only by the submit and the copy).

A hash value longer than 64 bytes is kept in pieces (`jobs_model.pieces`: `<name>`, `<name>~1`, ...) so the hash
stays a listpack under Redis's default limits: `full` reads a field whole, and a write clears the field's earlier
pieces first (`clear_pieces`).

Every script that moves a job between states also moves it between its app's per-state indexes of the
non-terminal states (`keys.app_jobs_in_state`; the group is the job's `app` field, `_` without one), so an app's
active and in-flight counts are a few ZCARDs.

Replies: a table whose first item is a status word (`missing`, `noop`, `applied`, ...); state-changing scripts add
the state before the step and the job's hash (HGETALL) after it.
"""

from __future__ import annotations

from kling_relay.shared import keys
from kling_relay.shared.jobs_model import STATE_CODES, TIMELINE_FIELD

#: Most bytes of timeline kept in the job hash (16 pieces); a longer timeline moves to its own list.
TIMELINE_MAX_BYTES = 1024
#: Most fields the job hash may reach with its timeline in it (Redis keeps a hash a listpack up to 128).
TIMELINE_MAX_FIELDS = 100

# Per-app state indexes (non-terminal states only), named from the job's `app` field inside the scripts.
_APPS = f"""
local APP_PREFIX = '{keys.APP_PREFIX}'
local ACTIVE = {{queued=true, submitted=true, processing=true, generated=true}}
local function app_base(job_key)
  local app = redis.call('HGET', job_key, 'app')
  if not app or app == '' then app = '{keys.NO_APP_GROUP}' end
  return APP_PREFIX .. app .. ':state:'
end
"""

# A field kept in pieces (`jobs_model.pieces`): read whole, or drop its further pieces before the field is rewritten.
_PIECES = """
local function full(key, name)
  local value = redis.call('HGET', key, name)
  if not value or redis.call('HEXISTS', key, name .. '~1') == 0 then return value end
  -- a whole JSON value over stale pieces: written by a process of the older layout (jobs_model._whole_json)
  if pcall(cjson.decode, value) then return value end
  local n = 1
  while true do
    local more = redis.call('HGET', key, name .. '~' .. n)
    if not more then return value end
    value = value .. more
    n = n + 1
  end
end

local function clear_pieces(key, name)
  local n = 1
  while redis.call('HDEL', key, name .. '~' .. n) == 1 do n = n + 1 end
end
"""

# The timeline (`jobs_model.timeline_of`): lines in the job hash's `tl` field, in pieces, while the job has no
# timeline list; a job that has one (written by an older release, or moved there) appends to it.
_TIMELINE = f"""
local CODE = {{{", ".join(f"{s}='{c}'" for s, c in STATE_CODES.items())}}}
local TL = '{TIMELINE_FIELD}'
local TL_MAX_BYTES = {TIMELINE_MAX_BYTES}
local TL_MAX_FIELDS = {TIMELINE_MAX_FIELDS}
""" + """
-- `s` in pieces of at most 64 bytes, never cut inside a UTF-8 character (as `jobs_model.pieces` cuts)
local function split64(s)
  local out, i, n = {}, 1, #s
  while i <= n do
    local j = i + 63
    if j >= n then
      j = n
    else
      while j > i do
        local b = string.byte(s, j + 1)
        if b < 128 or b >= 192 then break end
        j = j - 1
      end
    end
    out[#out + 1] = string.sub(s, i, j)
    i = j + 1
  end
  return out
end

local function tl_piece(k)
  if k == 0 then return TL end
  return TL .. '~' .. k
end

-- Append one event: `ms` its time in milliseconds (text), `rest` the line after it (`,<from><to><source>[detail]`).
-- In the hash the first line's time is absolute and the others relative to it. When the hash timeline would pass
-- max_events lines, TL_MAX_BYTES or a hash of TL_MAX_FIELDS fields, it moves to the list (times made absolute;
-- the job's expiry copied), which keeps the latest max_events.
local function push_event(job_key, list_key, ms, rest, max_events)
  if redis.call('EXISTS', list_key) == 0 then
    local h = redis.call('HGETALL', job_key)
    local fields, parts, args = {}, {}, {}
    for i = 1, #h, 2 do fields[h[i]] = h[i + 1] end
    while fields[tl_piece(#parts)] do parts[#parts + 1] = fields[tl_piece(#parts)] end
    if #parts == 0 then
      for i, p in ipairs(split64(ms .. rest)) do
        args[#args + 1] = tl_piece(i - 1)
        args[#args + 1] = p
      end
      redis.call('HSET', job_key, unpack(args))
      return
    end
    local text = table.concat(parts)
    local base = tonumber(string.match(text, '^%-?%d+'))
    local line = string.format('%d', tonumber(ms) - base) .. rest
    local _, newlines = string.gsub(text, '\\n', '')
    if newlines + 1 < tonumber(max_events) and #text + 1 + #line <= TL_MAX_BYTES
        and #h / 2 + 2 + math.floor(#line / 32) <= TL_MAX_FIELDS then
      for i, p in ipairs(split64(parts[#parts] .. '\\n' .. line)) do
        args[#args + 1] = tl_piece(#parts + i - 2)
        args[#args + 1] = p
      end
      redis.call('HSET', job_key, unpack(args))
      return
    end
    local lines, names = {}, {}
    for l in string.gmatch(text, '[^\\n]+') do
      if #lines == 0 then
        lines[1] = l
      else
        local n, r = string.match(l, '^(%-?%d+)(,.*)$')
        lines[#lines + 1] = string.format('%d', base + tonumber(n)) .. r
      end
    end
    redis.call('RPUSH', list_key, unpack(lines))
    for k = 0, #parts - 1 do names[#names + 1] = tl_piece(k) end
    redis.call('HDEL', job_key, unpack(names))
    local ttl = redis.call('PTTL', job_key)
    if ttl > 0 then redis.call('PEXPIRE', list_key, ttl) end
  end
  redis.call('RPUSH', list_key, ms .. rest)
  redis.call('LTRIM', list_key, -tonumber(max_events), -1)
end
"""

# The job's id: its key without the prefix (the hash of a job written before 2026-12-08 also has an `id` field).
_JOB_ID = f"""
local function job_id(job_key) return string.sub(job_key, {len(keys.JOB_KEY_PREFIX) + 1}) end
"""

_PRELUDE = _APPS + _PIECES + _TIMELINE + _JOB_ID + """
local RANK = {queued=0, submitted=1, processing=2, generated=3, stored=4}
local TERMINAL = {stored=true, failed=true, canceled=true}
local IDX = {queued=4, submitted=5, processing=6, generated=7, stored=8, failed=9, canceled=10}

local function move_index(cur, to, id, score)
  redis.call('ZREM', KEYS[IDX[cur]], id)
  redis.call('ZADD', KEYS[IDX[to]], score, id)
  local base = app_base(KEYS[1])
  if ACTIVE[cur] then redis.call('ZREM', base .. cur, id) end
  if ACTIVE[to] then redis.call('ZADD', base .. to, score, id) end
end

-- A due time never lies past the job's deadline, so the reconciler always gets to end a job that overran it.
local function by_deadline(job_key, due_at)
  local deadline = redis.call('HGET', job_key, 'deadline_at')
  if deadline and deadline ~= '' and tonumber(deadline) < tonumber(due_at) then return deadline end
  return due_at
end

local function update_due(to, mode, due_at, id)
  if TERMINAL[to] or mode == 'none' then
    redis.call('ZREM', KEYS[3], id)
  elseif mode == 'set' then
    redis.call('ZADD', KEYS[3], by_deadline(KEYS[1], due_at), id)
  end
end
"""

# KEYS: job, events, all-index, queued-index, due, the app's listing index ('' = no app; with one, the app is also
#       added to `keys.SWEEP_APPS`, which the script names itself), the apps set[, idem]
# ARGV: 1 id, 2 body tag, 3 idem ttl (0 = none), 4 created_at, 5 due_at ('' = none), 6 body hash (hex, as the
#       records before 2026-12-08 hold it),
#       7 job key prefix, 8 max events, 9 app group, 10 the app's active cap (0 = none), 11.. field/value pairs
# Replies {'created'|'existing'|'conflict', id} or {'busy', active count} (the app's cap is reached).
CREATE = _APPS + f"""
local SWEEP_APPS = '{keys.SWEEP_APPS}'
""" + """
if #KEYS >= 8 then
  -- the record: `<job id without job_><body tag>` (a string), or before 2026-12-08 a hash (job_id, body)
  local cur, same = nil, false
  local kind = redis.call('TYPE', KEYS[8])['ok']
  if kind == 'string' then
    local record = redis.call('GET', KEYS[8])
    cur = 'job_' .. string.sub(record, 1, 26)
    same = string.sub(record, 27) == ARGV[2]
  elseif kind == 'hash' then
    local old = redis.call('HMGET', KEYS[8], 'job_id', 'body')
    cur = old[1]
    same = old[2] == ARGV[6]
  end
  if cur and redis.call('EXISTS', ARGV[7] .. cur) == 1 then
    if same then return {'existing', cur} end
    return {'conflict', cur}
  end
end
local base = APP_PREFIX .. ARGV[9] .. ':state:'
if tonumber(ARGV[10]) > 0 then
  local active = 0
  for state in pairs(ACTIVE) do active = active + redis.call('ZCARD', base .. state) end
  if active >= tonumber(ARGV[10]) then return {'busy', tostring(active)} end
end
if #KEYS >= 8 then
  redis.call('DEL', KEYS[8])
  redis.call('SET', KEYS[8], string.sub(ARGV[1], 5) .. ARGV[2])
  if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[8], ARGV[3]) end
end
for i = 11, #ARGV, 2 do
  if ARGV[i] == 'request' then
    redis.call('SET', KEYS[1] .. ':request', ARGV[i + 1])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
if KEYS[6] ~= '' then
  redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1])
  redis.call('SADD', SWEEP_APPS, ARGV[9])
end
redis.call('ZADD', base .. 'queued', ARGV[4], ARGV[1])
redis.call('SADD', KEYS[7], ARGV[9])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1]) end
return {'created', ARGV[1]}
"""

# Whether the job's notify_url wants to hear of `to`: notify_events is '' (the default: terminal states only) or
# a JSON list of state names (plain lowercase words, so a quoted match is exact).
_WANTS = """
local function wants_notification(job_key, to)
  local url = redis.call('HGET', job_key, 'notify_url')
  if not url or url == '' then return false end
  local events = full(job_key, 'notify_events')
  if not events or events == '' then return TERMINAL[to] == true end
  return string.find(events, '"' .. to .. '"', 1, true) ~= nil
end
"""

# ARGV: 1 to, 2 now, 3 event head, 4 event tail, 5 allowed sources ('*' = any, else comma-separated),
#       6 due mode (keep|none|set), 7 due_at, 8 ttl seconds (0 = none), 9 max events, 10.. field/value pairs (a
#       field's pieces right after it). The step into `stored` deletes the job's request, what its callbacks said
#       and its attempt counters (read only by the submit and the copy; a stored job has no retry).
STEP = _PRELUDE + _WANTS + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing'} end
local to = ARGV[1]
local ok = not TERMINAL[cur]
if ok and ARGV[5] ~= '*' then
  ok = false
  for s in string.gmatch(ARGV[5], '[^,]+') do
    if s == cur then ok = true end
  end
end
if ok and to ~= 'failed' and to ~= 'canceled' then
  ok = RANK[to] > RANK[cur]
end
if not ok then return {'noop', cur, redis.call('HGETALL', KEYS[1])} end
local id = job_id(KEYS[1])
redis.call('HSET', KEYS[1], 'state', to, 'updated_at', ARGV[2])
for i = 10, #ARGV, 2 do
  if not string.find(ARGV[i], '~', 1, true) then clear_pieces(KEYS[1], ARGV[i]) end
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if to == 'stored' then
  redis.call('DEL', KEYS[1] .. ':request', KEYS[1] .. ':heard')
  local counters = {}
  for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(k, 1, 8) == 'attempt:' then counters[#counters + 1] = k end
  end
  if #counters > 0 then redis.call('HDEL', KEYS[1], unpack(counters)) end
end
push_event(KEYS[1], KEYS[2], ARGV[3], ',' .. CODE[cur] .. ARGV[4], ARGV[9])
move_index(cur, to, id, redis.call('HGET', KEYS[1], 'created_at'))
update_due(to, ARGV[6], ARGV[7], id)
if TERMINAL[to] or wants_notification(KEYS[1], to) then
  redis.call('ZADD', KEYS[11], ARGV[2], id .. '|' .. to .. '|' .. ARGV[2])
end
if TERMINAL[to] and tonumber(ARGV[8]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  redis.call('EXPIRE', KEYS[2], ARGV[8])
  redis.call('EXPIRE', KEYS[1] .. ':request', ARGV[8])
end
return {'applied', cur, redis.call('HGETALL', KEYS[1])}
"""

# Ops retry: only failed -> queued. Clears the error and the attempt counters, removes any TTL. A job whose copy
# ever ran keeps that fact in `copy_ran` (the copy's first run skips S3 reads only when no copy ran before).
# ARGV: 1 now, 2 event head, 3 event tail start (up to the previous error), 4 due mode, 5 due_at, 6 max events
RETRY = _PRELUDE + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing'} end
if cur ~= 'failed' then return {'noop', cur, redis.call('HGETALL', KEYS[1])} end
local id = job_id(KEYS[1])
local err = full(KEYS[1], 'error')
if not err or err == '' then err = 'null' end
clear_pieces(KEYS[1], 'error')
redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_at', ARGV[1], 'error', 'null')
if redis.call('HEXISTS', KEYS[1], 'attempt:copy') == 1 then redis.call('HSET', KEYS[1], 'copy_ran', '1') end
for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(k, 1, 8) == 'attempt:' then redis.call('HDEL', KEYS[1], k) end
end
push_event(KEYS[1], KEYS[2], ARGV[2], ',' .. CODE[cur] .. ARGV[3] .. err .. '}', ARGV[6])
move_index(cur, 'queued', id, redis.call('HGET', KEYS[1], 'created_at'))
update_due('queued', ARGV[4], ARGV[5], id)
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('PERSIST', KEYS[1] .. ':request')
return {'applied', cur, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: job, events. ARGV: 1 event head, 2 event tail (after the `to` state), 3 max events
NOTE = _TIMELINE + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing'} end
push_event(KEYS[1], KEYS[2], ARGV[1], ',' .. CODE[cur] .. CODE[cur] .. ARGV[2], ARGV[3])
return {'noted', cur}
"""

# KEYS: job, events, (optional) the task id → job id index. ARGV: 1 task id, 2 now, 3 event head, 4 event tail
# (after the `to` state), 5 max events
SET_KLING_TASK_ID = _TIMELINE + _JOB_ID + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing'} end
local existing = redis.call('HGET', KEYS[1], 'kling_task_id')
if existing and existing ~= '' then
  if existing == ARGV[1] then return {'same', existing} end
  return {'conflict', existing}
end
redis.call('HSET', KEYS[1], 'kling_task_id', ARGV[1], 'updated_at', ARGV[2])
if KEYS[3] then redis.call('HSET', KEYS[3], ARGV[1], job_id(KEYS[1])) end
push_event(KEYS[1], KEYS[2], ARGV[3], ',' .. CODE[cur] .. CODE[cur] .. ARGV[4], ARGV[5])
return {'set', ''}
"""

# KEYS: job. ARGV: 1 field. Returns the new count, or -1 when the job does not exist.
BUMP_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
"""

# KEYS: job, due. ARGV: 1 due_at. Returns -1 (no job), 0 (terminal: not due-tracked), 1 (set).
SET_DUE = _JOB_ID + """
local TERMINAL = {stored=true, failed=true, canceled=true}
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return -1 end
if TERMINAL[cur] then return 0 end
local due_at = ARGV[1]
local deadline = redis.call('HGET', KEYS[1], 'deadline_at')
if deadline and deadline ~= '' and tonumber(deadline) < tonumber(due_at) then due_at = deadline end
redis.call('ZADD', KEYS[2], due_at, job_id(KEYS[1]))
return 1
"""

# The sweep of index entries whose job is gone (`JobStore.sweep`): bounded work per call, resumed where the last
# call stopped (its place in `keys.SWEEP`), each candidate's job checked with EXISTS in the same script, so an entry
# is removed only when its job does not exist at that moment (a job is never written again once gone).

# One sorted-set index (score = created_at). KEYS: 1 the index, 2 the sweep's state hash, 3 the apps set (app
# listing indexes: dropped from it once the index is gone; else unused). ARGV: 1 cutoff (only entries with a score
# below it are candidates), 2 most entries to examine, 3 job key prefix, 4 the state field, 5 the app ('' = none).
# The state field holds `<score> <n>`: the last score examined and how many entries at that score were kept (the
# next call skips those; equal created_at times are rare, but possible). Fewer than ARGV[2] candidates left: the
# sweep reached the cutoff and the field is dropped, so the next call starts from the oldest entry again (entries
# added behind the place since, e.g. a job moved into a terminal state index with its old created_at, are seen
# then). Replies {examined, removed}.
SWEEP_INDEX = """
local from, skip = '-inf', 0
local place = redis.call('HGET', KEYS[2], ARGV[4])
if place then
  local s, n = string.match(place, '^(%S+) (%d+)$')
  if s and tonumber(s) then from, skip = s, tonumber(n) end
end
local limit = tonumber(ARGV[2])
local batch = redis.call('ZRANGEBYSCORE', KEYS[1], from, '(' .. ARGV[1], 'WITHSCORES', 'LIMIT', skip, limit)
local gone, last, kept = {}, from, skip
for i = 1, #batch, 2 do
  if batch[i + 1] ~= last then last, kept = batch[i + 1], 0 end
  if redis.call('EXISTS', ARGV[3] .. batch[i]) == 0 then
    gone[#gone + 1] = batch[i]
  else
    kept = kept + 1
  end
end
for i = 1, #gone, 500 do
  redis.call('ZREM', KEYS[1], unpack(gone, i, math.min(i + 499, #gone)))
end
if #batch / 2 < limit then
  redis.call('HDEL', KEYS[2], ARGV[4])
else
  redis.call('HSET', KEYS[2], ARGV[4], last .. ' ' .. kept)
end
if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], ARGV[5]) end
return {#batch / 2, #gone}
"""

# The task-id index (a hash, no scores): one HSCAN step from the cursor kept in the state hash, removing the fields
# whose job is gone. KEYS: 1 the task-id index, 2 the sweep's state hash. ARGV: 1 COUNT (a hint: Redis may return
# a few more, or the whole hash while it is small), 2 job key prefix, 3 the state field. A full cycle of the
# cursor visits every field present throughout it (HSCAN's guarantee), so an entry of an expired job is removed
# within one cycle. Replies {examined, removed}.
SWEEP_TASKS = """
local cursor = redis.call('HGET', KEYS[2], ARGV[3]) or '0'
local step = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', ARGV[1])
local fields, gone = step[2], {}
for i = 1, #fields, 2 do
  if redis.call('EXISTS', ARGV[2] .. fields[i + 1]) == 0 then gone[#gone + 1] = fields[i] end
end
for i = 1, #gone, 500 do
  redis.call('HDEL', KEYS[1], unpack(gone, i, math.min(i + 499, #gone)))
end
if step[1] == '0' then
  redis.call('HDEL', KEYS[2], ARGV[3])
else
  redis.call('HSET', KEYS[2], ARGV[3], step[1])
end
return {#fields / 2, #gone}
"""
