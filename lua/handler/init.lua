-- handler: run dangerous Lua closures in worker processes and keep them in check.

-- The core is built for LuaJIT 2.1: under PUC Lua loading it would fail with
-- an obscure missing symbol, so say what is wrong first.
if type(jit) ~= "table" or not tostring(jit.version):find("^LuaJIT 2%.1") then
  error("handler needs LuaJIT 2.1; this is "
    .. (type(jit) == "table" and tostring(jit.version) or _VERSION), 0)
end

local core = require("handler.core")
local errors = require("handler.errors")

local type, error, pairs, ipairs, setmetatable, getmetatable, tostring, format, floor, sort =
  type, error, pairs, ipairs, setmetatable, getmetatable, tostring, string.format, math.floor,
  table.sort
local huge = math.huge
local from_core, reject = errors.from_core, errors.reject
local core_run, core_submit, core_await = core.run, core.submit, core.await

local M = {}

-- Inside nginx (ngx_lua) waiting yields the light thread instead of
-- blocking the nginx worker (handler/ngx.lua).
local ngx_api = rawget(_G, "ngx")
local in_ngx = type(ngx_api) == "table" and type(ngx_api.get_phase) == "function"
  and type(ngx_api.config) == "table" and ngx_api.config.ngx_lua_version ~= nil
local ngx_wait
local function nginx()
  if ngx_wait == nil then ngx_wait = require("handler.ngx") end
  return ngx_wait
end
local function nginx_waitlist()
  return require("handler.waitlist")
end

local DEFAULT_MAX_MS = 60000
local DEFAULT_HEAP = 10 * 1024 * 1024
local DEFAULT_RESULT = 64 * 1024 * 1024
local DEFAULT_IDLE_MS = 10000
local DEFAULT_OUTPUT = 16 * 1024 * 1024

-- Sandbox profiles, as the core's spawn flags: 1 the stripped Lua
-- environment, 2 limits and the seccomp filter. SECURITY.md says what each
-- protects against.
local SANDBOX = { [false] = 0, [true] = 3, strict = 3, syscalls = 2 }
local getenv = os.getenv

