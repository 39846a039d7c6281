-- handler.map: pool:map and handler.map, a job per item of a lazy input,
-- with a bounded window of items in flight, in input order or as they
-- finish, and retries of items that died of their limits.

local type, error, select, unpack, next, pairs, format, min, max, huge =
  type, error, select, unpack, next, pairs, string.format, math.min, math.max, math.huge

local M = {}

-- The options pool:map adds to a job's.
M.OPTIONS = {
  ordered = { function(v) return type(v) == "boolean" end, "a boolean" },
  window = { function(v)
    return type(v) == "number" and v >= 1 and v == math.floor(v) and v < huge
  end, "a whole number of items, at least 1" },
  retries = { function(v)
    return type(v) == "number" and v >= 0 and v == math.floor(v) and v < huge
  end, "a non-negative whole number" },
  on_progress = { function(v) return type(v) == "function" end, "a function" },
}

local WINDOW_PER_WORKER = 4
local WINDOW_MAX = 256

local started = require("handler.core").started

local function pack(...)
  return { n = select("#", ...), ... }
end

-- Whether an item that ended with err is run again (while it has retries).
local function retryable(err)
  if type(err) ~= "table" then return false end
  local t = err.type
  return t == "Timeout" or t == "CPUTimeout"
    or (t == "ProcessExit" and (err.cause == "signal" or err.cause == "lost"))
end

