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
  batch = { function(v)
    return type(v) == "number" and v >= 1 and v <= 1024 and v == math.floor(v)
  end, "a whole number of items from 1 to 1024" },
}

local WINDOW_PER_WORKER = 4
local WINDOW_MAX = 256
-- About how long the items of one job take together, with batch > 1.
local BATCH_MS = 2

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
M.retryable = retryable

--- iterator(pool, fn, inputs, opts, wait_any) -> the generic-for iterator:
-- each call returns i, true, results... | i, false, err; nil at the end.
-- `opts` is checked already; `wait_any` is handler.wait_any.
-- With `want_stats` (the command line's joblog), each item's job:stats()
-- is kept, and the third function returned says those of the item yielded
-- last.
-- `wait_any` is handler.wait_any; `wait_ended`, when given (outside nginx),
-- core.wait_ended: then each item's job is watched (handler.waitlist) and a
-- wait costs nothing per item in flight, whatever the window.
function M.iterator(what, pool, fn, inputs, opts, wait_any, want_stats, wait_ended)
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
  local batch = opts.batch or 1
  if batch > 1 and (opts.output == "capture" or opts.on_event ~= nil) then
    error(format("bad argument #3 to '%s' (batch > 1 takes neither output = \"capture\" "
      .. "nor on_event: they belong to one job)", what), 3)
  end
  if opts.window == nil then window = min(WINDOW_MAX * batch, window * batch) end
  -- Each item is a job with the job options given; it waits for capacity
  -- in the pool (first come first served) unless pool_timeout says not to.
  local job_opts = {}
  for k, v in pairs(opts) do
    if M.OPTIONS[k] == nil then job_opts[k] = v end
  end
  if job_opts.pool_timeout == nil then job_opts.pool_timeout = huge end

  local read, yielded, exhausted = 0, 0, false
  -- What is kept per item (read, waiting to start, ended, dropped) lies
  -- within `window` consecutive indices: it is kept in rings of that size,
  -- slot at(i). A table whose integer keys only grow while the old ones are
  -- cleared rehashes over and over once the range is in the hundreds.
  local cap = window
  local function at(i) return (i - 1) % cap + 1 end
  local nready = 0
  local last_stats
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

  -- In order, an ended item waits in ready at its index's slot; as they
  -- finish, in the order ring (index and outcome), by position: an item
  -- far behind the others would share its index's slot with a later one.
  local function finish(i, out)
    nready = nready + 1
    if ordered then
      ready[at(i)] = out
    else
      tail = tail + 1
      order[at(tail)] = i
      ready[at(tail)] = out
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

  -- A job of one item (its args), or, with batch > 1, of up to `batch`
  -- items, each run from the pristine image with its own limits.
  -- running[key] = { job, entries, items }, each entry { i, item, tries };
  -- `items`: the job carries its entries as items (batch > 1).
  local nkeys = 0

  local function start(entries)
    local job, err
    local items_job = batch > 1
    if not items_job then
      job_opts.args = { n = 1, entries[1][2] }
      job, err = pool:async(fn, job_opts)
    else
      local items = {}
      for k = 1, #entries do items[k] = { n = 1, entries[k][2] } end
      job, err = pool:_async_items(fn, items, job_opts)
    end
    if job == nil then
      for k = 1, #entries do finish(entries[k][1], { n = 2, false, err }) end
      return
    end
    nkeys = nkeys + 1
    running[nkeys] = { job, entries, items_job }
    nrunning = nrunning + 1
    if waitlist then watch(nkeys, job) end
  end

  -- Puts an entry back at the front of the items waiting to start.
  local function again(e)
    fhead = fhead - 1
    fifo[at(fhead)] = e
  end

  local function settle(e, job, out, st)
    if not out[1] and e[3] < retries and retryable(out[2]) then
      again({ e[1], e[2], e[3] + 1 })
      return
    end
    if want_stats then out.stats = st or job:stats() end
    finish(e[1], out)
  end

  -- With batch > 1, how many items a job gets: as many as take about
  -- BATCH_MS together (from the average item of the jobs so far), so that
  -- results, a stop and the items behind a slow one wait no longer than
  -- that; at most `batch`.
  local per_job, avg_ms = 1, nil

  local function learn(job, n, clean)
    if not clean then return end
    local ms = job:stats().wall_ms / n
    avg_ms = avg_ms and avg_ms + (ms - avg_ms) / 4 or ms
    per_job = max(1, min(batch, math.floor(BATCH_MS / max(avg_ms, 1e-3))))
  end

  local function collect(key)
    local r = running[key]
    running[key] = nil
    nrunning = nrunning - 1
    local job, entries = r[1], r[2]
    if not r[3] then
      settle(entries[1], job, pack(job:await()), nil)
      return
    end
    job:await()
    local clean = true
    local outs = {}
    for k = 1, #entries do outs[k] = pack(job:_item(k)) end
    -- Items that did not run after one that ended well: its worker serves
    -- one job only (the "syscalls" profile), or that item touched process
    -- state. Either way, one item per job from now on.
    for k = 1, #entries - 1 do
      local o = outs[k]
      if outs[k + 1][1] == nil and o[1] ~= nil then
        if o[1] or (type(o[2]) == "table" and o[2].cause == "error") then batch = 1 end
        break
      end
    end
    -- Put back in reverse, so the items that did not run keep their order.
    for k = #entries, 1, -1 do
      local e = entries[k]
      local out = outs[k]
      if out[1] == nil then
        clean = false
        if stopped then dropped[at(e[1])] = true else again(e) end
      else
        -- Items that ran into a limit say nothing of the usual item.
        if not out[1] and (retryable(out[2]) or type(out[2]) == "table" and out[2].type == "OOM")
        then clean = false end
        settle(e, job, out, want_stats and job:_item_stats(k))
      end
    end
    if batch == 1 then per_job = 1 else learn(job, #entries, clean) end
  end

  local function fill()
    while not exhausted and read - yielded < window do
      local item = next_input()
      if item == nil then
        exhausted = true
      else
        read = read + 1
        ftail = ftail + 1
        fifo[at(ftail)] = { read, item, 0 }
      end
    end
    while nrunning < max_running and fhead <= ftail do
      local entries = {}
      for k = 1, min(per_job, ftail - fhead + 1) do
        local e = fifo[at(fhead)]
        fifo[at(fhead)] = nil
        fhead = fhead + 1
        entries[k] = e
      end
      start(entries)
    end
  end

  -- Starts nothing more: the items read and not started are dropped (never
  -- yielded); those running end and are yielded.
  local function stop()
    stopped = true
    exhausted = true
    for k = fhead, ftail do
      dropped[at(fifo[at(k)][1])] = true
      fifo[at(k)] = nil
    end
    fhead, ftail = 1, 0
    -- Jobs still waiting in the pool for a worker have not started either.
    for key, r in pairs(running) do
      if not started(r[1]._ud) then
        running[key] = nil
        nrunning = nrunning - 1
        for k = 1, #r[2] do dropped[at(r[2][k][1])] = true end
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

  -- Yields item i, whose outcome is in slot k.
  local function yield_item(i, k)
    local out = ready[at(k)]
    ready[at(k)] = nil
    nready = nready - 1
    last_stats = out.stats
    yielded = yielded + 1
    return i, unpack(out, 1, out.n)
  end

  return function()
    while true do
      fill()
      if ordered then
        while dropped[at(next_ordered)] do
          dropped[at(next_ordered)] = nil
          next_ordered = next_ordered + 1
        end
        if ready[at(next_ordered)] ~= nil then
          local i = next_ordered
          next_ordered = next_ordered + 1
          return yield_item(i, i)
        end
      elseif head <= tail then
        local k = head
        local i = order[at(k)]
        order[at(k)] = nil
        head = head + 1
        return yield_item(i, k)
      end
      if nrunning == 0 then
        if exhausted and fhead > ftail and nready == 0 then return nil end
        if nready > 0 and ordered and not stopped then
          -- Cannot happen: the next item in order is ready, running or read.
          error("handler: map lost track of item " .. next_ordered)
        end
        if stopped and nready > 0 then
          -- Only dropped items lie between: yield the rest in order.
          next_ordered = next_ordered + 1
        end
      else
        wait_some()
      end
    end
  end, stop, function() return last_stats end
end

return M
