-- metrics_spec.lua: handler.metrics() (docs/API.md, "Metrics"): the pools'
-- counters, gauges and histograms of job times as Prometheus text, read
-- back by a strict parser of the text format: every family once with its
-- HELP and TYPE, counts per outcome exact, histograms cumulative and whole,
-- times where jobs of known length put them, label values escaped.
local handler = require("handler")
local H = require("spec.support.helpers")

local format, concat, sort = string.format, table.concat, table.sort
local ipairs, pairs, next, select, tonumber = ipairs, pairs, next, select, tonumber
local huge = math.huge

local KiB = 1024

---------------------------------------------------------------------------
-- A parser of the text exposition format (0.0.4), strict about what the
-- format allows: a line is a comment or `name{label="value",...} value`.

local TYPES = { counter = true, gauge = true, histogram = true, summary = true, untyped = true }
local UNESCAPE = { ["\\"] = "\\", ['"'] = '"', n = "\n" }

-- A sample value: a Go float, or +Inf, -Inf, NaN. Returns the number.
local function parse_value(s, line)
  if s == "+Inf" then return huge end
  if s == "-Inf" then return -huge end
  if s == "NaN" then return 0 / 0 end
  assert(s:match("^[-+]?%d*%.?%d*[eE]?[-+]?%d*$") and s:match("%d") and tonumber(s),
    format("bad value %q in: %s", s, line))
  return tonumber(s)
end

