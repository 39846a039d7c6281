-- bench.lua: the benchmark suite. Run it through bench/run, which
-- builds handler and the C floor and sets the module paths.
--
--   luajit bench/bench.lua --floor PATH [--quick] [--only 1,2,...]
--
-- Progress goes to stderr; stdout gets one Markdown table.
local here = (arg[0]:match("^(.*)/[^/]*$") or ".")
local util = dofile(here .. "/util.lua")
local ffi = require("ffi")

local now, summary, sleep_ms = util.now, util.summary, util.sleep_ms
local format = string.format

---------------------------------------------------------------------------
-- Arguments.

local floor_bin, quick, only = nil, false, nil
do
  local i = 1
  while i <= #arg do
    local a = arg[i]
    if a == "--floor" then
      floor_bin = arg[i + 1]
      i = i + 1
    elseif a == "--quick" then
      quick = true
    elseif a == "--only" then
      only = {}
      for n in arg[i + 1]:gmatch("%d+") do only[tonumber(n)] = true end
      i = i + 1
    else
      io.stderr:write("bench.lua: unknown argument ", a, "\n")
      os.exit(2)
    end
    i = i + 1
  end
end

-- Iteration counts; --quick divides them for a smoke run.
local function count(n)
  if quick then return math.max(5, math.floor(n / 10)) end
  return n
end

local function wanted(row)
  return only == nil or only[row]
end

local function progress(...)
  io.stderr:write(format(...), "\n")
  io.stderr:flush()
end

---------------------------------------------------------------------------
-- The table.

local rows = {}
local floor_ns        -- the floor for sequential rows (median, ns)
local bulk_ns         -- the floor for 10 MiB transfers (median, ns)
local pipe_ns = {}    -- pipe RTT medians by placement, for the 3× target
local FLOOR_NAME = "socketpair RTT cross-CPU (row 1)"

