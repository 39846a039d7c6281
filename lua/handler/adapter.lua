-- handler.adapter: what the adapters for other event loops (handler.luv,
-- handler.cqueues, handler.copas) share. Each adapter gives a way to put a
-- coroutine of its loop to sleep until it is woken or a time passes, and
-- runs one dispatcher that waits on handler.fd() and steps the loop
-- through handler.waitlist; this module builds await, run and wait_any on
-- top of that, with the same argument checks for all three.

local handler = require("handler")
local core = require("handler.core")
local waitlist = require("handler.waitlist")

local type, error, pcall, getmetatable, format, running, isyieldable =
  type, error, pcall, getmetatable, string.format, coroutine.running, coroutine.isyieldable
local pairs, huge = pairs, math.huge
local core_done, core_id = core.done, core.job_id

local M = {}

local typename = handler._typename

-- A job of handler's: what pool:async returns.
local function is_job(v)
  if type(v) ~= "table" or type(v._ud) ~= "userdata" then return false end
  local mt = getmetatable(v)
  return mt ~= nil and type(mt.__index) == "table" and mt.__index.await ~= nil
    and (pcall(core_id, v._ud))
end

-- The sandbox values handler.run takes (and default_pool picks by).
local SANDBOX = { [true] = true, [false] = true, strict = true, syscalls = true }

--- The current coroutine, when it is one the loop can put to sleep: the
-- main thread, or a coroutine that cannot yield, is not.
function M.coroutine()
  local co, main = running()
  if co == nil or main or (isyieldable ~= nil and not isyieldable()) then return nil end
  return co
end

--- new(name, loop) -> the adapter's table (await, run, wait_any).
-- loop.inside() says whether the running coroutine is one the loop runs;
-- loop.where ends the error raised outside one ("await must be called
-- from <where>");
-- loop.waiter() returns a waiter: w.fire, a function that wakes it (called
-- at most once, by waitlist or not at all), and w:sleep(timeout_ms), which
-- puts the current coroutine to sleep until fire() is called or
-- timeout_ms (nil: none) passes, and keeps the dispatcher running while it
-- sleeps.
function M.new(name, loop)
  local A = {}

  local function check_inside(what)
    if not loop.inside() then
      error(format("%s: %s must be called from %s", name, what, loop.where), 3)
    end
  end

  -- The lowest index of a done job, or nil.
  local function first_done(uds, n)
    for i = 1, n do
      if core_done(uds[i]) then return i end
    end
    return nil
  end

  -- wait(uds, n, timeout_ms) -> index | nil: sleeps until one of the n job
  -- userdatas is done or timeout_ms (nil: none) passes.
  local function wait(uds, n, timeout_ms)
    local i = first_done(uds, n)
    if i ~= nil then return i end
    if timeout_ms == 0 then
      -- Only a look: what is ready now, without sleeping.
      waitlist.step()
      return first_done(uds, n)
    end
    local w = loop.waiter()
    local fire = w.fire
    for k = 1, n do
      if waitlist.add(fire, uds[k]) then
        waitlist.remove(fire)
        return k
      end
    end
    local ok, err = pcall(w.sleep, w, timeout_ms)
    waitlist.remove(fire)
    if not ok then error(err, 0) end
    return first_done(uds, n)
  end

  local function await_job(job)
    local uds = { job._ud }
    while not core_done(uds[1]) do wait(uds, 1, nil) end
    return job:await()
  end

  --- A.await(job [, err]) -> like job:await(), sleeping in the loop.
  -- A.await(pool:async(fn)) works directly: a rejected job is nil, err.
  function A.await(job, err)
    check_inside("await")
    if job == nil and err ~= nil then return false, err end
    if not is_job(job) then
      error(format("bad argument #1 to 'await' (job expected, got %s)", typename(job)), 2)
    end
    return await_job(job)
  end

  --- A.run(fn [, opts]) -> true, results... | false, err: handler.run,
  -- sleeping in the loop; the job runs in handler.default_pool(opts.sandbox).
  function A.run(fn, opts)
    check_inside("run")
    if type(fn) ~= "function" then
      error(format("bad argument #1 to 'run' (function expected, got %s)", typename(fn)), 2)
    end
    local job_opts, sandbox = opts, nil
    if opts ~= nil then
      if type(opts) ~= "table" then
        error(format("%s.run: options must be a table, got %s", name, typename(opts)), 2)
      end
      sandbox = opts.sandbox
      if sandbox ~= nil then
        if not SANDBOX[sandbox] then
          error(format("%s.run: bad option 'sandbox' (expected true, false, \"strict\" or "
            .. "\"syscalls\", got %s)", name, typename(sandbox)), 2)
        end
        job_opts = {}
        for k, v in pairs(opts) do
          if k ~= "sandbox" then job_opts[k] = v end
        end
      end
    end
    local pool = handler.default_pool(sandbox)
    -- Called through pcall, pool:async's errors (a bad option, a value that
    -- cannot travel) carry no position; they are raised again at the caller.
    local ok, job, why = pcall(pool.async, pool, fn, job_opts)
    if not ok then
      if type(job) == "string" then job = job:gsub("^pool:async:", name .. ".run:") end
      error(job, 2)
    end
    if job == nil then return false, why end
    return await_job(job)
  end

  --- A.wait_any(jobs [, timeout_ms]) -> job, index | nil, "timeout"
  function A.wait_any(jobs, timeout_ms)
    check_inside("wait_any")
    if type(jobs) ~= "table" or jobs[1] == nil then
      error(format("bad argument #1 to 'wait_any' (non-empty array of jobs expected, got %s)",
        type(jobs) == "table" and "an empty table" or typename(jobs)), 2)
    end
    if timeout_ms ~= nil and not (type(timeout_ms) == "number" and timeout_ms >= 0) then
      error(format("bad argument #2 to 'wait_any' (non-negative number of milliseconds "
        .. "expected, got %s)", typename(timeout_ms)), 2)
    end
    if timeout_ms == huge then timeout_ms = nil end
    local n, uds = #jobs, {}
    for i = 1, n do
      local job = jobs[i]
      if not is_job(job) then
        error(format("bad argument #1 to 'wait_any' (job expected at index %d, got %s)", i,
          typename(job)), 2)
      end
      uds[i] = job._ud
    end
    local i = wait(uds, n, timeout_ms)
    if i == nil then return nil, "timeout" end
    return jobs[i], i
  end

  return A
end

--- needed(count) -> whether a dispatcher should go on: coroutines sleep
-- (count of them), or jobs are in flight (their deadlines are kept and
-- their workers freed even when nobody waits for them yet).
function M.needed(count)
  return count > 0 or core.active() > 0
end

--- The ms a dispatcher waits on handler.fd() at most: handler.timeout()
-- (the loop's next timer; -1, none, is nil).
function M.timeout_ms()
  local t = handler.timeout()
  if t < 0 then return nil end
  return t
end

return M