-- The labels of a sample line from position i (at "{"): a table, and the
-- position after "}".
local function parse_labels(line, i)
  local labels = {}
  i = i + 1
  if line:sub(i, i) == "}" then return labels, i + 1 end
  while true do
    local name, after = line:match("^([%a_][%w_]*)=\"()", i)
    assert(name, format("bad label at column %d of: %s", i, line))
    assert(labels[name] == nil, "label " .. name .. " twice in: " .. line)
    i = after
    local value = {}
    while true do
      local c = line:sub(i, i)
      assert(c ~= "", "unterminated label value in: " .. line)
      if c == '"' then
        i = i + 1
        break
      elseif c == "\\" then
        local e = UNESCAPE[line:sub(i + 1, i + 1)]
        assert(e, "bad escape in: " .. line)
        value[#value + 1] = e
        i = i + 2
      else
        value[#value + 1] = c
        i = i + 1
      end
    end
    labels[name] = concat(value)
    local c = line:sub(i, i)
    if c == "}" then return labels, i + 1 end
    assert(c == ",", "expected , or } in: " .. line)
    i = i + 1
  end
end

-- A series' key: its name and its labels, sorted.
local function series_key(name, labels)
  local keys = {}
  for k in pairs(labels) do keys[#keys + 1] = k end
  sort(keys)
  local parts = { name }
  for _, k in ipairs(keys) do parts[#parts + 1] = k .. "=" .. labels[k] end
  return concat(parts, "\0")
end

-- The family a sample belongs to: a histogram's _bucket, _sum and _count
-- are its own.
local function family_of(families, name)
  for _, suffix in ipairs({ "_bucket", "_sum", "_count" }) do
    local base = name:match("^(.*)" .. suffix .. "$")
    if base and families[base] and families[base].type == "histogram" then return base end
  end
  return name
end

--- Parses text; returns { families = { [name] = { type, help, samples } },
-- order = names in order, samples = every { name, labels, value, raw } }.
-- Fails on anything the format does not allow, on a family described twice
-- or without TYPE before its samples, on a family's samples split by
-- another's, and on a series given twice.
local function parse(text)
  assert.are.equal("\n", text:sub(-1), "the text ends with a newline")
  local families, order, samples, series = {}, {}, {}, {}
  local current, done = nil, {}
  local function family(name)
    local f = families[name]
    if f == nil then
      f = { samples = {} }
      families[name] = f
      order[#order + 1] = name
    end
    return f
  end
  for line in text:gmatch("([^\n]*)\n") do
    assert(line ~= "", "an empty line")
    if line:sub(1, 1) == "#" then
      local kw, name, rest = line:match("^# (%u+) ([%a_:][%w_:]*) (.*)$")
      if kw == "HELP" or kw == "TYPE" then
        local f = family(name)
        assert(not done[name] and #f.samples == 0, kw .. " after the samples of " .. name)
        if kw == "HELP" then
          assert(f.help == nil, "HELP twice for " .. name)
          assert(rest ~= "", "empty HELP for " .. name)
          f.help = rest
        else
          assert(f.type == nil, "TYPE twice for " .. name)
          assert(TYPES[rest], "bad TYPE " .. rest .. " for " .. name)
          f.type = rest
        end
      end
    else
      local name, i = line:match("^([%a_:][%w_:]*)()")
      assert(name, "not a sample: " .. line)
      local labels = {}
      if line:sub(i, i) == "{" then labels, i = parse_labels(line, i) end
      local raw = line:match("^ (%S+)$", i)
      assert(raw, "expected one space and a value (no timestamp) in: " .. line)
      local base = family_of(families, name)
      local f = families[base]
      assert(f and f.type, "a sample of " .. base .. " before its TYPE")
      assert(not done[base], "the samples of " .. base .. " are split")
      if current ~= base then
        if current then done[current] = true end
        current = base
      end
      local key = series_key(name, labels)
      assert(not series[key], "a series twice: " .. line)
      series[key] = true
      local s = { name = name, labels = labels, value = parse_value(raw, line), raw = raw }
      f.samples[#f.samples + 1] = s
      samples[#samples + 1] = s
    end
  end
  return { families = families, order = order, samples = samples }
end

-- The value of the sample `name` with exactly `labels`, or nil.
local function value(m, name, labels)
  local key = series_key(name, labels)
  for _, s in ipairs(m.samples) do
    if series_key(s.name, s.labels) == key then return s.value, s.raw end
  end
  return nil
end

-- The parsed metrics now.
local function scrape()
  return parse(handler.metrics())
end

---------------------------------------------------------------------------
-- What every scrape must have.

local FAMILIES = {
  handler_jobs_total = "counter",
  handler_jobs_started_total = "counter",
  handler_processes_started_total = "counter",
  handler_jobs_running = "gauge",
  handler_jobs_queued = "gauge",
  handler_processes = "gauge",
  handler_memory_committed_bytes = "gauge",
  handler_max_workers = "gauge",
  handler_max_memory_bytes = "gauge",
  handler_job_queue_seconds = "histogram",
  handler_job_run_seconds = "histogram",
}

local OUTCOMES = { "succeeded", "timeout", "oom", "error", "exit", "killed", "other",
  "rejected_no_workers", "rejected_insufficient_memory", "rejected_pool_timeout" }

-- The le labels of every histogram: the core's bounds, then +Inf.
local function le_labels()
  local out = {}
  for i, b in ipairs(handler._core.time_bounds) do out[i] = b end
  out[#out + 1] = huge
  return out
end

--- The histogram `family` of the pool labelled `pool`: asserts its buckets
-- are the core's bounds in order, cumulative (never decreasing), whole
-- numbers, with +Inf equal to _count; returns { [le] = count }, sum, count.
local function histogram(m, family, pool)
  local f = m.families[family]
  local les, got = le_labels(), {}
  for _, s in ipairs(f.samples) do
    if s.name == family .. "_bucket" and s.labels.pool == pool then
      got[#got + 1] = s
    end
  end
  assert.are.equal(#les, #got, family .. " buckets of " .. pool)
  local buckets, prev = {}, 0
  for i, s in ipairs(got) do
    local le = tonumber(s.labels.le) or (s.labels.le == "+Inf" and huge)
    assert.are.equal(les[i], le, family .. " bucket " .. i .. " of " .. pool)
    assert.is_truthy(s.raw:match("^%d+$"), "a count is a whole number: " .. s.raw)
    assert(s.value >= prev, format("%s{pool=%q} is not cumulative at le=%s", family, pool,
      s.labels.le))
    prev = s.value
    buckets[le] = s.value
  end
  local sum = value(m, family .. "_sum", { pool = pool })
  local count = value(m, family .. "_count", { pool = pool })
  assert.is_number(sum)
  assert.are.equal(count, buckets[huge], family .. ": +Inf is _count")
  return buckets, sum, count
end

-- Asserts what every scrape must be: each family once, with HELP and TYPE,
-- each pool in each, every outcome of handler_jobs_total, the histograms
-- whole. Returns the parsed metrics.
local function check(m, pools)
  for name, kind in pairs(FAMILIES) do
    local f = m.families[name]
    assert(f, "no family " .. name)
    assert.are.equal(kind, f.type, name)
    assert.is_string(f.help)
  end
  for _, name in ipairs(m.order) do
    assert(FAMILIES[name], "an unknown family " .. name)
  end
  for _, pool in ipairs(pools or {}) do
    for _, o in ipairs(OUTCOMES) do
      assert.is_number(value(m, "handler_jobs_total", { pool = pool, outcome = o }), pool .. " " .. o)
    end
    for name, kind in pairs(FAMILIES) do
      if kind == "histogram" then
        histogram(m, name, pool)
      elseif name ~= "handler_jobs_total" then
        assert.is_number(value(m, name, { pool = pool }), name .. " of " .. pool)
      end
    end
  end
  return m
end

---------------------------------------------------------------------------
-- Job bodies.

local function spin() while true do end end

-- A job that runs for `s` seconds of CPU, so at least that long.
local function busy(s)
  return function()
    local t = os.clock()
    while os.clock() - t < s do end
    return s
  end
end

---------------------------------------------------------------------------

describe("handler.metrics", function()
  H.leak_checked()

  local made = {}
  local function pool(config)
    local p = handler.pool(config)
    made[#made + 1] = p
    return p
  end

  after_each(function()
    for _, p in ipairs(made) do p:close() end
    made = {}
  end)

  -- The labels of unnamed pools ("#n") in a scrape.
  local function unnamed_labels(m)
    local set = {}
    for _, s in ipairs(m.families.handler_jobs_started_total.samples) do
      if s.labels.pool:match("^#%d+$") then set[s.labels.pool] = true end
    end
    return set
  end

  it("is Prometheus text: every family once, with HELP and TYPE, and the default pool", function()
    local text = handler.metrics()
    assert.is_string(text)
    local m = check(parse(text))
    -- The default pool is unnamed: its label is its number.
    assert.is_truthy(next(unnamed_labels(m)))
    for _, s in ipairs(m.samples) do
      if s.name ~= "handler_job_queue_seconds_sum" and s.name ~= "handler_job_run_seconds_sum" then
        -- Counts, gauges and limits are whole numbers, written without an
        -- exponent (a limit may be infinite).
        assert.is_truthy(s.raw:match("^%d+$") or s.raw == "+Inf", s.name .. " " .. s.raw)
      end
    end
  end)

  it("counts each outcome of a named pool exactly, with the gauges and limits", function()
    local p = pool({ name = "metrics_outcomes", max_workers = 2, max_memory_bytes = 1024 * KiB })
    local opts = { max_heap_bytes = 64 * KiB }
    assert.is_true((p:run(function() return 1 end, opts)))
    assert.is_true((p:run(function() return 2 end, opts)))
    assert.are.equal("Timeout", select(2, p:run(spin, { max_heap_bytes = 64 * KiB, max_ms = 50 })).type)
    assert.are.equal("ProcessExit", select(2, p:run(function() error("boom") end, opts)).type)
    assert.are.equal("exit 3", select(2, p:run(function() os.exit(3) end, opts)).reason)
    assert.are.equal("OOM", select(2, p:run(function()
      local t = {}
      for i = 1, 1e6 do t[i] = { i } end
      return #t
    end, opts)).type)
    assert.are.equal("InsufficientMemory",
      select(2, p:run(function() end, { max_heap_bytes = 2048 * KiB })).type)
    -- Both slots taken: one more is turned away, one that waits times out.
    local a = assert(p:async(spin, { max_heap_bytes = 64 * KiB, max_ms = 30000 }))
    local b = assert(p:async(spin, { max_heap_bytes = 64 * KiB, max_ms = 30000 }))
    assert.are.equal("NoWorkersAvailable", select(2, p:async(function() end, opts)).type)
    assert.are.equal("PoolTimeout", select(2, p:run(function() end,
      { max_heap_bytes = 64 * KiB, pool_timeout = 30 })).type)
    local m = check(scrape(), { "metrics_outcomes" })
    assert.are.equal(2, value(m, "handler_jobs_running", { pool = "metrics_outcomes" }))
    assert.are.equal(128 * KiB, value(m, "handler_memory_committed_bytes",
      { pool = "metrics_outcomes" }))
    assert.is_true(p:kill_by_ref(a))
    assert.is_true(p:kill_by_ref(b))
    a:await()
    b:await()

    m = check(scrape(), { "metrics_outcomes" })
    local want = { succeeded = 2, timeout = 1, oom = 1, error = 1, exit = 1, killed = 2, other = 0,
      rejected_no_workers = 1, rejected_insufficient_memory = 1, rejected_pool_timeout = 1 }
    for outcome, n in pairs(want) do
      assert.are.equal(n, value(m, "handler_jobs_total", { pool = "metrics_outcomes",
        outcome = outcome }), outcome)
    end
    local function v(name) return value(m, name, { pool = "metrics_outcomes" }) end
    local s = p:stats()
    assert.are.equal(8, v("handler_jobs_started_total"))
    assert.are.equal(s.processes_started, v("handler_processes_started_total"))
    assert.are.equal(s.processes, v("handler_processes"))
    assert.are.equal(0, v("handler_jobs_running"))
    assert.are.equal(0, v("handler_jobs_queued"))
    assert.are.equal(0, v("handler_memory_committed_bytes"))
    assert.are.equal(2, v("handler_max_workers"))
    assert.are.equal(1024 * KiB, v("handler_max_memory_bytes"))
    -- Every job that ended has a queue time, rejected ones included; every
    -- one that started has a run time.
    local _, _, queued = histogram(m, "handler_job_queue_seconds", "metrics_outcomes")
    local _, _, ran = histogram(m, "handler_job_run_seconds", "metrics_outcomes")
    assert.are.equal(11, queued)
    assert.are.equal(8, ran)
  end)

  it("gives an unnamed pool a label of its own, #n, the same at every scrape", function()
    local before = unnamed_labels(scrape())
    local p = pool({ max_workers = 1 })
    assert.is_true((p:run(function() return 1 end)))
    local label
    for l in pairs(unnamed_labels(scrape())) do
      if not before[l] then
        assert.is_nil(label, "two new unnamed pools")
        label = l
      end
    end
    assert.is_string(label)
    for _ = 1, 2 do
      local m = check(scrape(), { label })
      assert.are.equal(1, value(m, "handler_jobs_total", { pool = label, outcome = "succeeded" }))
      assert.are.equal(1, value(m, "handler_max_workers", { pool = label }))
    end
    -- A closed pool is no longer listed.
    p:close()
    assert.is_nil(unnamed_labels(scrape())[label])
  end)

  it("puts a 200 ms job in the run buckets from 0.25 s up, not at or below 0.1 s", function()
    local p = pool({ name = "metrics_200ms", max_workers = 1 })
    assert.are.same({ true, 0.2 }, { p:run(busy(0.2)) })
    local m = check(scrape(), { "metrics_200ms" })
    local run, sum, count = histogram(m, "handler_job_run_seconds", "metrics_200ms")
    assert.are.equal(1, count)
    assert(sum >= 0.2, "run time sum " .. sum)
    -- Generous: a loaded machine may take longer than 0.25 s, never less than 0.2 s.
    for _, le in ipairs(le_labels()) do
      if le <= 0.1 then assert.are.equal(0, run[le], "le=" .. le) end
      if le >= 2.5 then assert.are.equal(1, run[le], "le=" .. le) end
    end
    -- It did not wait for capacity.
    local queue, _, queued = histogram(m, "handler_job_queue_seconds", "metrics_200ms")
    assert.are.equal(1, queued)
    assert.are.equal(1, queue[2.5])
  end)

  it("counts the wait of a job queued behind another, and of one killed while queued", function()
    local p = pool({ name = "metrics_queue", max_workers = 1 })
    local first = assert(p:async(busy(0.2)))
    local second = assert(p:async(function() return "second" end, { pool_timeout = 30000 }))
    local third = assert(p:async(function() return "third" end, { pool_timeout = 30000 }))
    assert.are.equal(2, p:stats().queued)
    assert.are.equal(2, value(scrape(), "handler_jobs_queued", { pool = "metrics_queue" }))
    assert.is_true(p:kill_by_ref(third))
    assert.are.same({ true, 0.2 }, { first:await() })
    assert.are.same({ true, "second" }, { second:await() })
    assert.is_false((third:await()))

    local m = check(scrape(), { "metrics_queue" })
    local queue, qsum, queued = histogram(m, "handler_job_queue_seconds", "metrics_queue")
    local _, _, ran = histogram(m, "handler_job_run_seconds", "metrics_queue")
    assert.are.equal(3, queued)
    -- The killed one never ran.
    assert.are.equal(2, ran)
    -- The second waited for the rest of the first's 0.2 s: at most the first
    -- and the third (killed at once) are at or below 0.1 s.
    assert(queue[0.1] <= 2, "queue le=0.1: " .. queue[0.1])
    assert(qsum >= 0.15, "queue time sum " .. qsum)
    assert.are.equal(1, value(m, "handler_jobs_total", { pool = "metrics_queue",
      outcome = "killed" }))
  end)

  it("counts a delegated job's times in every pool of its chain, a reject in its own", function()
    local root = pool({ name = "metrics_root", max_workers = 2 })
    local child = pool({ name = "metrics_child", max_workers = 1, max_memory_bytes = 100 * KiB,
      delegate_to = root })
    assert.is_true((child:run(function() return 1 end, { max_heap_bytes = 64 * KiB })))
    assert.are.equal("InsufficientMemory",
      select(2, child:run(function() end, { max_heap_bytes = 200 * KiB })).type)
    local m = check(scrape(), { "metrics_root", "metrics_child" })
    local _, _, child_q = histogram(m, "handler_job_queue_seconds", "metrics_child")
    local _, _, child_r = histogram(m, "handler_job_run_seconds", "metrics_child")
    local _, _, root_q = histogram(m, "handler_job_queue_seconds", "metrics_root")
    local _, _, root_r = histogram(m, "handler_job_run_seconds", "metrics_root")
    assert.are.same({ 2, 1, 1, 1 }, { child_q, child_r, root_q, root_r })
    assert.are.equal(1, value(m, "handler_jobs_total", { pool = "metrics_root",
      outcome = "succeeded" }))
    assert.are.equal(0, value(m, "handler_jobs_total", { pool = "metrics_root",
      outcome = "rejected_insufficient_memory" }))
  end)

  it("escapes a backslash, a double quote and a newline in a pool's name", function()
    local name = 'we"ird\\pool\nname'
    local p = pool({ name = name, max_workers = 1 })
    assert.is_true((p:run(function() end)))
    local text = handler.metrics()
    assert.is_truthy(text:find('{pool="we\\"ird\\\\pool\\nname"} ', 1, true), text)
    local m = check(parse(text), { name })
    assert.are.equal(1, value(m, "handler_jobs_total", { pool = name, outcome = "succeeded" }))
  end)

  it("writes an infinite limit as +Inf", function()
    pool({ name = "metrics_inf", max_memory_bytes = huge })
    local m = check(scrape(), { "metrics_inf" })
    local v, raw = value(m, "handler_max_memory_bytes", { pool = "metrics_inf" })
    assert.are.equal(huge, v)
    assert.are.equal("+Inf", raw)
  end)

  it("starts from zero in a forked child", function()
    local out = H.run_host([[
      local ffi = require("ffi")
      ffi.cdef("int fork(void); int waitpid(int pid, int *st, int opt);")
      local handler = require("handler")
      local p = handler.pool({ name = "forky", max_workers = 1 })
      for _ = 1, 3 do assert(p:run(function() end)) end
      local function counts(who)
        local text = handler.metrics()
        print(who, text:match('handler_job_queue_seconds_count{pool="forky"} (%d+)'),
          text:match('handler_job_run_seconds_count{pool="forky"} (%d+)'),
          text:match('handler_job_run_seconds_bucket{pool="forky",le="%+Inf"} (%d+)'))
        io.stdout:flush()
      end
      counts("parent")
      io.stdout:flush()
      local pid = ffi.C.fork()
      if pid == 0 then
        counts("child")
        assert(p:run(function() end))
        counts("child after")
        os.exit(0, true)
      end
      ffi.C.waitpid(pid, nil, 0)
      counts("parent after")
    ]])
    H.assert_has_all(out, { "parent\t3\t3\t3", "child\t0\t0\t0", "child after\t1\t1\t1",
      "parent after\t3\t3\t3" })
  end)
end)