-- add{ id=, name=, n=, min=, median=, p99=, kind="time"|"rate"|"mem"|"text", ratio=, note= }
local function add(r)
  rows[#rows + 1] = r
end

local function time_unit(ns)
  if ns < 1e4 then return 1e3, "µs", "%.2f" end
  if ns < 1e6 then return 1e3, "µs", "%.1f" end
  if ns < 1e7 then return 1e6, "ms", "%.3f" end
  if ns < 1e9 then return 1e6, "ms", "%.2f" end
  return 1e9, "s", "%.3f"
end

local function cells(r)
  if r.kind == "time" then
    local div, unit, f = time_unit(r.median)
    local function c(v) return v and (format(f, v / div) .. " " .. unit) or "" end
    return c(r.min), c(r.median), c(r.p99)
  elseif r.kind == "rate" then
    local function c(v) return v and format("%.0f /s", v) or "" end
    return c(r.min), c(r.median), c(r.p99)
  elseif r.kind == "mem" then
    local function c(v) return v and format("%.2f MB", v / 1024) or "" end
    return c(r.min), c(r.median), c(r.p99)
  end
  return r.min or "", r.median or "", r.p99 or ""
end

local function print_table()
  local head = { "#", "measurement", "n", "min", "median", "p99", "× floor", "note" }
  local lines = { head }
  for _, r in ipairs(rows) do
    local mn, md, p = cells(r)
    lines[#lines + 1] = {
      r.id, r.name, r.n and tostring(r.n) or "", mn, md, p,
      r.ratio and format("%.2f", r.ratio) or "", r.note or "",
    }
  end
  local width = {}
  for _, l in ipairs(lines) do
    for i, c in ipairs(l) do
      local w = #c:gsub("[\128-\191]", "")
      if (width[i] or 0) < w then width[i] = w end
    end
  end
  local right = { [3] = true, [4] = true, [5] = true, [6] = true, [7] = true }
  local function line(l)
    local out = {}
    for i, c in ipairs(l) do
      local pad = string.rep(" ", width[i] - #c:gsub("[\128-\191]", ""))
      out[i] = right[i] and (pad .. c) or (c .. pad)
    end
    return "| " .. table.concat(out, " | ") .. " |"
  end
  io.stdout:write(line(head), "\n")
  local sep = {}
  for i = 1, #head do
    sep[i] = string.rep("-", width[i] + 1) .. (right[i] and ":" or "-")
  end
  io.stdout:write("|" .. table.concat(sep, "|") .. "|\n")
  for i = 2, #lines do io.stdout:write(line(lines[i]), "\n") end
end

-- Runs batch() (size jobs) once to warm up, then `batches` times; returns
-- the summary of the per-batch rates (jobs/s) and the overall rate.
local function batch_rates(batch, batches, size)
  batch()
  local rates, total = {}, 0
  for i = 1, batches do
    local t0 = now()
    batch()
    local t = now() - t0
    total = total + t
    rates[i] = size / (t / 1e9)
  end
  return summary(rates), batches * size / (total / 1e9)
end

-- Times fn() n times after w warm-up calls; returns the summary in ns.
local function timeit(n, w, fn)
  for _ = 1, w do fn() end
  local s = {}
  for i = 1, n do
    local t0 = now()
    fn()
    s[i] = now() - t0
  end
  return summary(s)
end

local function time_row(id, name, st, extra)
  local r = { id = id, name = name, kind = "time", n = st.n, min = st.min,
    median = st.median, p99 = st.p99 }
  if extra then for k, v in pairs(extra) do r[k] = v end end
  if r.ratio == true then r.ratio = floor_ns and st.median / floor_ns or nil end
  add(r)
  return r
end

local function check(ok, v, want, what)
  if not ok or (want ~= nil and v ~= want) then
    error(format("%s: unexpected outcome %s %s", what, tostring(ok), tostring(v)), 2)
  end
end

---------------------------------------------------------------------------
-- Row 1: the floor, in C, in this run.

local function row_floor()
  progress("row 1: the floor (C, %s)", floor_bin)
  local rounds = count(20000)
  local p = assert(io.popen(format("%q %d %d %d", floor_bin, rounds, count(2000), count(30))))
  local got = {}
  for l in p:lines() do
    local tr, pl, n, mn, md, p99 = l:match("^floor (%S+) (%S+) (%d+) (%S+) (%S+) (%S+)")
    if tr and tonumber(n) > 0 then
      got[tr .. " " .. pl] = { n = tonumber(n), min = tonumber(mn), median = tonumber(md),
        p99 = tonumber(p99) }
    elseif tr then
      got[tr .. " " .. pl] = false
    end
  end
  assert(p:close(), "the floor program failed")
  local names = {
    { "pipe same-cpu", "pipe, 64 B round trip, both on one CPU" },
    { "pipe cross-cpu", "pipe, 64 B round trip, on two CPUs" },
    { "pipe free", "pipe, 64 B round trip, unpinned" },
    { "socketpair same-cpu", "unix socketpair, 64 B round trip, one CPU" },
    { "socketpair cross-cpu", "unix socketpair, 64 B round trip, two CPUs" },
    { "socketpair free", "unix socketpair, 64 B round trip, unpinned" },
  }
  for _, pl in ipairs({ "same-cpu", "cross-cpu", "free" }) do
    pipe_ns[pl] = got["pipe " .. pl] and got["pipe " .. pl].median
  end
  local b = got["socketpair bulk-10MiB"]
  bulk_ns = b and b.median
  local floor_key = got["socketpair cross-cpu"] and "socketpair cross-cpu" or "socketpair free"
  if floor_key ~= "socketpair cross-cpu" then FLOOR_NAME = "socketpair RTT unpinned (row 1)" end
  floor_ns = got[floor_key].median
  for i, nm in ipairs(names) do
    local st = got[nm[1]]
    if st then
      local note = nm[1] == floor_key and "**the floor** for sequential rows" or nil
      time_row("1" .. string.char(96 + i), nm[2], st, { ratio = st.median / floor_ns, note = note })
    else
      add({ id = "1" .. string.char(96 + i), name = nm[2], kind = "text", note = "one CPU only" })
    end
  end
  if b then
    time_row("1g", "unix socketpair, 10 MiB one way (+ 1 B reply), unpinned", b,
      { ratio = 1, note = format("%.2f GB/s; **the floor** of rows 9a, 9b", 10 * 2^20 / b.median) })
  end
end

---------------------------------------------------------------------------
-- Row 5: cold start, before this process loads handler.

local COLD = [[
local ffi = require("ffi")
ffi.cdef"typedef struct { long s; long ns; } cold_ts; int clock_gettime(int, cold_ts *);"
local ts = ffi.new("cold_ts")
local function now() ffi.C.clock_gettime(1, ts) return tonumber(ts.s) * 1e9 + tonumber(ts.ns) end
local t0 = now()
local handler = require("handler")
local t1 = now()
local ok, v = handler.run(function() return 1 + 1 end)
local t2 = now()
local f = assert(io.open(%q, "a"))
f:write(ok and v == 2 and "ok" or "bad", " ", t1 - t0, " ", t2 - t1, "\n")
f:close()
]]

local function row_cold()
  local n = count(40)
  progress("row 5: cold start (%d fresh processes, and %d bare luajit)", n, n)
  local out = os.tmpname()
  local code = format(COLD, out)
  local bare, whole = {}, {}
  for i = 1, n + 3 do
    local st, t = util.spawn_wait({ "luajit", "-e", "" })
    assert(st == 0, "luajit -e '' failed")
    if i > 3 then bare[#bare + 1] = t end
    st, t = util.spawn_wait({ "luajit", "-e", code })
    assert(st == 0, "the cold-start process failed")
    if i > 3 then whole[#whole + 1] = t end
  end
  local req, first, both = {}, {}, {}
  local i = 0
  for l in io.lines(out) do
    i = i + 1
    local okw, a, b = l:match("^(%S+) (%S+) (%S+)")
    assert(okw == "ok", "the first handler.run in a fresh process failed")
    if i > 3 then
      req[#req + 1], first[#first + 1] = tonumber(a), tonumber(b)
      both[#both + 1] = tonumber(a) + tonumber(b)
    end
  end
  os.remove(out)
  local b = summary(bare)
  local bare_row = { id = "5a", name = "bare `luajit -e ''`, whole process (spawn → reaped)",
    kind = "time", n = b.n, min = b.min, median = b.median, p99 = b.p99, ratio = 1,
    note = "floor of rows 5b–5e" }
  local function r(id, name, s, note)
    local st = summary(s)
    return { id = id, name = name, kind = "time", n = st.n, min = st.min, median = st.median,
      p99 = st.p99, ratio = st.median / b.median, note = note }
  end
  return {
    bare_row,
    r("5b", "cold: `require(\"handler\")`, in-process", req),
    r("5c", "cold: first `handler.run`, in-process", first, "starts the supervisor + a worker"),
    r("5d", "cold: require + first run, in-process", both),
    r("5e", "cold: whole process running the above (spawn → reaped)", whole),
  }
end

---------------------------------------------------------------------------
-- Rows 2, 3, 4, 6, 7, 8, 9 need handler in this process.

local handler
local pool2, root, child

local function trivial() return 1 + 1 end

local function row_sequential(mem)
  local n, w = count(20000), count(2000)
  progress("row 2: handler.run sequential (%d after %d warm-up)", n, w)
  for _ = 1, w do check(handler.run(function() return 1 + 1 end)) end
  -- Samples go to a C array filled in advance, so that they do not show in
  -- the host's RSS and Lua heap measured around the calls.
  local s = ffi.new("double[?]", n + 1)
  for i = 0, n do s[i] = 0 end
  collectgarbage()
  collectgarbage()
  mem.host_before = util.mem_kb()
  mem.lua_before = collectgarbage("count")
  mem.fds_before = util.fd_count()
  for i = 1, n do
    local t0 = now()
    local ok, v = handler.run(function() return 1 + 1 end)
    s[i] = now() - t0
    if v ~= 2 then check(ok, v, 2, "handler.run") end
    if i == math.floor(n / 2) then
      collectgarbage()
      collectgarbage()
      mem.host_mid, mem.jobs_mid = util.mem_kb(), i
    end
  end
  collectgarbage()
  collectgarbage()
  mem.host_after = util.mem_kb()
  mem.lua_after = collectgarbage("count")
  mem.fds_after = util.fd_count()
  mem.jobs = n
  local list = {}
  for i = 1, n do list[i] = s[i] end
  time_row("2", "`handler.run(function() return 1 + 1 end)`, sequential, warm", summary(list),
    { ratio = true, note = "default pool" })
end

-- Row 3c: row 3a with the host and every worker pinned to one CPU (the
-- first the host may use, as row 1a pins): each wake-up is a switch on that
-- CPU, so it compares with the one-CPU pipe round trip. Workers are forked
-- by the supervisor, not the host, so each is pinned by its pid; every mask
-- is restored afterwards.
pcall(ffi.cdef, [[
int sched_getaffinity(int pid, size_t size, uint8_t *mask);
int sched_setaffinity(int pid, size_t size, const uint8_t *mask);
]])
local MASK = 128
local function affinity_get(pid)
  local m = ffi.new("uint8_t[?]", MASK)
  if ffi.C.sched_getaffinity(pid, MASK, m) ~= 0 then return nil end
  return m
end
local function affinity_set(pid, m)
  return ffi.C.sched_setaffinity(pid, MASK, m) == 0
end

local function row_pool_one_cpu(n, w)
  local mine = affinity_get(0)
  if not mine then return end
  local cpu
  for c = 0, MASK * 8 - 1 do
    if bit.band(mine[bit.rshift(c, 3)], bit.lshift(1, bit.band(c, 7))) ~= 0 then cpu = c; break end
  end
  local one = ffi.new("uint8_t[?]", MASK)
  one[bit.rshift(cpu, 3)] = bit.lshift(1, bit.band(cpu, 7))
  -- The pool's workers exist once it ran a job.
  for _ = 1, 10 do check(pool2:run(trivial)) end
  local saved = { [0] = mine }
  assert(affinity_set(0, one), "sched_setaffinity")
  for _, pid in ipairs(handler._core.procs()) do
    saved[pid] = affinity_get(pid)
    if saved[pid] then affinity_set(pid, one) end
  end
  local ok, st = pcall(timeit, n, w, function()
    local ok, v = pool2:run(trivial)
    if v ~= 2 then check(ok, v, 2, "pool:run") end
  end)
  for pid, m in pairs(saved) do affinity_set(pid, m) end
  if not ok then error(st, 0) end
  local note = pipe_ns["same-cpu"] and format("%.2f× pipe same-cpu (row 1a)",
    st.median / pipe_ns["same-cpu"]) or "pipe not measured"
  time_row("3c", "`pool:run` of the same, host and workers on one CPU", st,
    { ratio = true, note = "target ≤ 2.0× pipe same-cpu; here " .. note })
end

local function row_pool()
  local n, w = count(20000), count(2000)
  progress("row 3: pool:run sequential, direct and through child → root")
  local st = timeit(n, w, function()
    local ok, v = pool2:run(trivial)
    if v ~= 2 then check(ok, v, 2, "pool:run") end
  end)
  local vs = {}
  for _, pl in ipairs({ "cross-cpu", "same-cpu" }) do
    if pipe_ns[pl] then vs[#vs + 1] = format("%.1f× pipe %s", st.median / pipe_ns[pl], pl) end
  end
  time_row("3a", "`pool:run` of the same, 2-worker pool, sequential", st,
    { ratio = true, note = "target: median ≤ 15 µs and ≤ 3× pipe RTT; here " ..
      (#vs > 0 and table.concat(vs, ", ") or "pipe not measured") })
  st = timeit(n, w, function()
    local ok, v = child:run(trivial)
    if v ~= 2 then check(ok, v, 2, "child:run") end
  end)
  time_row("3b", "`pool:run` through delegation child → root (2 workers)", st,
    { ratio = true })
  row_pool_one_cpu(n, w)
  return st
end

local function row_throughput()
  local batches, size = count(30), 1000
  progress("row 4: throughput, %d batches of %d jobs on a 2-worker pool", batches, size)
  local opts = { pool_timeout = 60000 }
  local function batch()
    local jobs = {}
    for i = 1, size do
      jobs[i] = assert(pool2:async(trivial, opts))
    end
    for i = 1, size do
      local ok, v = jobs[i]:await()
      if v ~= 2 then check(ok, v, 2, "async/await") end
    end
  end
  for _ = 1, 2 do batch() end
  local st, overall = batch_rates(batch, batches, size)
  add({ id = "4", name = format("throughput, 2-worker pool, async + await in batches of %d", size),
    kind = "rate", n = st.n, min = st.min, median = st.median, p99 = st.max,
    note = format("jobs/s per batch: min = slowest batch, p99 column = fastest; overall %.0f /s; target ≥ 40000 /s",
      overall) })
  -- The same with exactly two in flight (no queue): the latency-bound rate.
  local function pair_batch()
    for _ = 1, size / 2 do
      local a = assert(pool2:async(trivial))
      local b = assert(pool2:async(trivial))
      check(a:await())
      check(b:await())
    end
  end
  st = batch_rates(pair_batch, batches, size)
  add({ id = "4b", name = "throughput, 2-worker pool, exactly 2 in flight (async pairs)",
    kind = "rate", n = st.n, min = st.min, median = st.median, p99 = st.max,
    note = "as row 4" })
end

local function row_timeout()
  local n = count(200)
  progress("rows 6, 7: max_ms = 10 on an endless loop, %d times on a 1-worker pool", n)
  local p1 = handler.pool({ max_workers = 1 })
  local pidfile = os.tmpname()
  local function spin()
    local f = io.open("/proc/self/stat", "r")
    local pid = f:read("*n")
    f:close()
    f = io.open(pidfile, "w")
    f:write(pid)
    f:close()
    while true do end
  end
  local ret, gone, recov = {}, {}, {}
  local at_return, not_found, wrong = 0, 0, 0
  local opts = { max_ms = 10 }
  check(p1:run(trivial))
  for i = 1, n + 3 do
    os.remove(pidfile)
    local before = handler._core.procs()
    local t0 = now()
    local ok, err = p1:run(spin, opts)
    local t1 = now()
    -- Which worker ran it: the pid it wrote, else the one that disappeared.
    local f = io.open(pidfile, "r")
    local pid = f and f:read("*n")
    if f then f:close() end
    if pid == nil then
      local after = {}
      for _, q in ipairs(handler._core.procs()) do after[q] = true end
      for _, q in ipairs(before) do if not after[q] then pid = q end end
    end
    local dead = pid ~= nil and not util.alive(pid)
    local t2 = t1
    if pid ~= nil and not dead then
      local deadline = t1 + 5e9
      repeat t2 = now() until not util.alive(pid) or t2 > deadline
    end
    if ok or type(err) ~= "table" or err.type ~= "Timeout" then wrong = wrong + 1 end
    -- Row 7: the next job after the kill.
    local t3 = now()
    check(p1:run(trivial))
    local t4 = now()
    if i > 3 then
      ret[#ret + 1] = t1 - t0
      recov[#recov + 1] = t4 - t3
      if pid == nil then
        not_found = not_found + 1
      else
        gone[#gone + 1] = t2 - t0
        if dead then at_return = at_return + 1 end
      end
    end
  end
  os.remove(pidfile)
  p1:close()
  local st = summary(ret)
  time_row("6a", "`max_ms = 10` on `while true do end`: call returns after", st,
    { ratio = st.median / 10e6, note = format("× the 10 ms limit; target: median ≤ 11 ms%s",
      wrong > 0 and format("; %d outcomes were not Timeout", wrong) or "") })
  st = summary(gone)
  time_row("6b", "… worker process gone (no /proc entry or zombie) after", st,
    { ratio = st.median / 10e6, note = format("already gone at return: %d/%d (%.0f%%)%s",
      at_return, #gone, 100 * at_return / math.max(1, #gone),
      not_found > 0 and format("; pid not found %d times", not_found) or "") })
  time_row("7", "next `pool:run` after the kill (1-worker pool)", summary(recov),
    { ratio = true, note = "target ≤ 1 ms" })
end

-- Row 6c: max_heap_bytes = 16 MiB on a loop that allocates small tables
-- without end: the call returns OOM after about the time the allocation
-- itself takes. The reference: plain LuaJIT allocating the same tables,
-- in this process, stopped once its heap has grown by as much.
local function row_oom()
  local n = count(40)
  local cap = 16 * 2^20
  progress("row 6c: max_heap_bytes = 16 MiB on a loop of small tables, %d times", n)
  local p1 = handler.pool({ max_workers = 1 })
  local function grow()
    local t = {}
    for i = 1, 1e9 do t[i] = { i } end
  end
  check(p1:run(trivial))
  local ret, wrong = {}, 0
  for i = 1, n + 2 do
    local t0 = now()
    local ok, err = p1:run(grow, { max_heap_bytes = cap, max_ms = 10000 })
    local t1 = now()
    if ok or type(err) ~= "table" or err.type ~= "OOM" then wrong = wrong + 1 end
    if i > 2 then ret[#ret + 1] = t1 - t0 end
  end
  p1:close()
  local plain = {}
  for _ = 1, 5 do
    collectgarbage()
    local base = collectgarbage("count")
    local t0 = now()
    local t = {}
    for i = 1, 1e9 do
      t[i] = { i }
      if i % 4096 == 0 and (collectgarbage("count") - base) * 1024 > cap then break end
    end
    plain[#plain + 1] = now() - t0
    t = nil
  end
  local ref = summary(plain)
  local st = summary(ret)
  time_row("6c", "`max_heap_bytes = 16 MiB` on a loop of small tables: OOM returned after", st,
    { ratio = st.median / ref.median, note = format("× plain LuaJIT growing its heap as much "
      .. "(%.1f ms, this process)%s", ref.median / 1e6,
      wrong > 0 and format("; %d outcomes were not OOM", wrong) or "") })
end

local function row_memory(mem)
  progress("row 8: memory")
  -- Let every worker finish building its next state.
  sleep_ms(200)
  local procs = handler._core.procs()
  local rss, pss = {}, {}
  for _, pid in ipairs(procs) do
    local r, p = util.mem_kb(pid)
    if r then rss[#rss + 1], pss[#pss + 1] = r, p end
  end
  local r, p = summary(rss), summary(pss)
  add({ id = "8a", name = "idle worker RSS", kind = "mem", n = r.n, min = r.min,
    median = r.median, p99 = r.max, note = "over the live workers; p99 column = max; target ≤ 2 MB" })
  add({ id = "8b", name = "idle worker PSS", kind = "mem", n = p.n, min = p.min,
    median = p.median, p99 = p.max, note = "p99 column = max" })
  local sr, sp
  if procs.supervisor then sr, sp = util.mem_kb(procs.supervisor) end
  add({ id = "8c", name = "supervisor RSS / PSS", kind = "text", n = 1,
    median = sr and format("%.2f / %.2f MB", sr / 1024, sp / 1024) or "?" })
  local hb, ha = mem.host_before, mem.host_after
  local hm = mem.host_mid
  add({ id = "8d", name = format("host RSS before → after %d → after %d jobs (row 2)",
    mem.jobs_mid or 0, mem.jobs or 0), kind = "text", n = 1,
    median = hb and ha and format("%.2f → %.2f → %.2f MB", hb / 1024, hm / 1024, ha / 1024) or "?",
    note = hb and ha and format("growth %+d kB, then %+d kB; host Lua heap %.0f → %.0f kB; " ..
      "host fds %d → %d", hm - hb, ha - hm, mem.lua_before, mem.lua_after,
      mem.fds_before, mem.fds_after) or "" })
end

local function row_transfer(st_trivial)
  progress("row 9: transfer")
  local big = { max_heap_bytes = 1024 * 2^20, max_result_bytes = 1024 * 2^20 }
  -- A 10 MB string of varied bytes, built in the host.
  local MB10 = 10 * 2^20
  local parts, seed = {}, 12345
  for i = 1, 4096 do
    local chunk = {}
    for j = 1, 256 do
      seed = (seed * 1103515245 + 12345) % 2147483648
      chunk[j] = string.char(seed % 256)
    end
    parts[i] = table.concat(chunk)
  end
  local unit = table.concat(parts) -- 1 MiB
  local s = string.rep(unit, 10)
  assert(#s == MB10)
  local n = count(30)
  local st = timeit(n, 3, function()
    local ok, v = pool2:run(function() return #s end, big)
    check(ok, v, MB10, "string in")
  end)
  local function gbs(t) return format("%.2f GB/s (10 MiB / median call)", MB10 / t) end
  time_row("9a", "10 MiB string host → worker (upvalue), whole call", st,
    { ratio = bulk_ns and st.median / bulk_ns, note = gbs(st.median) .. "; target ≥ 2 GB/s" })
  -- The job builds its string with table.concat, a memcpy per piece:
  -- LuaJIT's string.rep copies byte by byte (8.6 ms for these 10 MiB, where
  -- table.concat takes 0.55 ms), which would measure LuaJIT, not the way
  -- back.
  st = timeit(n, 3, function()
    local ok, v = pool2:run(function()
      return table.concat({ unit, unit, unit, unit, unit, unit, unit, unit, unit, unit })
    end, big)
    if not ok or #v ~= MB10 then check(ok, v, nil, "string out") end
  end)
  time_row("9b", "10 MiB string worker → host (result), whole call", st,
    { ratio = bulk_ns and st.median / bulk_ns, note = gbs(st.median) .. "; includes 9c; target ≥ 2 GB/s" })
  st = timeit(n, 3, function()
    local ok, v = pool2:run(function()
      return #table.concat({ unit, unit, unit, unit, unit, unit, unit, unit, unit, unit })
    end, big)
    check(ok, v, MB10, "string build")
  end)
  time_row("9c", "(reference: the job builds the 10 MiB string, returns its length)", st,
    { note = "the 1 MiB `unit` travels in as an upvalue" })

  local N = 100000
  local recs = {}
  for i = 1, N do recs[i] = { id = i, name = "x" .. i } end
  local nt = count(15)
  -- Row 9h, the reference of rows 9d and 9e: LuaJIT's own serializer
  -- (string.buffer) encodes and decodes the same records in this process.
  -- Each sample runs in the GC state the samples before it left, as the
  -- host's decoding of a reply does.
  local sbuf_ok, sbuf = pcall(require, "string.buffer")
  local ref_ns, enc_st, dec_st
  if sbuf_ok then
    local bytes = sbuf.encode(recs)
    enc_st = timeit(nt, 2, function() sbuf.encode(recs) end)
    dec_st = timeit(nt, 2, function()
      if #sbuf.decode(bytes) ~= N then error("string.buffer: bad decode") end
    end)
    ref_ns = enc_st.median + dec_st.median
  end
  -- Rows 9d and 9e: a median over the reference, against the bound of 1.5.
  local function vs_ref(ns, what)
    if not ref_ns then return "string.buffer not available" end
    local r = ns / ref_ns
    return format("%s %.2f× row 9h; target ≤ 1.5×: %s", what, r, r <= 1.5 and "met" or "NOT met")
  end
  st = timeit(nt, 2, function()
    local ok, v = pool2:run(function() return #recs end, big)
    check(ok, v, N, "table in")
  end)
  time_row("9d", "100,000 records `{id=i, name=\"x\"..i}` host → worker (upvalue)", st,
    { note = vs_ref(st.median, "whole call") })
  st = timeit(nt, 2, function()
    local ok, v = pool2:run(function()
      local t = {}
      for i = 1, N do t[i] = { id = i, name = "x" .. i } end
      return t
    end, big)
    if not ok or #v ~= N then check(ok, v, nil, "table out") end
  end)
  local r9e = time_row("9e", "100,000 records worker → host (result)", st)
  st = timeit(nt, 2, function()
    local ok, v = pool2:run(function()
      local t = {}
      for i = 1, N do t[i] = { id = i, name = "x" .. i } end
      return #t
    end, big)
    check(ok, v, N, "table build")
  end)
  time_row("9f", "(reference: the job builds the 100,000 records, returns the count)", st)
  r9e.note = "includes 9f; " .. vs_ref(r9e.median - st.median, "9e − 9f")
  if ref_ns then
    time_row("9h", "(reference: string.buffer encode + decode of the 100,000 records, one process)",
      { n = nt, min = enc_st.min + dec_st.min, median = ref_ns, p99 = enc_st.p99 + dec_st.p99 },
      { note = format("encode %.2f ms + decode %.2f ms (medians); the bound of 9d and 9e − 9f is 1.5× this",
        enc_st.median / 1e6, dec_st.median / 1e6) })
  end

  local t1000 = {}
  for i = 1, 1000 do t1000[i] = i * 2 end
  st = timeit(count(5000), count(500), function()
    local ok, v = pool2:run(function() return #t1000 end)
    check(ok, v, 1000, "closure")
  end)
  time_row("9g", "`pool:run` of a closure capturing a 1,000-number table", st,
    { ratio = true, note = st_trivial and format("%+.1f µs over row 3a's median; target ≤ +15 µs: %s",
      (st.median - st_trivial) / 1e3, st.median - st_trivial <= 15e3 and "met" or "NOT met") or nil })
end

---------------------------------------------------------------------------
-- Main.

local function machine_note()
  local load = (util.read_file("/proc/loadavg") or ""):match("^(%S+ %S+ %S+)")
  progress("load average before the run: %s", load or "?")
  return load
end

-- CPU time of the whole machine: { total, steal } in jiffies.
local function cpu_times()
  local l = (util.read_file("/proc/stat") or ""):match("^cpu%s+([^\n]*)")
  local v, total = {}, 0
  for n in (l or ""):gmatch("%d+") do v[#v + 1] = tonumber(n) total = total + n end
  return { total = total, steal = v[8] or 0, idle = (v[4] or 0) + (v[5] or 0) }
end

local function machine()
  local cpu = (util.read_file("/proc/cpuinfo") or ""):match("model name%s*:%s*([^\n]*)") or "?"
  local kernel = (util.read_file("/proc/sys/kernel/osrelease") or "?"):gsub("%s+$", "")
  local ncpu = 0
  for _ in (util.read_file("/proc/cpuinfo") or ""):gmatch("\nprocessor%s*:") do ncpu = ncpu + 1 end
  if (util.read_file("/proc/cpuinfo") or ""):match("^processor") then ncpu = ncpu + 1 end
  return format("%d CPUs (%s), Linux %s, %s", ncpu, cpu, kernel, jit.version)
end

local load = machine_note()
local cpu0 = cpu_times()
-- Row 11: inside nginx (spec/support/nginx.lua starts it: one worker, the
-- module loaded in init_by_lua). 11a times each trivial handler.run from a
-- content handler, inside the request: the wait yields the light thread and
-- a cosocket woken by the core's bell resumes it. Against row 2 (the same
-- call in this plain LuaJIT process), same run. 11b and 11c: whole HTTP
-- requests, one at a time, with and without such a job.
local function row_nginx()
  local loaded, nginx = pcall(require, "spec.support.nginx")
  if not loaded or not nginx.available() then
    progress("row 11: skipped (%s)", loaded and select(2, nginx.available()) or tostring(nginx))
    return
  end
  local http = require("spec.support.http")
  local n = count(10000)
  progress("row 11: inside nginx (%d jobs from one content handler, then HTTP requests)", n)
  local srv = nginx.start({ workers = 1, init = [[require("handler")]], server = [[
    location = /bench {
      content_by_lua_block {
        local ffi = require("ffi")
        pcall(ffi.cdef, "typedef struct { long s, ns; } hd_bts; int clock_gettime(int, hd_bts *);")
        local ts = ffi.new("hd_bts")
        local function now()
          ffi.C.clock_gettime(1, ts)
          return tonumber(ts.s) * 1e9 + tonumber(ts.ns)
        end
        local handler = require("handler")
        local n = tonumber(ngx.var.arg_n)
        local function f() return 1 + 1 end
        for _ = 1, math.min(n, 2000) do handler.run(f) end
        local out = {}
        for i = 1, n do
          local t0 = now()
          local ok, v = handler.run(f)
          out[i] = now() - t0
          if v ~= 2 then error("unexpected outcome " .. tostring(v)) end
        end
        ngx.print(table.concat(out, " "))
      }
    }
    location = /job { content_by_lua_block { local ok, v = require("handler").run(function() return 1 + 1 end) ngx.print(v) } }
    location = /nojob { content_by_lua_block { ngx.print(2) } }
  ]] })
  local ok, err = pcall(function()
    local list = {}
    for x in srv:get_ok("/bench?n=" .. n, 600000):gmatch("%d+") do list[#list + 1] = tonumber(x) end
    local st = summary(list)
    local plain
    for _, r in ipairs(rows) do
      if r.id == "2" then plain = r.median end
    end
    time_row("11a", "`handler.run` trivial from an nginx content handler (the wait yields), sequential", st,
      { ratio = true, note = plain and format("row 2 (plain LuaJIT, this run) %.1f µs: +%.1f µs; target ≤ +100 µs",
        plain / 1e3, (st.median - plain) / 1e3) or "row 2 not measured" })
    local reqs = count(3000)
    for _, c in ipairs({ { "11b", "/job", "HTTP GET running that job, one request at a time (luv client)" },
                         { "11c", "/nojob", "HTTP GET of the same handler without the job" } }) do
      local r = http.load({ port = srv.port, requests = { { path = c[2], count = reqs } },
        concurrency = 1, timeout_ms = 600000 })
      if #r.failed > 0 then error(c[2] .. ": " .. http.describe_failures(r.failed)) end
      local ns = {}
      for i, us in ipairs(r.latencies) do ns[i] = us * 1e3 end
      time_row(c[1], c[3], summary(ns), { ratio = true })
    end
  end)
  srv:stop()
  if not ok then error(err, 0) end
end

-- Row 12: the handler map command on generated customer records
-- (examples/pipeline), clean and with 0.5 % poisoned records, against the
-- same transform in one plain LuaJIT process (no isolation), same run:
-- 50,000 records, as a pipeline's input file; the clean runs alternate,
-- three each, and their medians are compared.
local function row_pipeline()
  local n = quick and 5000 or 50000
  progress("row 12: handler map, %d records", n)
  local tmp = os.tmpname()
  os.remove(tmp)
  os.execute("mkdir -p " .. tmp)
  -- Runs cmd; returns its wall time in s. `failures_ok`: exit status 1
  -- (some records failed) is expected.
  local function sh(cmd, failures_ok)
    local t0 = now()
    local r = os.execute(cmd)
    local status = type(r) == "number" and (r > 255 and math.floor(r / 256) or r) or (r and 0 or 1)
    if status ~= 0 and not (failures_ok and status == 1) then error("bench: failed: " .. cmd) end
    return (now() - t0) / 1e9
  end
  sh(format("luajit examples/pipeline/gen.lua %d 0 > %s/clean.jsonl", n, tmp))
  sh(format("luajit examples/pipeline/gen.lua %d 0.5 > %s/poison.jsonl", n, tmp))
  local plains, cleans = {}, {}
  for k = 1, 3 do
    plains[k] = sh(format("luajit examples/pipeline/plain.lua examples/pipeline/transform.lua "
      .. "< %s/clean.jsonl > /dev/null 2>&1", tmp))
    cleans[k] = sh(format("luajit bin/handler map examples/pipeline/transform.lua "
      .. "%s/clean.jsonl -j 2 --no-progress > /dev/null 2>&1", tmp))
  end
  table.sort(plains)
  table.sort(cleans)
  local plain, clean = plains[2], cleans[2]
  local poisoned = sh(format("luajit bin/handler map examples/pipeline/transform.lua "
    .. "%s/poison.jsonl -j 2 --max-ms 200 --max-heap 16M --no-progress > /dev/null 2> %s/err",
    tmp, tmp), true)
  local hangs = 0
  for l in io.lines(tmp .. "/err") do
    if l:find('"type":"Timeout"', 1, true) then hangs = hangs + 1 end
  end
  local bound = hangs * 0.2 / 2
  add({ id = "12a", name = "plain LuaJIT, one process, the transform on clean records", kind = "rate",
    n = n, median = n / plain, note = "no isolation; the reference" })
  add({ id = "12b", name = "`handler map` -j 2, clean records (each isolated, its own limits)", kind = "rate",
    n = n, median = n / clean, note = format("%.0f%% of 12a; target ≥ 100%%", 100 * plain / clean) })
  add({ id = "12c", name = "`handler map` -j 2, 0.5 % poisoned, --max-ms 200", kind = "rate",
    n = n, median = n / poisoned, note = format("%d hangs: their bound alone is %.2f s; took %.2f s "
      .. "(%.0f%% of the bound's rate; target ≥ 80%%)", hangs, bound, poisoned,
      100 * bound / poisoned) })
  os.execute("rm -rf " .. tmp)
end

-- Row 13: past one machine. The same trivial jobs (`function(i) return i *
-- 2 end`, each its own entry) through a local pool:map (2 workers), then
-- through Redis Streams: a redis-server started here (spec/support/redis.lua,
-- no persistence) and `handler serve` consumers on this machine, one with
-- -j 2, then two with -j 1 each (the same 2 workers). Timed from the first
-- XADD (all pipelined) to the last outcome in the results stream.
local function row_remote()
  local n = quick and 4000 or 20000
  progress("row 13: %d entries: pool:map, one and two handler serve consumers", n)
  local redis = require("spec.support.redis")
  local remote = require("handler.remote")
  local core = handler._core
  local job = function(i) return i * 2 end
  local t0 = now()
  local got = 0
  for _, ok, v in pool2:map(job, (function() local k = 0 return function()
    k = k + 1
    if k <= n then return k end
  end end)()) do
    if ok and v then got = got + 1 end
  end
  local local_s = (now() - t0) / 1e9
  if got ~= n then error("bench: row 13a: " .. got .. " of " .. n) end
  local srv = redis.start()
  local ok, err = pcall(function()
    local function through(stream, consumers)
      local cs = {}
      for i = 1, #consumers do
        cs[i] = redis.consumer(srv, { "--stream", stream, "-j", tostring(consumers[i]),
          "--no-progress", "--consumer", stream .. i })
      end
      for _, c in ipairs(cs) do
        local deadline = now() + 10e9
        while not c:output():find(" reads ", 1, true) do
          if now() > deadline then error("bench: a consumer does not start: " .. c:output()) end
          os.execute("sleep 0.01")
        end
      end
      local conn = remote.connect("127.0.0.1", srv.port)
      local cmds = {}
      for i = 1, n do
        cmds[i] = { "XADD", stream, "*", "format", remote.FORMAT, "proto", remote.PROTOCOL,
          "build", remote.BUILD, "fn", core.encode_job(job, i) }
      end
      local start = now()
      for i = 1, n, 1000 do
        assert(conn:pipeline({ unpack(cmds, i, math.min(n, i + 999)) }))
      end
      while tonumber(conn:call("XLEN", stream .. ":results")) < n do
        os.execute("sleep 0.005")
      end
      local took = (now() - start) / 1e9
      conn:close()
      for _, c in ipairs(cs) do
        if c:stop() ~= "exit 0" then error("bench: a consumer did not stop cleanly") end
      end
      return took
    end
    local one = through("one", { 2 })
    local two = through("two", { 1, 1 })
    add({ id = "13a", name = "local `pool:map`, 2 workers, trivial jobs", kind = "rate", n = n,
      median = n / local_s, note = "the reference" })
    add({ id = "13b", name = "`handler serve` -j 2, one consumer, entries from Redis Streams",
      kind = "rate", n = n, median = n / one,
      note = format("%.0f%% of 13a; each entry: XADD, XREADGROUP, a job, the outcome script", 100 * local_s / one) })
    add({ id = "13c", name = "two `handler serve` consumers, -j 1 each, the same stream",
      kind = "rate", n = n, median = n / two, note = format("%.0f%% of 13a, %.0f%% of 13b",
        100 * local_s / two, 100 * one / two) })
  end)
  redis.stop_all()
  if not ok then error(err, 0) end
end

-- Row 10: sandboxed workers, each in namespaces and a file system of its
-- own. The strict profile reuses its workers; the "syscalls" one (the FFI
-- at hand) takes a fresh process per job, so its cost per job includes a
-- worker's start-up: clone into the namespaces, the jail, the seccomp
-- filter, the hello.
local function row_sandboxed()
  local n, w = count(2000), count(200)
  progress("row 10: sandboxed jobs: strict (reused), syscalls (a process per job), start-up")
  local strict = handler.pool({ name = "bench_strict", max_workers = 2, sandbox = true })
  local sys = handler.pool({ name = "bench_syscalls", max_workers = 2, sandbox = "syscalls" })
  local st = timeit(n, w, function()
    local ok, v = strict:run(trivial)
    if v ~= 2 then check(ok, v, 2, "strict:run") end
  end)
  time_row("10a", "`pool:run` trivial, strict profile (workers reused), sequential", st,
    { ratio = true })
  st = timeit(n, w, function()
    local ok, v = sys:run(trivial)
    if v ~= 2 then check(ok, v, 2, "syscalls:run") end
  end)
  time_row("10b", "`pool:run` trivial, \"syscalls\" profile (a fresh process per job), sequential",
    st, { ratio = true })
  local batches, size = count(20), 200
  local function batch()
    local jobs = {}
    for i = 1, size do jobs[i] = assert(sys:async(trivial, { pool_timeout = 60000 })) end
    for i = 1, size do
      local ok, v = jobs[i]:await()
      if v ~= 2 then check(ok, v, 2, "syscalls async") end
    end
  end
  local r, overall = batch_rates(batch, batches, size)
  add({ id = "10c", name = format("throughput, \"syscalls\" profile, 2 workers, batches of %d", size),
    kind = "rate", n = r.n, min = r.min, median = r.median, p99 = r.max,
    note = format("a process per job; overall %.0f /s; p99 column = fastest batch", overall) })
  strict:close()
  sys:close()
  -- Start-up: the first job of a new pool (spawn → hello → the job), for a
  -- jailed worker and, beside it, an ordinary one (a plain fork).
  for _, c in ipairs({ { "10d", true, "strict profile: namespaces, jail, filter" },
    { "10e", false, "not sandboxed: a plain fork" } }) do
    st = timeit(count(300), count(20), function()
      local p = handler.pool({ max_workers = 1, sandbox = c[2] })
      local ok, v = p:run(trivial)
      p:close()
      if v ~= 2 then check(ok, v, 2, "first job") end
    end)
    time_row(c[1], "a new worker's first job (spawn → hello → job → reply), " .. c[3], st)
  end
end

local t_start = now()
assert(floor_bin, "bench.lua: --floor PATH is required (use bench/run)")
if wanted(1) then row_floor() end
local cold = wanted(5) and row_cold() or nil

handler = require("handler")
pool2 = handler.pool({ max_workers = 2 })
root = handler.pool({ name = "bench_root", max_workers = 2 })
child = handler.pool({ name = "bench_child", delegate_to = root })

local mem = {}
if wanted(2) or wanted(8) then row_sequential(mem) end
local st3
if wanted(3) or wanted(9) then
  -- 9g compares with 3a; run 3 quietly when only 9 is wanted.
  local n0 = #rows
  row_pool()
  for _, r in ipairs(rows) do if r.id == "3a" then st3 = r.median end end
  if not wanted(3) then for i = #rows, n0 + 1, -1 do table.remove(rows, i) end end
end
if wanted(4) then row_throughput() end
if cold then for _, r in ipairs(cold) do add(r) end end
if wanted(6) or wanted(7) then row_timeout() end
if wanted(6) then row_oom() end
if wanted(8) then row_memory(mem) end
if wanted(9) then row_transfer(st3) end
if wanted(10) then row_sandboxed() end
if wanted(11) then row_nginx() end
if wanted(12) then row_pipeline() end
if wanted(13) then row_remote() end

pool2:close()
child:close()
root:close()

-- Rows in issue order.
local order = {}
for i, r in ipairs(rows) do order[r] = i end
table.sort(rows, function(a, b)
  local na, nb = tonumber(a.id:match("^%d+")), tonumber(b.id:match("^%d+"))
  if na ~= nb then return na < nb end
  return order[a] < order[b]
end)
print_table()
io.stdout:write(format("\n× floor: median / median of the %s, measured in this run%s.\n",
  FLOOR_NAME, floor_ns and format(" (%.2f µs)", floor_ns / 1e3) or " (not measured)"))
io.stdout:write("Rows 1g, 9a, 9b: × row 1g (10 MiB over a socketpair). Rows 5b–5e: × the bare luajit\n" ..
  "process (5a). Rows 6a, 6b: × the 10 ms limit. Rows 4, 8, 9c–9f, 9h have no floor.\n")
local cpu1 = cpu_times()
local dt = math.max(1, cpu1.total - cpu0.total)
io.stdout:write(format("%s. Load average before the run: %s; during it the machine was %.0f%% idle, " ..
  "%.1f%% stolen by the hypervisor. Suite wall time: %.0f s%s.\n", machine(), load or "?",
  100 * (cpu1.idle - cpu0.idle) / dt, 100 * (cpu1.steal - cpu0.steal) / dt,
  (now() - t_start) / 1e9, quick and " (--quick: counts / 10)" or ""))