-- The flat name, value list the core sends for the env option.
local function env_list(env)
  if env == nil then return nil end
  local list = {}
  for _, name in ipairs(env) do
    local v = getenv(name)
    if v ~= nil then
      list[#list + 1] = name
      list[#list + 1] = v
    end
  end
  for k, v in pairs(env) do
    if type(k) == "string" then
      list[#list + 1] = k
      list[#list + 1] = v
    end
  end
  return list
end

-- Pools by name. A named pool stays here until pool:close().
M.pools = {}

-- Every pool, named or not, and its number in the order they were made,
-- for handler.metrics: an unnamed pool is labelled by it. Weak, so that a
-- pool is collected as if it were not here.
local all_pools = setmetatable({}, { __mode = "k" })
local pools_made = 0

---------------------------------------------------------------------------
-- Option checking: misuse raises at the caller's level, naming the culprit.

local function typename(v)
  local t = type(v)
  if t == "number" and v ~= v then return "nan" end
  return t
end

local function nonneg(v)
  return type(v) == "number" and v == v and v >= 0
end

local function positive(v)
  return type(v) == "number" and v == v and v > 0 and v < huge
end

local function whole(v)
  return nonneg(v) and v == floor(v)
end

-- env: names of the host's variables to pass ({ "PATH", "LANG" }), and/or
-- name = value pairs; workers have no environment otherwise.
local function env_ok(v)
  if type(v) ~= "table" then return false end
  for k, x in pairs(v) do
    if type(k) == "number" then
      if type(x) ~= "string" then return false end
    elseif type(k) ~= "string" or type(x) ~= "string" then
      return false
    end
  end
  return true
end

-- The output option, as the core's modes.
local OUTPUT_MODE = { inherit = 0, capture = 1, discard = 2 }

local RUN_OPTS = {
  max_ms = { nonneg, "a non-negative number of milliseconds" },
  max_cpu_ms = { positive, "a positive number of milliseconds" },
  output = { function(v) return OUTPUT_MODE[v] ~= nil end,
    "\"inherit\", \"capture\" or \"discard\"" },
  on_event = { function(v) return type(v) == "function" end, "a function" },
  max_heap_bytes = { positive, "a positive number of bytes" },
  max_result_bytes = { positive, "a positive number of bytes" },
  max_output_bytes = { nonneg, "a non-negative number of bytes" },
  env = { env_ok, "a table of variable names and name = value strings" },
  sandbox = { function(v) return SANDBOX[v] ~= nil end,
    "true, false, \"strict\" or \"syscalls\"" },
  args = { function(v)
    return type(v) == "table" and (v.n == nil or (whole(v.n) and v.n <= 4000))
  end, "a table of arguments (args.n, when given, a whole number up to 4000)" },
}

-- Pool jobs take their pool's profile: no per-job sandbox option there.
local POOL_OPTS = {
  max_ms = RUN_OPTS.max_ms,
  max_cpu_ms = RUN_OPTS.max_cpu_ms,
  output = RUN_OPTS.output,
  on_event = RUN_OPTS.on_event,
  max_heap_bytes = RUN_OPTS.max_heap_bytes,
  max_result_bytes = RUN_OPTS.max_result_bytes,
  max_output_bytes = RUN_OPTS.max_output_bytes,
  env = RUN_OPTS.env,
  args = RUN_OPTS.args,
  task_name = { function(v) return type(v) == "string" end, "a string" },
  delegate_param = { function() return true end, "any value" },
  pool_timeout = { nonneg, "a non-negative number of milliseconds" },
}

local POOL_CONFIG = {
  name = { function(v) return type(v) == "string" and v ~= "" end, "a non-empty string" },
  max_workers = { whole, "a non-negative whole number" },
  max_memory_bytes = { nonneg, "a non-negative number of bytes" },
  delegate_to = { function(v) return type(v) == "string" or M.is_pool(v) end,
    "a pool or a pool's name" },
  delegate_fun = { function(v) return type(v) == "function" end, "a function" },
  idle_ms = { nonneg, "a non-negative number of milliseconds" },
  sandbox = RUN_OPTS.sandbox,
  shared_dict = { function(v) return type(v) == "string" and v ~= "" end,
    "the name of a lua_shared_dict" },
  init = { function(v) return type(v) == "function" end, "a function" },
}

local function check_table(what, t, spec, level)
  if type(t) ~= "table" then
    error(format("%s: options must be a table, got %s", what, typename(t)), level + 1)
  end
  for k, v in pairs(t) do
    local rule = spec[k]
    if rule == nil then
      error(format("%s: unknown option '%s'", what, tostring(k)), level + 1)
    end
    if not rule[1](v) then
      error(format("%s: bad option '%s' (expected %s, got %s)", what, k, rule[2],
        typename(v)), level + 1)
    end
  end
  return t
end

local function check_fn(what, fn)
  if type(fn) ~= "function" then
    error(format("bad argument #1 to '%s' (function expected, got %s)", what, typename(fn)), 3)
  end
end

---------------------------------------------------------------------------
-- Outcomes: true, results... or false, err.

local function finish(max_ms, heap, cpu, ok, ...)
  if ok then return true, ... end
  local kind, a, b = ...
  return false, from_core(max_ms, heap, kind, a, b, cpu)
end

---------------------------------------------------------------------------
-- Pools.

local Pool = {}
Pool.__index = Pool

function M.is_pool(v)
  return type(v) == "table" and getmetatable(v) == Pool
end

local function resolve_pool(what, v, level)
  if type(v) == "string" then
    local p = M.pools[v]
    if p == nil then error(format("%s: no pool named '%s'", what, v), level + 1) end
    return p
  end
  if not M.is_pool(v) then
    error(format("%s: expected a pool or a pool's name, got %s", what, typename(v)), level + 1)
  end
  return v
end

--- handler.pool(config) -> pool
function M.pool(config)
  config = check_table("handler.pool", config == nil and {} or config, POOL_CONFIG, 2)
  local name = config.name
  if name ~= nil and M.pools[name] ~= nil then
    error(format("handler.pool: a pool named '%s' already exists", name), 2)
  end
  if config.delegate_to ~= nil and config.delegate_fun ~= nil then
    error("handler.pool: give delegate_to or delegate_fun, not both", 2)
  end
  if config.init ~= nil and (config.delegate_to ~= nil or config.delegate_fun ~= nil) then
    error("handler.pool: init is set on root pools, which own the worker processes; "
      .. "a delegating pool's jobs run in its root's", 2)
  end
  if config.sandbox ~= nil and (config.delegate_to ~= nil or config.delegate_fun ~= nil) then
    error("handler.pool: sandbox is set on root pools, which own the worker processes; "
      .. "a delegating pool's jobs run in its root's", 2)
  end
  local budget
  if config.shared_dict ~= nil then
    if not in_ngx then
      error("handler.pool: shared_dict holds a budget across nginx workers: it works "
        .. "inside nginx only", 2)
    end
    if name == nil then
      error("handler.pool: shared_dict needs a name: the nginx workers' pools of that "
        .. "name share the budget", 2)
    end
    budget = require("handler.shared").new(config.shared_dict, name,
      config.max_workers or 100, config.max_memory_bytes or 10 * 2^30)
  end
  local parent
  if config.delegate_to ~= nil then
    parent = resolve_pool("handler.pool: delegate_to", config.delegate_to, 2)
    if parent._closed then error("handler.pool: delegate_to names a closed pool", 2) end
  end
  local ud = core.pool_new(name, config.max_workers or 100,
    config.max_memory_bytes or 10 * 2^30, parent and parent._ud,
    config.idle_ms or DEFAULT_IDLE_MS, SANDBOX[config.sandbox or false], config.init)
  local self = setmetatable({
    name = name,
    max_workers = config.max_workers or 100,
    max_memory_bytes = config.max_memory_bytes or 10 * 2^30,
    sandbox = config.sandbox or false,
    _ud = ud,
    _parent = parent,
    _fun = config.delegate_fun,
    -- Chains go through Lua only when some pool up the chain has a delegate_fun.
    _dynamic = config.delegate_fun ~= nil or (parent ~= nil and parent._dynamic),
    _budget = budget,
    -- Whether a pool on a chain from here may hold a shared budget.
    _shared = budget ~= nil or config.delegate_fun ~= nil or (parent ~= nil and parent._shared),
  }, Pool)
  if name ~= nil then M.pools[name] = self end
  pools_made = pools_made + 1
  all_pools[self] = pools_made
  return self
end

-- The candidate chains of a job started in `pool`: lists of core pools from
-- `pool` to a root, in the order delegate_fun gave them.
local function chains_of(pool, param, prefix, out, depth, tables)
  if depth > 16 then error("handler: delegation deeper than 16 pools", 4) end
  local chain = {}
  for i = 1, #prefix do
    chain[i] = prefix[i]
    if tables ~= nil then chain[-i] = prefix[-i] end
  end
  chain[#chain + 1] = pool._ud
  if tables ~= nil then chain[-#chain] = pool end
  if pool._fun ~= nil then
    local cands = pool._fun(param)
    if type(cands) ~= "table" then
      error(format("handler: delegate_fun of pool '%s' returned %s, expected a list of pools",
        tostring(pool.name), typename(cands)), 4)
    end
    for i = 1, #cands do
      local c = resolve_pool("handler: delegate_fun", cands[i], 4)
      if not c._closed then chains_of(c, param, chain, out, depth + 1, tables) end
    end
  elseif pool._parent ~= nil then
    chains_of(pool._parent, param, chain, out, depth + 1, tables)
  else
    out[#out + 1] = chain
  end
  return out
end

---------------------------------------------------------------------------
-- Shared budgets (nginx): a job reserves in every pool of its chain that
-- has one before the core sees it, and gives back when it ends.

local function release_chain(chain, n, heap)
  for i = 1, n do
    local p = chain[-i]
    if p._budget ~= nil then p._budget:release(heap) end
  end
end

local function reserve_chain(chain, heap)
  for i = 1, #chain do
    local p = chain[-i]
    if p._budget ~= nil then
      local ok, why, never = p._budget:reserve(heap)
      if not ok then
        release_chain(chain, i - 1, heap)
        return nil, why, never
      end
    end
  end
  return true
end

-- Like core_submit, for a pool whose chains may hold shared budgets: tries
-- the candidate chains in order, reserving the shared budgets of each.
local function submit_shared(self, param, fn, max_ms, heap, task, wait, result, output, env, args,
                             cpu, omode, items)
  -- Chains as lists of core pools (the array part) and of pool tables
  -- (at negative indices, the same order).
  local cands = chains_of(self, param, {}, {}, 1, true)
  local why, never = "NoWorkersAvailable", true
  for c = 1, #cands do
    local chain = cands[c]
    local n = #chain
    local ok, w, no = reserve_chain(chain, heap)
    never = never and no
    if ok then
      local job
      job, w = core_submit(self._ud, { chain }, fn, max_ms, heap, task, wait, result, output, env,
        args, cpu, omode, items)
      if job ~= nil then
        local function release() release_chain(chain, n, heap) end
        if nginx_waitlist().add(release, job) then release() end
        return job
      end
      release_chain(chain, n, heap)
    end
    why = w
  end
  return nil, why, never
end

local function pool_args(self, what, opts)
  local max_ms, heap, result, output = DEFAULT_MAX_MS, DEFAULT_HEAP, DEFAULT_RESULT, DEFAULT_OUTPUT
  local task, wait, chains, env
  if opts ~= nil then
    check_table(what, opts, POOL_OPTS, 3)
    max_ms = opts.max_ms or max_ms
    heap = opts.max_heap_bytes or heap
    result = opts.max_result_bytes or result
    output = opts.max_output_bytes or output
    task, wait, env = opts.task_name, opts.pool_timeout, env_list(opts.env)
  end
  if self._closed then error(what .. ": the pool is closed", 3) end
  -- Shared budgets inside nginx pick their chain in submit_shared.
  if self._dynamic and not (in_ngx and self._shared) then
    chains = chains_of(self, opts and opts.delegate_param, {}, {}, 1)
  end
  return max_ms, heap, result, task, wait or 0, chains, output, env
end

-- Inside nginx: submit, then yield until the job is done.
-- A job into `pool` (a pool table), through its shared budgets when it
-- has some; `yielding`: in a phase that may wait out pool_timeout.
local function ngx_ctx() return ngx_api.ctx end
local CTX_REFUSED = "ngx.ctx, the request's context, which exists only in this nginx worker "
  .. "(give the job the values it needs instead)"

local function submit(pool, chains, param, fn, max_ms, heap, task, wait, result, output, env,
                      args, cpu, omode, yielding, items)
  if in_ngx then
    -- A job that captured the request's context would get a copy nobody
    -- sees again: it raises instead, naming the upvalue.
    local has, ctx = pcall(ngx_ctx)
    if has and type(ctx) == "table" then core.refuse(ctx, CTX_REFUSED) end
  end
  if not (in_ngx and pool._shared) then
    return core_submit(pool._ud, chains, fn, max_ms, heap, task, wait, result, output, env, args,
      cpu, omode, items)
  end
  if ngx_api.get_phase() == "init" then
    error("handler: a pool with a shared budget starts no job in the init phase: the budget "
      .. "is counted per nginx worker, and none exists yet", 0)
  end
  local job, why, never = submit_shared(pool, param, fn, max_ms, heap, task, wait, result,
    output, env, args, cpu, omode, items)
  if job == nil and why ~= nil and not never and wait > 0 and yielding then
    -- Other nginx workers give capacity back without telling this one: it
    -- looks again, more and more seldom, until pool_timeout passes.
    local deadline, pause = ngx_api.now() + wait / 1000, 0.001
    repeat
      ngx_api.sleep(pause)
      pause = pause < 0.016 and pause * 2 or 0.02
      job, why, never = submit_shared(pool, param, fn, max_ms, heap, task, wait, result,
        output, env, args, cpu, omode, items)
      ngx_api.update_time()
    until job ~= nil or never or ngx_api.now() >= deadline
    if job == nil and not never then why = "PoolTimeout" end
  end
  return job, why
end

-- Waits until the job (a core job) is done, calling on_event (when given)
-- for each of its events as they come: yielding inside nginx, blocking
-- elsewhere. Without on_event, a blocking wait is the caller's (core.await).
local function wait_done(ud, on_event)
  if on_event == nil then
    if in_ngx then nginx().wait({ ud }, 1) end
    return
  end
  while true do
    local ev = core.events(ud)
    if ev ~= nil then
      for i = 1, ev.n do on_event(ev[i]) end
    elseif core.done(ud) then
      return
    elseif in_ngx then
      nginx().wait({ ud }, 1, nil, true)
    else
      core.wait_any({ ud }, huge, true)
    end
  end
end

local function run_yielding(pool, chains, param, fn, max_ms, heap, task, wait, result, output,
                            env, args, cpu, omode, on_event)
  local w = nginx()
  w.check()
  local job, why = submit(pool, chains, param, fn, max_ms, heap, task, wait, result, output, env,
    args, cpu, omode, true)
  if job == nil then return false, reject(why) end
  wait_done(job, on_event)
  return finish(max_ms, heap, cpu, core.result(job))
end

-- run with on_event outside nginx: submit, then wait delivering events.
local function run_events(pool_ud, chains, fn, max_ms, heap, task, wait, result, output, env,
                          args, cpu, omode, on_event)
  local job, why = core_submit(pool_ud, chains, fn, max_ms, heap, task, wait, result, output, env,
    args, cpu, omode)
  if job == nil then return false, reject(why) end
  wait_done(job, on_event)
  return finish(max_ms, heap, cpu, core_await(job))
end

function Pool:run(fn, opts)
  check_fn("run", fn)
  local max_ms, heap, result, task, wait, chains, output, env = pool_args(self, "pool:run", opts)
  local args, cpu = opts and opts.args, opts and opts.max_cpu_ms
  local omode = opts and OUTPUT_MODE[opts.output]
  local on_event = opts and opts.on_event
  if in_ngx then
    return run_yielding(self, chains, opts and opts.delegate_param, fn, max_ms, heap, task,
      wait, result, output, env, args, cpu, omode, on_event)
  end
  if on_event ~= nil then
    return run_events(self._ud, chains, fn, max_ms, heap, task, wait, result, output, env, args,
      cpu, omode, on_event)
  end
  return finish(max_ms, heap, cpu,
    core_run(self._ud, chains, fn, max_ms, heap, task, wait, result, output, env, args, cpu,
      omode))
end

local Job = {}
Job.__index = Job

-- pool:async, and the internal ways in: `fn` may be a job encoded already
-- (a string), and `items` a list of items for fn (pool:map's batches).
local function async(self, what, fn, opts, items)
  local max_ms, heap, result, task, wait, chains, output, env = pool_args(self, what, opts)
  local cpu = opts and opts.max_cpu_ms
  local omode = opts and OUTPUT_MODE[opts.output]
  local args = items == nil and opts and opts.args or nil
  local job, why = submit(self, chains, opts and opts.delegate_param, fn, max_ms, heap, task,
    wait, result, output, env, args, cpu, omode, false, items)
  if job == nil then return nil, reject(why) end
  -- In nginx the dispatcher steps the loop, so the job ends (and frees its
  -- worker) even when nobody waits; timers cannot be made in init_by_lua.
  if in_ngx and ngx_api.get_phase() ~= "init" then pcall(nginx().ensure) end
  return setmetatable({ _ud = job, _max_ms = max_ms, _heap = heap, _cpu = cpu, pool = self,
    _capture = omode == OUTPUT_MODE.capture, _on_event = opts and opts.on_event,
    task_name = task }, Job)
end

function Pool:async(fn, opts)
  check_fn("async", fn)
  return async(self, "pool:async", fn, opts)
end

-- Internal, for handler serve, not API: a job whose function and arguments
-- come encoded already (core.encode_job's bytes, from a handler.remote
-- producer). They go to the worker as they are: this host never loads the
-- bytecode they hold. opts as pool:async's, without args.
function Pool:_async_encoded(msg, opts)
  return async(self, "pool:async", msg, opts)
end

-- pool:map's batches: one job whose function runs once per value of
-- `items` (its one argument), each from the pristine image with the job's
-- limits of its own; job:_item(i) is item i's outcome, or nil for an item
-- that did not run (the job ended before it).
function Pool:_async_items(fn, items, opts)
  return async(self, "pool:map", fn, opts, items)
end

local function item_outcome(job, ok, ...)
  if ok == false and ... == "notrun" then return nil end
  return finish(job._max_ms, job._heap, job._cpu, ok, ...)
end

function Job:_item(i)
  return item_outcome(self, core.item_result(self._ud, i))
end

function Job:_item_stats(i)
  return core.item_stats(self._ud, i)
end

local function check_job(job, level)
  if type(job) ~= "table" or getmetatable(job) ~= Job then
    error(format("bad argument #1 to 'await' (job expected, got %s)", typename(job)), level + 1)
  end
end

local function await(job)
  if in_ngx then
    nginx().check()
    wait_done(job._ud, job._on_event)
    return finish(job._max_ms, job._heap, job._cpu, core.result(job._ud))
  end
  if job._on_event ~= nil then wait_done(job._ud, job._on_event) end
  return finish(job._max_ms, job._heap, job._cpu, core_await(job._ud))
end

function Job:await()
  check_job(self, 2)
  return await(self)
end

--- job:output() -> what a job with output = "capture" wrote to its stdout
-- and stderr (so far, until it is done); nil for other jobs.
function Job:output()
  check_job(self, 2)
  if not self._capture then return nil end
  return (core.output(self._ud))
end

--- job:stats() -> { wall_ms, cpu_ms, queued_ms, heap_peak_bytes, output_bytes },
-- once the job is done.
function Job:stats()
  check_job(self, 2)
  if not core.done(self._ud) then error("job:stats: the job is not done", 2) end
  return core.job_stats(self._ud)
end

--- job:done() -> whether await would return at once.
function Job:done()
  return core.done(self._ud)
end

function M.await(job)
  check_job(job, 2)
  return await(job)
end

--- handler.wait_any(jobs [, timeout_ms]) -> job, index | nil, "timeout"
function M.wait_any(jobs, timeout_ms)
  if type(jobs) ~= "table" or jobs[1] == nil then
    error(format("bad argument #1 to 'wait_any' (non-empty array of jobs expected, got %s)",
      type(jobs) == "table" and "an empty table" or typename(jobs)), 2)
  end
  if timeout_ms ~= nil and not nonneg(timeout_ms) then
    error(format("bad argument #2 to 'wait_any' (non-negative number of milliseconds "
      .. "expected, got %s)", typename(timeout_ms)), 2)
  end
  local n, uds = #jobs, {}
  for i = 1, n do
    local job = jobs[i]
    if type(job) ~= "table" or getmetatable(job) ~= Job then
      error(format("bad argument #1 to 'wait_any' (job expected at index %d, got %s)", i,
        typename(job)), 2)
    end
    uds[i] = job._ud
  end
  local i
  if in_ngx then
    local w = nginx()
    w.check()
    i = w.wait(uds, n, timeout_ms)
  else
    i = core.wait_any(uds, timeout_ms or huge)
  end
  if i == nil then return nil, "timeout" end
  return jobs[i], i
end

local function check_err(what, err)
  if err ~= nil and type(err) ~= "table" then
    error(format("%s: the error must be a table, got %s", what, typename(err)), 3)
  end
end

function Pool:kill(task_name, err)
  if type(task_name) ~= "string" then
    error(format("bad argument #1 to 'kill' (string expected, got %s)", typename(task_name)), 2)
  end
  check_err("pool:kill", err)
  return core.kill(self._ud, task_name, err)
end

function Pool:kill_by_ref(job, err)
  check_job(job, 2)
  check_err("pool:kill_by_ref", err)
  if core.kill_job(self._ud, job._ud, err) then return true end
  return false, "no_such_worker"
end

function Pool:flush(err)
  check_err("pool:flush", err)
  return core.flush(self._ud, err)
end

-- pool:map's options: a job's, and the map's own.
-- Loaded on first use: every job's encoding walks package.loaded, so a
-- module loaded here costs every job (one entry more can double its hash).
local map_mod, MAP_OPTS
local function load_map()
  map_mod = require("handler.map")
  MAP_OPTS = {}
  for k, v in pairs(POOL_OPTS) do MAP_OPTS[k] = v end
  for k, v in pairs(map_mod.OPTIONS) do MAP_OPTS[k] = v end
  MAP_OPTS.args = nil
end

local function map_iterator(what, pool, fn, inputs, opts)
  if type(fn) ~= "function" then
    error(format("bad argument #1 to '%s' (function expected, got %s)", what, typename(fn)), 3)
  end
  if map_mod == nil then load_map() end
  if opts ~= nil then check_table(what, opts, MAP_OPTS, 3) end
  if pool._closed then error(what .. ": the pool is closed", 3) end
  -- Only the iterator: a generic for would take a second value for its state.
  local iter = map_mod.iterator(what, pool, fn, inputs, opts, M.wait_any, nil,
    not in_ngx and core.wait_ended or nil)
  return iter
end

--- for i, ok, ... in pool:map(fn, inputs [, opts]) do ... end
function Pool:map(fn, inputs, opts)
  return map_iterator("map", self, fn, inputs, opts)
end

function Pool:stats()
  return core.stats(self._ud)
end

function Pool:close()
  if self._closed then return end
  self._closed = true
  core.close(self._ud)
  if self.name ~= nil and M.pools[self.name] == self then M.pools[self.name] = nil end
end

function Pool:__tostring()
  return format("handler.pool(%s)", self.name or "unnamed")
end

---------------------------------------------------------------------------
-- handler.run: the default pool.

local default_pool
local sandbox_pools = {}

--- The pools handler.run uses: one for trusted jobs, one per sandbox profile.
function M.default_pool(sandbox)
  local flags = SANDBOX[sandbox or false]
  if flags ~= nil and flags ~= 0 then
    local p = sandbox_pools[flags]
    if p == nil then
      p = M.pool({ max_workers = 100, sandbox = sandbox })
      sandbox_pools[flags] = p
    end
    return p
  end
  if default_pool == nil then
    default_pool = M.pool({ max_workers = 100 })
  end
  return default_pool
end

--- handler.run(fn [, opts]) -> true, results... | false, err
function M.run(fn, opts)
  check_fn("run", fn)
  local max_ms, heap, result, output = DEFAULT_MAX_MS, DEFAULT_HEAP, DEFAULT_RESULT, DEFAULT_OUTPUT
  local env, pool, args, cpu, omode, on_event
  if opts ~= nil then
    check_table("handler.run", opts, RUN_OPTS, 2)
    args, cpu, omode = opts.args, opts.max_cpu_ms, OUTPUT_MODE[opts.output]
    on_event = opts.on_event
    max_ms = opts.max_ms or max_ms
    heap = opts.max_heap_bytes or heap
    result = opts.max_result_bytes or result
    output = opts.max_output_bytes or output
    env = env_list(opts.env)
    if opts.sandbox then pool = M.default_pool(opts.sandbox) end
  end
  pool = pool or default_pool or M.default_pool()
  if in_ngx then
    return run_yielding(pool, nil, nil, fn, max_ms, heap, nil, 0, result, output, env, args, cpu,
      omode, on_event)
  end
  if on_event ~= nil then
    return run_events(pool._ud, nil, fn, max_ms, heap, nil, 0, result, output, env, args, cpu,
      omode, on_event)
  end
  return finish(max_ms, heap, cpu,
    core_run(pool._ud, nil, fn, max_ms, heap, nil, 0, result, output, env, args, cpu, omode))
end

--- for i, ok, ... in handler.map(fn, inputs [, opts]) do ... end: in the
-- default pool.
function M.map(fn, inputs, opts)
  return map_iterator("map", default_pool or M.default_pool(), fn, inputs, opts)
end

---------------------------------------------------------------------------
-- Past one machine: jobs through a Redis stream (handler/remote.lua),
-- loaded on first use.

--- handler.remote{ redis = "host:port", stream = "jobs" } -> a producer:
-- remote:async(fn, opts), remote:map(fn, inputs, opts), job:await().
function M.remote(config)
  return require("handler.remote").new(config)
end

---------------------------------------------------------------------------
-- Process-wide settings.

local CONFIG = {
  spin_us = { nonneg, "a non-negative number of microseconds" },
}

--- handler.configure{ spin_us = n }: how long a blocking run or await polls
-- for a reply before it sleeps (default 50; 0 never polls).
function M.configure(opts)
  check_table("handler.configure", opts, CONFIG, 2)
  if opts.spin_us ~= nil then core.set_spin(opts.spin_us) end
end

---------------------------------------------------------------------------
-- Metrics.

local function made_before(a, b)
  return all_pools[a] < all_pools[b]
end

-- handler.metrics, loaded by the first call: the encoder reads all of
-- package.loaded for every job it sends, so a module there costs every job
-- a little, and a host that never asks for metrics should not pay for it.
local metrics

--- handler.metrics() -> the counters, gauges and histograms of job times of
-- every pool not closed, as Prometheus text (docs/API.md, "Metrics").
function M.metrics()
  local list = {}
  for p in pairs(all_pools) do
    if not p._closed then list[#list + 1] = p end
  end
  sort(list, made_before)
  for i, p in ipairs(list) do
    local queue, run = core.times(p._ud)
    list[i] = { label = p.name or ("#" .. all_pools[p]), stats = core.stats(p._ud),
      queue = queue, run = run }
  end
  metrics = metrics or require("handler.metrics")
  return metrics.render(list, core.time_bounds)
end

---------------------------------------------------------------------------
-- Driving the loop from a host: a pollable fd, the next timeout, a step.

M.fd = core.fd
M.timeout = core.timeout
M.step = core.step

M.errors = errors
M._core = core

-- Internal, for a host layer (the nginx one), not API: _refuse(value, what)
-- makes a table, function or userdata refuse to travel in a job, so that a
-- job capturing it raises in the caller "handler: cannot send a <type>:
-- <where it sits> is <what>" (what: a string such as "ngx.ctx, the
-- request's own table"; nil lifts the mark). The mark does not keep the
-- value alive.
M._refuse = core.refuse
-- For handler.remote, whose options are checked and named as these are.
M._check_table = check_table
M._typename = typename

return M
