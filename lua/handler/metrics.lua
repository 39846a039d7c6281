-- handler.metrics: the pools' counters, gauges and histograms of job times
-- as Prometheus text (exposition format 0.0.4), for handler.metrics().

local format, gsub, concat = string.format, string.gsub, table.concat
local ipairs, tonumber, floor, huge = ipairs, tonumber, math.floor, math.huge

local M = {}

-- A number as Prometheus reads it: a whole number without an exponent,
-- another with the fewest digits that read back as the same double, the
-- infinities as +Inf and -Inf.
local function num(v)
  if v ~= v then return "NaN" end
  if v == huge then return "+Inf" end
  if v == -huge then return "-Inf" end
  if v == floor(v) then return format("%.0f", v) end
  for digits = 15, 16 do
    local s = format("%." .. digits .. "g", v)
    if tonumber(s) == v then return s end
  end
  return format("%.17g", v)
end

-- A label value, escaped as the format wants: backslash, double quote and
-- newline.
local ESCAPES = { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }
local function label(v)
  return (gsub(v, '[\\"\n]', ESCAPES))
end

-- handler_jobs_total's outcomes, and the pool:stats() field of each.
local OUTCOMES = {
  { "succeeded", "succeeded" },
  { "timeout", "failed_timeout" },
  { "cpu_timeout", "failed_cpu_timeout" },
  { "oom", "failed_oom" },
  { "error", "failed_error" },
  { "exit", "failed_exit" },
  { "killed", "killed" },
  { "other", "failed_other" },
  { "rejected_no_workers", "rejected_no_workers" },
  { "rejected_insufficient_memory", "rejected_insufficient_memory" },
  { "rejected_pool_timeout", "rejected_pool_timeout" },
}

-- The families of one sample per pool: name, type, help, pool:stats() field.
local PER_POOL = {
  { "handler_jobs_started_total", "counter", "Jobs that started in a worker.", "started" },
  { "handler_processes_started_total", "counter", "Worker processes started for the pool.",
    "processes_started" },
  { "handler_jobs_running", "gauge", "Jobs running now.", "running" },
  { "handler_jobs_queued", "gauge", "Jobs waiting for capacity now.", "queued" },
  { "handler_processes", "gauge", "Worker processes of the pool alive now.", "processes" },
  { "handler_memory_committed_bytes", "gauge", "The sum of the running jobs' max_heap_bytes.",
    "bytes_committed" },
  { "handler_max_workers", "gauge", "The pool's max_workers.", "max_workers" },
  { "handler_max_memory_bytes", "gauge", "The pool's max_memory_bytes.", "max_memory_bytes" },
}

-- The histograms: name, help, the field of a pool's entry.
local HISTOGRAMS = {
  { "handler_job_queue_seconds",
    "Time from a job's submit to its start, or to its end when it never started.", "queue" },
  { "handler_job_run_seconds", "Time from a job's start in a worker to its end.", "run" },
}

--- render(pools, bounds) -> text. `pools` is a list of { label = name,
-- stats = pool:stats(), queue = hist, run = hist }, a hist being the
-- cumulative counts of each bucket of `bounds` then +Inf, with `sum` and
-- `count` (core.times); `bounds` the buckets' upper bounds in seconds
-- (core.time_bounds).
function M.render(pools, bounds)
  local out, n = {}, 0
  local function put(s)
    n = n + 1
    out[n] = s
  end
  local function header(name, kind, help)
    put(format("# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind))
  end
  local labels = {}
  for i, p in ipairs(pools) do labels[i] = label(p.label) end

  header("handler_jobs_total", "counter", "Jobs that ended, by outcome.")
  for i, p in ipairs(pools) do
    for _, o in ipairs(OUTCOMES) do
      put(format('handler_jobs_total{pool="%s",outcome="%s"} %s\n', labels[i], o[1],
        num(p.stats[o[2]])))
    end
  end

  for _, f in ipairs(PER_POOL) do
    header(f[1], f[2], f[3])
    for i, p in ipairs(pools) do
      put(format('%s{pool="%s"} %s\n', f[1], labels[i], num(p.stats[f[4]])))
    end
  end

  local le = {}
  for i, b in ipairs(bounds) do le[i] = num(b) end
  le[#le + 1] = "+Inf"
  for _, h in ipairs(HISTOGRAMS) do
    local name = h[1]
    header(name, "histogram", h[2])
    for i, p in ipairs(pools) do
      local counts = p[h[3]]
      for k = 1, #le do
        put(format('%s_bucket{pool="%s",le="%s"} %s\n', name, labels[i], le[k], num(counts[k])))
      end
      put(format('%s_sum{pool="%s"} %s\n', name, labels[i], num(counts.sum)))
      put(format('%s_count{pool="%s"} %s\n', name, labels[i], num(counts.count)))
    end
  end
  return concat(out)
end

return M
