-- soak.lua: the soak test (not CI). For N minutes (default 10)
-- it runs mixed random jobs with random outcomes through composed pools and
-- prints, every 10 s, the host's RSS, fd count and process counts, which
-- should all stay flat. Each sample is taken at a quiet moment: the jobs in
-- flight are awaited first and the garbage collected. It ends with a verdict and exits 1 when something
-- grew, leaked or came back wrong.
--
--   luajit bench/soak.lua [minutes [seed]]     (bench/run --soak [minutes] also works)
--
-- It measures the repository's lua/ and build/ (run tools/build first).
local here = (arg[0]:match("^(.*)/[^/]*$") or ".")
package.path = here .. "/../lua/?.lua;" .. here .. "/../lua/?/init.lua;" .. package.path
package.cpath = here .. "/../build/?.so;" .. package.cpath
local util = dofile(here .. "/util.lua")
local handler = require("handler")

local now, format = util.now, string.format
local minutes = tonumber(arg[1] or "10") or 10
local seed = tonumber(arg[2] or "") or os.time()
local INTERVAL = 10e9
local IN_FLIGHT = 12
math.randomseed(seed)
local random = math.random

---------------------------------------------------------------------------
-- Composed pools: two customers delegating to a shared root, a dynamic pool
-- choosing between them, a small standalone pool whose idle workers expire
-- quickly (so processes come and go), and the default pool of handler.run.

local root = handler.pool({ name = "soak_root", max_workers = 6, max_memory_bytes = 256 * 2^20 })
local a = handler.pool({ name = "soak_a", delegate_to = root, max_workers = 4 })
local b = handler.pool({ name = "soak_b", delegate_to = "soak_root", max_workers = 3,
  max_memory_bytes = 64 * 2^20 })
local dyn = handler.pool({ name = "soak_dyn", max_workers = 4,
  delegate_fun = function(p) if p == 1 then return { a, b } end return { b, root } end })
local small = handler.pool({ name = "soak_small", max_workers = 2, idle_ms = 300 })
local pools = { root, a, b, dyn, small }
local MAX_PROCS = 6 + 2 + 100 -- root's tree + small + the default pool's bound

---------------------------------------------------------------------------
-- Job kinds: a closure, options, and what the outcome must be.

local function expect_ok(want)
  return function(ok, v)
    if not ok then return false end
    if type(want) == "function" then return want(v) end
    return v == want
  end
end

local function expect_err(typ, reason)
  return function(ok, err)
    return not ok and type(err) == "table" and err.type == typ and
      (reason == nil or err.reason == reason)
  end
end

local function killed_or(typ)
  -- A job killed by the soak may have ended on its own first.
  return function(ok, err)
    if ok then return true end
    return type(err) == "table" and (err.type == typ or err.reason == "user_killed")
  end
end