--- iterator(pool, fn, inputs, opts, wait_any) -> the generic-for iterator:
-- each call returns i, true, results... | i, false, err; nil at the end.
-- `opts` is checked already; `wait_any` is handler.wait_any.
-- `on_job(i, job)`, when given, is called with each item's last job once it
-- has ended (the command line's joblog wants its stats).
-- `wait_any` is handler.wait_any; `wait_ended`, when given (outside nginx),
-- core.wait_ended: then each item's job is watched (handler.waitlist) and a
-- wait costs nothing per item in flight, whatever the window.
function M.iterator(what, pool, fn, inputs, opts, wait_any, on_job, wait_ended)
  local next_input
  if type(inputs) == "table" then
    local k = 0
    next_input = function()
      k = k + 1
      return inputs[k]
    end
  elseif type(inputs) == "function" then
    next_input = inputs
  else
    error(format("bad argument #2 to '%s' (array or iterator function expected, got %s)", what,
      type(inputs)), 3)
  end
  opts = opts or {}
  local ordered = opts.ordered ~= false
  local window = opts.window
    or min(WINDOW_MAX, max(1, WINDOW_PER_WORKER * (pool.max_workers or 1)))
  local retries = opts.retries or 0
  local on_progress = opts.on_progress
  -- Each item is a job with the job options given; it waits for capacity
  -- in the pool (first come first served) unless pool_timeout says not to.
  local job_opts = {}
  for k, v in pairs(opts) do
    if M.OPTIONS[k] == nil then job_opts[k] = v end
  end
  if job_opts.pool_timeout == nil then job_opts.pool_timeout = huge end

  local read, yielded, exhausted = 0, 0, false
  -- Items read but not started, first in first out: no more jobs are in
  -- the pool at once than it has workers, so the window costs only memory,
  -- and a stop drops what has not started.
  local fifo, fhead, ftail = {}, 1, 0
  -- Twice the workers: a job is waiting in the pool when a worker frees.
  local max_running = 2 * max(1, pool.max_workers or 1)
  local stopped, dropped = false, {}
  local running, nrunning = {}, 0   -- item index -> { job, item, tries }
  local ready = {}                  -- item index -> packed outcome
  local order, head, tail = {}, 1, 0 -- unordered: indices in the order they ended
  local next_ordered = 1
  local ndone, nfailed = 0, 0

  local function finish(i, out)
    ready[i] = out
    if not ordered then
      tail = tail + 1
      order[tail] = i
    end
    ndone = ndone + 1
    if not out[1] then nfailed = nfailed + 1 end
    if on_progress then on_progress(ndone, nfailed) end
  end

  -- Items whose job ended (or may have: an event also wakes), to collect.
  local ended, nended = {}, 0
  local waitlist = wait_ended and require("handler.waitlist")

  local function watch(i, job)
    local function waiter()
      nended = nended + 1
      ended[nended] = i
    end
    if waitlist.add(waiter, job._ud) then waiter() end
  end

  local function start(i, item, tries)
    job_opts.args = { n = 1, item }
    local job, err = pool:async(fn, job_opts)
    if job == nil then
      finish(i, { n = 2, false, err })
      return
    end
    running[i] = { job, item, tries }
    nrunning = nrunning + 1
    if waitlist then watch(i, job) end
  end

  local function collect(i)
    local r = running[i]
    running[i] = nil
    nrunning = nrunning - 1
    local out = pack(r[1]:await())
    if not out[1] and r[3] < retries and retryable(out[2]) then
      start(i, r[2], r[3] + 1)
      return
    end
    if on_job then on_job(i, r[1]) end
    finish(i, out)
  end

  local function fill()
    while not exhausted and read - yielded < window do
      local item = next_input()
      if item == nil then
        exhausted = true
      else
        read = read + 1
        ftail = ftail + 1
        fifo[ftail] = { read, item }
      end
    end
    while nrunning < max_running and fhead <= ftail do
      local e = fifo[fhead]
      fifo[fhead] = nil
      fhead = fhead + 1
      start(e[1], e[2], 0)
    end
  end

  -- Starts nothing more: the items read and not started are dropped (never
  -- yielded); those running end and are yielded.
  local function stop()
    stopped = true
    exhausted = true
    for k = fhead, ftail do
      dropped[fifo[k][1]] = true
      fifo[k] = nil
    end
    fhead, ftail = 1, 0
    -- Jobs still waiting in the pool for a worker have not started either.
    for i, r in pairs(running) do
      if not started(r[1]._ud) then
        running[i] = nil
        nrunning = nrunning - 1
        dropped[i] = true
        pool:kill_by_ref(r[1])
      end
    end
  end

  -- Waits until at least one running item has ended, and collects every
  -- one that has.
  local function wait_some()
    if waitlist then
      while nended == 0 do
        wait_ended()
        waitlist.wake_ended()
      end
      local list, n = ended, nended
      ended, nended = {}, 0
      for k = 1, n do
        local i = list[k]
        local r = running[i]
        if r ~= nil then
          if r[1]:done() then collect(i) else watch(i, r[1]) end
        end
      end
      return
    end
    local jobs, index = {}, {}
    for i, r in pairs(running) do
      jobs[#jobs + 1] = r[1]
      index[#index + 1] = i
    end
    wait_any(jobs)
    for k = 1, #jobs do
      if jobs[k]:done() then collect(index[k]) end
    end
  end

  local function yield_item(i)
    local out = ready[i]
    ready[i] = nil
    yielded = yielded + 1
    return i, unpack(out, 1, out.n)
  end

  return function()
    while true do
      fill()
      if ordered then
        while dropped[next_ordered] do
          dropped[next_ordered] = nil
          next_ordered = next_ordered + 1
        end
        if ready[next_ordered] ~= nil then
          local i = next_ordered
          next_ordered = next_ordered + 1
          return yield_item(i)
        end
      elseif head <= tail then
        local i = order[head]
        order[head] = nil
        head = head + 1
        return yield_item(i)
      end
      if nrunning == 0 then
        if exhausted and fhead > ftail and next(ready) == nil then return nil end
        if next(ready) ~= nil and ordered and not stopped then
          -- Cannot happen: the next item in order is ready, running or read.
          error("handler: map lost track of item " .. next_ordered)
        end
        if stopped and next(ready) ~= nil then
          -- Only dropped items lie between: yield the rest in order.
          next_ordered = next_ordered + 1
        end
      else
        wait_some()
      end
    end
  end, stop
end

return M
