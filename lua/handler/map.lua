-- handler.map: pool:map and handler.map, a job per item of a lazy input,
-- with a bounded window of items in flight, in input order or as they
-- finish, and retries of items that died of their limits.

local type, error, select, unpack, next, pairs, format, min, max, huge =
  type, error, select, unpack, next, pairs, string.format, math.min, math.max, math.huge

local M = {}

-- What the iterator yields for an item left encoded (its `text` mode).
local TEXT = {}
M.TEXT = TEXT

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
local BATCH_MS = 4

local core = require("handler.core")
local started, item_text = core.started, core.item_text
-- Items yielded between two looks at the loop (see the iterator).
local LOOK_EVERY = 32

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
-- With `text` (the command line, whose function returns true and a JSON
-- string), an item of a batch that returned true and a string is yielded
-- as i, true, M.TEXT, job, k, without decoding it: core.item_text(job, k,
-- true) writes the string to stdout.
function M.iterator(what, pool, fn, inputs, opts, wait_any, want_stats, wait_ended, text)
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
  -- slot at(i), one ring per field, so that an item costs no table of its
  -- own. A table whose integer keys only grow while the old ones are
  -- cleared rehashes over and over once the range is in the hundreds.
  local cap = window
  local function at(i) return (i - 1) % cap + 1 end
  local nready = 0
  local last_stats
  -- Items read but not started, first in first out (index, value, tries
  -- so far): no more jobs are in the pool at once than it has workers, so
  -- the window costs only memory, and a stop drops what has not started.
  local f_i, f_v, f_t, fhead, ftail = {}, {}, {}, 1, 0
  -- Twice the workers: a job is waiting in the pool when a worker frees.
  local workers = max(1, pool.max_workers or 1)
  local max_running = 2 * workers
  local stopped, dropped = false, {}
  -- key -> { job, items_job, n, i1, v1, t1, i2, v2, t2, ... }: a job and
  -- the n entries it runs (index, value, tries); `items_job`: the job
  -- carries its entries as items (batch > 1).
  local running, nrunning = {}, 0
  -- Ended items by slot: how many values the outcome has, the first three,
  -- all of them when there are more, and the stats (with want_stats).
  local r_n, r_a, r_b, r_c, r_x, r_st = {}, {}, {}, {}, {}, {}
  local order, head, tail = {}, 1, 0 -- unordered: indices in the order they ended
  local next_ordered = 1
  local ndone, nfailed = 0, 0

  local look
  -- In order, an ended item waits at its index's slot; as they finish, in
  -- the order ring (index, and the outcome at the same slot), by position:
  -- an item far behind the others would share its index's slot with a
  -- later one.
  local function finish(i, n, a, b, c, x, st)
    nready = nready + 1
    local k
    if ordered then
      k = at(i)
    else
      tail = tail + 1
      k = at(tail)
      order[k] = i
    end
    r_n[k], r_a[k], r_b[k], r_c[k], r_x[k], r_st[k] = n, a, b, c, x, st
    ndone = ndone + 1
    if not a then nfailed = nfailed + 1 end
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

  -- A job of one item (its args), or, with batch > 1, of the entries of r
  -- as items, each run from the pristine image with its own limits.
  local nkeys = 0

  local function start(r)
    local job, err
    local n = r[3]
    if not r[2] then
      job_opts.args = { n = 1, r[5] }
      job, err = pool:async(fn, job_opts)
    else
      local vals = {}
      for k = 1, n do vals[k] = r[2 + 3 * k] end
      job, err = pool:_async_items(fn, vals, job_opts)
    end
    if job == nil then
      for k = 1, n do finish(r[1 + 3 * k], 2, false, err) end
      return
    end
    r[1] = job
    nkeys = nkeys + 1
    running[nkeys] = r
    nrunning = nrunning + 1
    if waitlist then watch(nkeys, job) end
  end

  -- Puts an entry back at the front of the items waiting to start.
  local function again(i, v, t)
    fhead = fhead - 1
    local k = at(fhead)
    f_i[k], f_v[k], f_t[k] = i, v, t
  end

  -- The outcome's count, its first three values, and all of them when it
  -- has more (the first, whether it ended well, then too).
  local function take(...)
    local n = select("#", ...)
    if n <= 3 then return n, ... end
    return n, (...), nil, nil, pack(...)
  end

  -- No entries to put back (collect's `later` until it has some).
  local NONE = {}

  -- Puts back the entries of `later`, by threes (index, value, tries), at
  -- the front of the queue in their order.
  local function put_back(later)
    for k = #later - 2, 1, -3 do again(later[k], later[k + 1], later[k + 2]) end
  end

  -- With batch > 1, how many items a job gets: as many as take about
  -- BATCH_MS together (from the average item of the jobs so far), so that
  -- results, a stop and the items behind a slow one wait no longer than
  -- that; at most `batch`.
  local per_job, avg_ms = 1, nil

  -- A job that took less than the average so far says so at once (a
  -- worker's first jobs carry its start, which later items do not pay);
  -- one that took more moves the average a quarter of the way.
  local function learn(job, n, clean)
    if not clean then return end
    local ms = job:stats().wall_ms / n
    avg_ms = (avg_ms == nil or ms < avg_ms) and ms or avg_ms + (ms - avg_ms) / 4
    per_job = max(1, min(batch, math.floor(BATCH_MS / max(avg_ms, 1e-3))))
  end

  -- Whether an item that ended with (a, b) after t tries runs again.
  local function again_due(a, b, t)
    return a == false and t < retries and retryable(b)
  end

  -- Adds an entry to `later` (NONE: a new list), which it returns.
  local function keep(later, i, v, t)
    if later == NONE then later = {} end
    later[#later + 1] = i
    later[#later + 1] = v
    later[#later + 1] = t
    return later
  end

  -- Collects a job that is done (whoever calls this saw it done).
  local function collect(key)
    local r = running[key]
    running[key] = nil
    nrunning = nrunning - 1
    local job = r[1]
    if not r[2] then
      local i, v, t = r[4], r[5], r[6]
      local n, a, b, c, x = take(job:await())
      if again_due(a, b, t) then
        again(i, v, t + 1)
        return
      end
      finish(i, n, a, b, c, x, want_stats and job:stats() or nil)
      return
    end
    local clean = true
    -- Entries to run again (by threes), put back once all are seen.
    local later = NONE
    local prev_a, prev_b
    for k = 1, r[3] do
      local i, v, t = r[1 + 3 * k], r[2 + 3 * k], r[3 + 3 * k]
      look(false)
      local n, a, b, c, x
      if text and item_text(job._ud, k) then
        n, a, b, c = 0, true, job._ud, k
      else
        n, a, b, c, x = take(job:_item(k))
      end
      if a == nil then
        -- This item and those after it did not run. After one that ended
        -- well: its worker serves one job only (the "syscalls" profile), or
        -- that item touched process state. Either way, one item per job
        -- from now on.
        if k > 1 and (prev_a or (type(prev_b) == "table" and prev_b.cause == "error")) then
          batch = 1
        end
        clean = false
        for m = k, r[3] do
          if stopped then
            dropped[at(r[1 + 3 * m])] = true
          else
            later = keep(later, r[1 + 3 * m], r[2 + 3 * m], r[3 + 3 * m])
          end
        end
        break
      end
      -- Items that ran into a limit say nothing of the usual item.
      if a == false and (retryable(b) or type(b) == "table" and b.type == "OOM") then
        clean = false
      end
      if again_due(a, b, t) then
        later = keep(later, i, v, t + 1)
      else
        finish(i, n, a, b, c, x, want_stats and job:_item_stats(k) or nil)
      end
      prev_a, prev_b = a, b
    end
    if later ~= NONE then put_back(later) end
    if batch == 1 then per_job = 1 else learn(job, r[3], clean) end
  end

  -- Starts jobs of the items read, per_job each, while the pool takes them.
  local function start_ready()
    while nrunning < max_running and fhead <= ftail do
      local n = min(per_job, ftail - fhead + 1)
      -- The input read to its end: what is left is shared among the
      -- workers, so that none waits for another's last long job.
      if exhausted then n = min(n, max(1, math.ceil((ftail - fhead + 1) / workers))) end
      local r = { false, batch > 1, n }
      for e = 1, n do
        local k = at(fhead)
        r[1 + 3 * e], r[2 + 3 * e], r[3 + 3 * e] = f_i[k], f_v[k], f_t[k]
        f_v[k] = nil
        fhead = fhead + 1
      end
      start(r)
    end
  end

  -- Reads items up to the window ahead, then starts what the pool takes.
  local function fill()
    while not exhausted and read - yielded < window do
      look(true)
      local item = next_input()
      if item == nil then
        exhausted = true
      else
        read = read + 1
        ftail = ftail + 1
        local k = at(ftail)
        f_i[k], f_v[k], f_t[k] = read, item, 0
      end
    end
    start_ready()
  end

  -- Starts nothing more: the items read and not started are dropped (never
  -- yielded); those running end and are yielded.
  local function stop()
    stopped = true
    exhausted = true
    for k = fhead, ftail do
      dropped[at(f_i[at(k)])] = true
      f_v[at(k)] = nil
    end
    fhead, ftail = 1, 0
    -- Jobs still waiting in the pool for a worker have not started either.
    for key, r in pairs(running) do
      if not started(r[1]._ud) then
        running[key] = nil
        nrunning = nrunning - 1
        for k = 1, r[3] do dropped[at(r[1 + 3 * k])] = true end
        pool:kill_by_ref(r[1])
      end
    end
  end

  -- Collects the jobs that ended (or may have) since the last time.
  local function collect_ended()
    local list, n = ended, nended
    ended, nended = {}, 0
    for k = 1, n do
      local i = list[k]
      local r = running[i]
      if r ~= nil then
        if r[1]:done() then collect(i) else watch(i, r[1]) end
      end
    end
  end

  -- While items are read, collected and taken, the loop is looked at every
  -- LOOK_EVERY of them (outside nginx, where nothing else steps it), and
  -- with `and_collect` the jobs that ended are collected: a worker that
  -- finished its job then finds the next one waiting in the pool, not once
  -- this host is done with every item before it.
  local step = wait_ended and core.step
  local unlooked = 0
  look = function(and_collect)
    if step == nil then return end
    unlooked = unlooked + 1
    if unlooked < LOOK_EVERY or nrunning == 0 then return end
    unlooked = 0
    step()
    if and_collect then
      waitlist.wake_ended()
      if nended > 0 then collect_ended() end
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
      collect_ended()
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

  -- Yields item i, whose outcome is in slot k (of its position k).
  local function yield_item(i, k)
    look(true)
    k = at(k)
    local n, a, b, c, x = r_n[k], r_a[k], r_b[k], r_c[k], r_x[k]
    last_stats = r_st[k]
    r_n[k], r_a[k], r_b[k], r_c[k], r_x[k], r_st[k] = nil, nil, nil, nil, nil, nil
    nready = nready - 1
    yielded = yielded + 1
    if n == 3 then return i, a, b, c end
    if n == 2 then return i, a, b end
    if n == 0 then return i, true, TEXT, b, c end
    if x ~= nil then return i, unpack(x, 1, n) end
    if n == 1 then return i, a end
    return i
  end

  return function()
    while true do
      fill()
      if ordered then
        while dropped[at(next_ordered)] do
          dropped[at(next_ordered)] = nil
          next_ordered = next_ordered + 1
        end
        if r_n[at(next_ordered)] ~= nil then
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