local kinds = {
  { "ok", 30, function()
    local x = random(1, 1e6)
    return function() return x * 2 end, nil, expect_ok(x * 2)
  end },
  { "ok_table", 8, function()
    local t = {}
    for i = 1, random(10, 2000) do t[i] = { i, "v" .. i } end
    local n = #t
    return function() local r = {} for i = 1, #t do r[i] = t[i][2] end return r end,
      nil, expect_ok(function(v) return type(v) == "table" and #v == n and v[n] == "v" .. n end)
  end },
  { "ok_string", 4, function()
    local n = random(1, 2 * 2^20)
    return function() return string.rep("s", n) end, { max_result_bytes = 4 * 2^20 },
      expect_ok(function(v) return #v == n end)
  end },
  { "busy", 8, function()
    local ms = random(1, 20)
    return function()
      local t = os.clock() + ms / 1000
      while os.clock() < t do end
      return ms
    end, nil, expect_ok(ms)
  end },
  { "error", 8, function()
    return function() error("boom") end, nil, expect_err("ProcessExit", nil)
  end },
  { "timeout", 6, function()
    return function() while true do end end, { max_ms = random(1, 30) }, expect_err("Timeout")
  end },
  { "oom", 5, function()
    return function() local t = {} while true do t[#t + 1] = { 1, 2, 3 } end end,
      { max_heap_bytes = random(1, 4) * 2^20 }, expect_err("OOM")
  end },
  { "exit", 4, function()
    return function() os.exit(3) end, nil, expect_err("ProcessExit")
  end },
  { "segv", 3, function()
    return function() require("ffi").cast("int *", 0)[0] = 1 end, nil,
      expect_err("ProcessExit", "SIGSEGV")
  end },
  { "spawn", 2, function()
    return function() return os.execute("true") end, nil, expect_ok(0)
  end },
  { "kill_ref", 4, function()
    return function() while true do end end, { max_ms = 2000 }, killed_or("Timeout"), "ref"
  end },
  { "kill_name", 3, function()
    return function() while true do end end, { max_ms = 2000, task_name = "soak_victim" },
      killed_or("Timeout"), "name"
  end },
}
local total_weight = 0
for _, k in ipairs(kinds) do total_weight = total_weight + k[2] end

local function pick_kind()
  local r = random() * total_weight
  for _, k in ipairs(kinds) do
    r = r - k[2]
    if r <= 0 then return k end
  end
  return kinds[#kinds]
end

---------------------------------------------------------------------------
-- Bookkeeping.

local counts, unexpected, examples = {}, 0, {}
local rejected, submitted, resolved, double = 0, 0, 0, 0
local function count(name) counts[name] = (counts[name] or 0) + 1 end

local inflight = {}   -- list of { job=, kind=, check=, how=, t= }

local function submit()
  local k = pick_kind()
  local fn, opts, chk, how = k[3]()
  opts = opts or {}
  opts.max_ms = opts.max_ms or 5000
  local r = random(1, 10)
  if r <= 4 then opts.pool_timeout = random(0, 100) end
  local pool
  if r == 10 and how == nil then
    -- Through handler.run: blocking, so only quick kinds.
    if k[1] == "busy" or k[1] == "timeout" then return end
    local o = { max_ms = opts.max_ms, max_heap_bytes = opts.max_heap_bytes,
      max_result_bytes = opts.max_result_bytes }
    submitted = submitted + 1
    local res = { handler.run(fn, o) }
    resolved = resolved + 1
    count(k[1])
    if not chk(res[1], res[2]) then
      unexpected = unexpected + 1
      if #examples < 10 then
        examples[#examples + 1] = format("%s via handler.run: %s %s", k[1], tostring(res[1]),
          tostring(res[2]))
      end
    end
    return
  end
  pool = pools[random(1, #pools)]
  if pool == dyn then opts.delegate_param = random(1, 2) end
  local job, err = pool:async(fn, opts)
  submitted = submitted + 1
  if job == nil then
    if type(err) ~= "table" or not err.rejected then
      unexpected = unexpected + 1
      if #examples < 10 then examples[#examples + 1] = "reject without rejected: " .. tostring(err) end
    end
    rejected = rejected + 1
    resolved = resolved + 1
    count("rejected_" .. tostring(err and err.type))
    return
  end
  inflight[#inflight + 1] = { job = job, kind = k[1], check = chk, how = how, pool = pool,
    t = now(), killat = how and now() + random(1, 50) * 1e6 }
end

local function finish(i)
  local e = table.remove(inflight, i)
  local res = { e.job:await() }
  resolved = resolved + 1
  if not res[1] and type(res[2]) == "table" and res[2].rejected then
    -- Queued with pool_timeout and got no capacity: a valid outcome for any kind.
    rejected = rejected + 1
    count("rejected_" .. tostring(res[2].type))
  elseif e.check(res[1], res[2]) then
    count(e.kind)
  elseif e.flushed and not res[1] and type(res[2]) == "table" and res[2].reason == "user_killed" then
    count("flushed")
  else
    count(e.kind)
    unexpected = unexpected + 1
    if #examples < 10 then
      local err = res[2]
      examples[#examples + 1] = format("%s: %s %s%s", e.kind, tostring(res[1]), tostring(err),
        type(err) == "table" and format(" (type %s, reason %s)", tostring(err.type),
          tostring(err.reason)) or "")
    end
  end
  -- Awaiting again must give the same outcome, not a second resolution.
  local again = { e.job:await() }
  if again[1] ~= res[1] then double = double + 1 end
end

local function kill_due()
  local t = now()
  for _, e in ipairs(inflight) do
    if e.killat and t >= e.killat then
      e.killat = nil
      if e.how == "ref" then
        e.pool:kill_by_ref(e.job)
      else
        e.pool:kill("soak_victim")
      end
    end
  end
end

---------------------------------------------------------------------------
-- Samples.

local ffi = require("ffi")
ffi.cdef("int malloc_trim(size_t pad);")

-- rss: as it is; rss_trim: after malloc_trim(0) hands the allocator's free
-- memory back to the kernel, so what is left is what the host still holds.
local function sample()
  local rss = util.mem_kb() or 0
  pcall(ffi.C.malloc_trim, 0)
  local procs = handler._core.procs()
  local sup = procs.supervisor
  local running = 0
  for _, p in ipairs(pools) do running = running + p:stats().running end
  return {
    rss = rss,
    rss_trim = util.mem_kb() or 0,
    lua_kb = collectgarbage("count"),
    fds = util.fd_count(),
    host_children = #util.children(util.pid),
    sup_children = sup and #util.children(sup) or 0,
    all = util.descendants(util.pid),
    workers = #procs,
    running = running,
  }
end

local function show(t, s, rate)
  print(format("%6.0f s  jobs %8d  %5.0f/s  rss %6.2f MB (trimmed %6.2f)  lua %4.0f kB  " ..
    "fds %3d  children: host %d, supervisor %3d, all %3d  running %2d",
    t, resolved, rate, s.rss / 1024, s.rss_trim / 1024, s.lua_kb, s.fds, s.host_children,
    s.sup_children, s.all, s.running))
  io.stdout:flush()
end

---------------------------------------------------------------------------
-- Main loop.

print(format("soak: %.1f min, seed %d, %d jobs in flight, pools: root(6) ← a(4), b(3); " ..
  "dyn(4) → a|b|root; small(2, idle 300 ms); default", minutes, seed, IN_FLIGHT))
-- The fd baseline: the supervisor up, no worker left.
do
  local warm = handler.pool({ max_workers = 1 })
  assert(warm:run(function() return 1 end))
  warm:close()
  local t = now()
  while #handler._core.procs() > 0 and now() - t < 5e9 do
    handler.step()
    util.sleep_ms(5)
  end
end
local fds0 = util.fd_count()
local t0 = now()
local deadline = t0 + minutes * 60e9
local next_sample = t0 + INTERVAL
local samples = {}
local last_resolved, last_t = 0, t0
local flushes = 0
while now() < deadline do
  while #inflight < IN_FLIGHT do submit() end
  kill_due()
  if random(1, 2000) == 1 then
    flushes = flushes + 1
    for _, e in ipairs(inflight) do e.flushed = true end
    pools[random(1, #pools)]:flush()
  end
  handler.step()
  local any = false
  for i = #inflight, 1, -1 do
    if inflight[i].job:done() then
      finish(i)
      any = true
    end
  end
  if not any and #inflight > 0 then
    -- Block on one job; victims not yet killed are skipped when possible.
    local idx = 1
    for i, e in ipairs(inflight) do
      if e.how == nil then idx = i break end
    end
    if inflight[idx].killat == nil or inflight[idx].how == nil then
      finish(idx)
    else
      util.sleep_ms(1)
    end
  end
  local t = now()
  if t >= next_sample then
    -- Sample at a quiet moment: every job in flight resolved (victims killed
    -- now), garbage collected, so that samples compare like with like.
    for _, e in ipairs(inflight) do
      if e.killat then e.killat = 0 end
    end
    kill_due()
    while #inflight > 0 do finish(#inflight) end
    collectgarbage()
    collectgarbage()
    local s = sample()
    samples[#samples + 1] = s
    t = now()
    show((t - t0) / 1e9, s, (resolved - last_resolved) / ((t - last_t) / 1e9))
    last_resolved, last_t = resolved, t
    next_sample = next_sample + INTERVAL
  end
end

-- Drain, then close everything.
while #inflight > 0 do finish(#inflight) end
for _, p in ipairs(pools) do
  local st = p:stats()
  if st.running ~= 0 or st.bytes_committed ~= 0 then
    unexpected = unexpected + 1
    examples[#examples + 1] = format("pool %s: running %d, bytes_committed %d after the drain",
      p.name, st.running, st.bytes_committed)
  end
end
collectgarbage()
local final = sample()
show((now() - t0) / 1e9, final, 0)

---------------------------------------------------------------------------
-- Verdict: compare the first sample (warm) with the last, bound the rest.

print("")
print(format("jobs submitted %d, resolved %d, rejected %d, flushes %d, unexpected outcomes %d, " ..
  "await changed its answer %d", submitted, resolved, rejected, flushes, unexpected, double))
local names = {}
for k in pairs(counts) do names[#names + 1] = k end
table.sort(names)
local parts = {}
for _, k in ipairs(names) do parts[#parts + 1] = k .. " " .. counts[k] end
print("outcomes by kind: " .. table.concat(parts, ", "))
for _, e in ipairs(examples) do print("  unexpected: " .. e) end

local bad = {}
if submitted ~= resolved then bad[#bad + 1] = format("%d jobs never resolved", submitted - resolved) end
if unexpected > 0 then bad[#bad + 1] = format("%d unexpected outcomes", unexpected) end
if double > 0 then bad[#bad + 1] = format("await changed its answer %d times", double) end
if #samples >= 2 then
  -- Compare the medians of the first and the last third of the samples, not
  -- two single points.
  local k = math.max(1, math.floor(#samples / 3))
  local function median_rss(from, to)
    local v = {}
    for i = from, to do v[#v + 1] = samples[i].rss_trim end
    table.sort(v)
    return v[math.floor(#v / 2) + 1]
  end
  local first, last = median_rss(1, k), median_rss(#samples - k + 1, #samples)
  local maxp, minfd, maxfd = 0, math.huge, 0
  for _, s in ipairs(samples) do
    if s.all > maxp then maxp = s.all end
    if s.fds < minfd then minfd = s.fds end
    if s.fds > maxfd then maxfd = s.fds end
  end
  print(format("host RSS (trimmed) median of the first third of the samples %.2f MB, of the last third " ..
    "%.2f MB (%+.1f%%); fds %d..%d (start %d, after drain %d); descendants max %d",
    first / 1024, last / 1024, 100 * (last - first) / first, minfd, maxfd, fds0, final.fds, maxp))
  if last > first * 1.10 + 1024 then
    bad[#bad + 1] = "host RSS (trimmed) grew more than 10% + 1 MB (median of the first third → last third)"
  end
  if maxp > MAX_PROCS + 1 then bad[#bad + 1] = "more processes than the pools allow" end
  -- fds: the host holds one socket per live worker, so compare after the drain
  -- with the pools closed below.
else
  print("(run for at least 20 s to compare samples)")
end

for _, p in ipairs(pools) do p:close() end
handler.default_pool():close()
local t_close = now()
local left
repeat
  handler.step()
  left = util.descendants(util.pid) - 1 -- the supervisor may stay
  if left <= 0 then break end
  util.sleep_ms(10)
until now() - t_close > 5e9
local fds_end = util.fd_count()
print(format("after closing every pool: descendants besides the supervisor %d, fds %d (start %d)",
  math.max(0, left), fds_end, fds0))
if left > 0 then bad[#bad + 1] = format("%d processes left 5 s after closing the pools", left) end
if fds_end > fds0 then bad[#bad + 1] = format("fds grew from %d to %d", fds0, fds_end) end

if #bad == 0 then
  print("soak: flat — no growth, no leak, every job resolved once as expected")
else
  print("soak: FAILED — " .. table.concat(bad, "; "))
  os.exit(1)
end
